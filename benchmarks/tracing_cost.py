"""What tracing costs per request, in instructions (callgrind), immune to a shared machine.

``python benchmarks/tracing_cost.py [--baseline DIR]`` runs a kitegreen server under
``valgrind --tool=callgrind`` in each mode, drives it from a plain client process with N1 and
then N2 requests, and reports ``(I(N2) - I(N1)) / (N2 - N1)``: the server's instructions per
request, start-up and shutdown cancelled out. Modes:

- ``base``: the tree at ``--baseline DIR`` (a checkout from before tracing, its extension
  built: ``git worktree add /tmp/base REV`` then ``python setup.py build_ext --inplace``);
- ``off``: this tree, ``tracing=False`` (OpenTelemetry not imported);
- ``api``: this tree, tracing on, ``opentelemetry-api`` imported, no tracer provider set;
- ``imported``: tracing off, OpenTelemetry imported (what the import alone does);
- ``sdk``: the SDK's ``TracerProvider`` with a ``SimpleSpanProcessor`` and an exporter that
  does nothing: every call makes, ends and "exports" a span.

Each mode is measured with a plain binary ``ping()`` and with a THeader ``ping()`` carrying a
W3C ``traceparent`` (so ``sdk`` extracts the caller's context too). The server has kitegreen's
defaults (limits, metrics on) but no debug server and no access log; the client sends one
request at a time on one connection, from precomputed bytes.

``python benchmarks/tracing_cost.py --serve MODE`` is the server side (what valgrind runs).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def serve(mode: str) -> None:
    """The server: print its port, serve until standard input closes."""
    from gevent import monkey

    monkey.patch_all()
    import gevent
    import thriftpy2
    from gevent.fileobject import FileObjectThread

    import kitegreen
    from kitegreen.observability import logs

    # kitegreen's log setup, as the launcher makes it (the trace-id processor included).
    logs.configure("json", "warning", stream=open(os.devnull, "w"))  # noqa: SIM115
    if mode == "sdk":
        from opentelemetry import trace
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import (
            SimpleSpanProcessor,
            SpanExporter,
            SpanExportResult,
        )

        class Nothing(SpanExporter):
            def export(self, spans: Any) -> SpanExportResult:
                return SpanExportResult.SUCCESS

        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(Nothing()))
        trace.set_tracer_provider(provider)

    bench = thriftpy2.load(str(HERE / "bench.thrift"), module_name="bench_thrift")

    class Handler:
        def ping(self) -> None:
            return None

        def echo(self, msg: str) -> str:
            return msg

        def records(self, records: Any) -> Any:
            return records

    settings: dict[str, Any] = {
        "host": "127.0.0.1",
        "port": 0,
        "enable_debug_server": False,
        "hub_block_threshold": 0.0,
    }
    if mode == "imported":
        # tracing off, but OpenTelemetry imported: what importing it alone does per request.
        import opentelemetry.trace  # noqa: F401
    if mode != "base":
        settings["tracing"] = mode not in {"off", "imported"}
    server = kitegreen.RpcServer(bench.Bench, Handler(), kitegreen.Config(**settings))
    server.start()
    print(server.address[1], flush=True)
    # Standard input closing is the client's "done": read it off the hub.
    gevent.spawn(FileObjectThread(sys.stdin.buffer).read).join()
    server.stop(timeout=2.0)


def requests() -> dict[str, tuple[bytes, int]]:
    """``ping()`` on the plain binary wire and in a THeader frame with a traceparent: the
    request's bytes and the length of its reply."""
    sys.path.insert(0, str(ROOT / "tests"))
    from thrift.protocol.THeaderProtocol import THeaderProtocol
    from thrift.transport.THeaderTransport import THeaderClientType
    from thrift.transport.TTransport import TMemoryBuffer

    plain = bytes.fromhex("80010001000000047069 6e670000000000".replace(" ", ""))
    buf = TMemoryBuffer()
    proto = THeaderProtocol(buf, [THeaderClientType.HEADERS])
    proto.trans.set_header(b"traceparent", TRACEPARENT.encode())
    proto.writeMessageBegin("ping", 1, 0)
    proto.writeStructBegin("ping_args")
    proto.writeFieldStop()
    proto.writeStructEnd()
    proto.writeMessageEnd()
    proto.trans.flush()
    header = buf.getvalue()
    return {"plain": (plain, 0), "theader": (header, 0)}


def drive(port: int, request: bytes, count: int) -> None:
    """``count`` requests, one at a time; each reply read whole (by its framing)."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        for _ in range(count):
            sock.sendall(request)
            if request[:2] == b"\x80\x01":
                # plain binary ping reply: 4+4+4+4 header bytes + one stop byte.
                need = 4 + 4 + 4 + 4 + 1
                got = b""
                while len(got) < need:
                    got += sock.recv(need - len(got))
            else:
                head = b""
                while len(head) < 4:
                    head += sock.recv(4 - len(head))
                need = int.from_bytes(head, "big")
                got = b""
                while len(got) < need:
                    got += sock.recv(need - len(got))


def measure(mode: str, tree: Path, request: bytes, count: int) -> int:
    """Instructions the server ran in all, serving ``count`` requests."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "callgrind.out"
        # Each run its own hash seed (and addresses): a fixed seed moved the counts of code
        # that differs by one frame by 7% (seed 0), so several runs and a median it is.
        env = {**os.environ, "PYTHONPATH": str(tree)}
        proc = subprocess.Popen(
            [
                "valgrind",
                "--tool=callgrind",
                f"--callgrind-out-file={out}",
                sys.executable,
                str(Path(__file__).resolve()),
                "--serve",
                mode,
            ],
            cwd=tmp,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        assert proc.stdout is not None
        assert proc.stdin is not None
        port = int(proc.stdout.readline())
        drive(port, request, count)
        proc.stdin.close()
        assert proc.stderr is not None
        err = proc.stderr.read()
        proc.wait(timeout=300)
        match = re.search(rb"Collected : (\d+)", err)
        if match is None:
            raise RuntimeError(err.decode(errors="replace")[-2000:])
        return int(match.group(1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--serve", choices=["base", "off", "imported", "api", "sdk"])
    parser.add_argument("--baseline", type=Path, help="a checkout from before tracing")
    parser.add_argument("--n1", type=int, default=1000)
    parser.add_argument("--n2", type=int, default=3000)
    parser.add_argument("--modes", default="base,off,api,sdk", help="which modes, in order")
    parser.add_argument("--wires", default="plain,theader", help="which requests")
    args = parser.parse_args()
    if args.serve:
        serve(args.serve)
        return
    trees = {"off": ROOT, "imported": ROOT, "api": ROOT, "sdk": ROOT}
    if args.baseline:
        trees["base"] = args.baseline.resolve()
    modes = [(mode, trees[mode]) for mode in args.modes.split(",") if mode in trees]
    wires = args.wires.split(",")
    results: dict[str, dict[str, Any]] = {}
    for wire, (request, _) in requests().items():
        if wire not in wires:
            continue
        for mode, tree in modes:
            started = time.monotonic()
            low = measure(mode, tree, request, args.n1)
            high = measure(mode, tree, request, args.n2)
            per = (high - low) / (args.n2 - args.n1)
            results.setdefault(wire, {})[mode] = {"n1": low, "n2": high, "per_request": per}
            print(
                f"{wire:8} {mode:5} {per:10.0f} instructions/request "
                f"({time.monotonic() - started:.0f} s)",
                flush=True,
            )
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
