"""Instructions per request that a header costs kitegreen: parse, the loop's metadata, reply.

``python benchmarks/headers_cost.py`` runs itself under callgrind (valgrind) twice per case,
with a few and with many iterations, and prints the difference per iteration: instruction
counts are stable on a noisy machine where CPU time is not. Each iteration does what the
request loop does with a header frame besides the Thrift codec's work:

* ``c``: the compiled parser (``_headers.parse``, as the loop calls it), the log id (read,
  and set in structlog's context), and the reply's frame (``HeaderFrame.reply``, with
  TTHeader's MSG_TYPE key); the ``RequestInfo`` is not built, as for a handler that never
  calls ``request_info()``.
* ``c+info``: the same, and a handler that calls ``request_info()`` (the info is built).
* ``python``: the Python implementation kitegreen had before, kept in
  ``tests/headers_reference.py`` (parse, an eager ``RequestInfo``, reply), when it is there;
  the log id's structlog binding is left out of it.

Frames are the ``ttheader`` and ``theader`` requests of ``benchmarks/run.py``.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))

CASES = ("c", "c+info", "python")
WIRES = ("ttheader", "theader")
FEW, MANY = 1_000, 21_000


def frames(wire: str) -> tuple[bytes, bytes]:
    """The benchmark's request frame for ``wire`` and the plain reply message it gets."""
    import run  # the benchmark's own request and reply
    import servers
    from thriftpy2.thrift import TMessageType
    from thriftpy2.transport.memory import TCyMemoryBuffer

    bench = servers.load_bench()
    pfactory, _ = servers.factories(wire)
    args, result = servers.call_values(bench, "ping")
    encoded = []
    for mtype, value in ((TMessageType.CALL, args), (TMessageType.REPLY, result)):
        buf = TCyMemoryBuffer()
        proto = pfactory.get_protocol(buf)
        proto.write_message_begin("ping", mtype, run.SEQID)
        proto.write_struct(value)
        proto.write_message_end()
        encoded.append(buf.getvalue())
    return run.header_frame(wire, TMessageType.CALL, encoded[0]), encoded[1]


def loop(case: str, wire: str, iterations: int) -> None:
    """The measured work, ``iterations`` times."""
    request, reply = frames(wire)
    buf = bytearray(request)
    end = len(buf)
    int_info: Any = {22: "2"} if wire == "ttheader" else None
    if case == "python":
        import headers_reference as ref

        from kitegreen.rpc import metadata

        class WithLogId:
            """The reference frame, with the reads the request info makes that the C frame
            has and the reference, which predates them, does not (``log_id``, ``str_value``)."""

            def __init__(self, frame: Any) -> None:
                self._frame = frame
                self.log_id = frame.int_info.get(2) or None

            def str_value(self, key: str) -> str | None:
                return self._frame.str_info.get(key)

            def __getattr__(self, name: str) -> Any:
                return getattr(self._frame, name)

        for _ in range(iterations):
            frame: Any = ref.parse_frame(memoryview(buf)[0:end], max_frame_size=1 << 20)
            info = metadata.request_info(WithLogId(frame), 0.0)
            frame.reply(reply, str_info=info.response_headers, int_info=int_info)
        return
    from kitegreen.codec._headers import parse
    from kitegreen.rpc import metadata
    from kitegreen.rpc.loop import _LOG_ID

    ask = case == "c+info"
    for _ in range(iterations):
        # What the request loop does for a header frame, around the call: the log id bound
        # when it changes, the info built only when asked for, the reply in the frame.
        frame = parse(buf, 0, end, 1 << 20)
        log_id = frame.log_id
        if log_id is not None and _LOG_ID.get() != log_id:
            _LOG_ID.set(log_id)
        if ask:
            info = metadata.request_info(frame, 0.0)
            frame.reply(reply, str_info=info.response_headers, int_info=int_info)
        else:
            frame.answer(reply, 2, None)


def instructions(case: str, wire: str, iterations: int) -> int:
    """Instructions callgrind counts for a whole run of :func:`loop`."""
    out = subprocess.run(
        [
            "valgrind",
            "--tool=callgrind",
            "--callgrind-out-file=/dev/null",
            sys.executable,
            __file__,
            "--inner",
            case,
            wire,
            str(iterations),
        ],
        capture_output=True,
        text=True,
        timeout=900,
        check=True,
    )
    found = re.search(r"Collected : (\d+)", out.stderr)
    if found is None:
        raise RuntimeError(f"no callgrind total in:\n{out.stderr[-2000:]}")
    return int(found.group(1))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--inner", nargs=3, metavar=("CASE", "WIRE", "N"), help=argparse.SUPPRESS)
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--wires", default=",".join(WIRES))
    args = parser.parse_args()
    if args.inner:
        case, wire, n = args.inner
        loop(case, wire, int(n))
        return 0
    if shutil.which("valgrind") is None:
        sys.exit("headers_cost.py needs valgrind (callgrind)")
    print(f"| wire | case | instructions per request ({MANY - FEW:,} iterations) |")
    print("|---|---|---|")
    for wire in args.wires.split(","):
        for case in args.cases.split(","):
            if case == "python" and not (HERE.parent / "tests" / "headers_reference.py").exists():
                continue
            per = (instructions(case, wire, MANY) - instructions(case, wire, FEW)) / (MANY - FEW)
            print(f"| {wire} | {case} | {per:,.0f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
