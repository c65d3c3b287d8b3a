"""What worker recycling costs keep-alive clients: ``python benchmarks/recycle.py``.

Runs ``python -m kitegreen benchmarks/soak_target.py:make_server --workers 2`` three ways, each
under ``--connections`` keep-alive clients (gevent, in this process) calling ``echo`` in a loop
for ``--duration`` seconds:

``steady``    no recycling: the baseline
``recycle``   ``--max-requests 200 --max-requests-jitter 50``
``reload``    three SIGHUPs, one after the other completes, during the run

For each: calls answered, connections the clients saw end (an end-of-stream or an error:
the hand-over should make it 0), workers recycled or replaced, connections handed over, and the
calls' latency (p50, p99, max, in ms). Bounded: clients have timeouts, the launcher is killed in
``finally``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import gevent
from gevent import monkey

monkey.patch_all()

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from soak_target import soaksvc  # noqa: E402 - after the monkey patch
from thriftpy2.protocol.binary import TBinaryProtocol  # noqa: E402
from thriftpy2.transport.memory import TMemoryBuffer  # noqa: E402

TARGET = "benchmarks/soak_target.py:make_server"


def echo_bytes(message: str) -> bytes:
    out = TMemoryBuffer()
    proto = TBinaryProtocol(out)
    proto.write_message_begin("echo", 1, 1)
    proto.write_struct(soaksvc.TestService.echo_args(message=message))
    proto.write_message_end()
    return bytes(out.getvalue())


def reply_bytes(message: str) -> bytes:
    out = TMemoryBuffer()
    proto = TBinaryProtocol(out)
    proto.write_message_begin("echo", 2, 1)
    proto.write_struct(soaksvc.TestService.echo_result(success=message))
    proto.write_message_end()
    return bytes(out.getvalue())


REQUEST, REPLY = echo_bytes("recycle"), reply_bytes("recycle")


class Client:
    def __init__(self, address: tuple[str, int]) -> None:
        self.address = address
        self.latencies: list[float] = []
        self.ends = 0
        self.running = True
        self.greenlet = gevent.spawn(self.run)

    def run(self) -> None:
        sock: socket.socket | None = None
        while self.running:
            try:
                if sock is None:
                    sock = socket.create_connection(self.address, timeout=10.0)
                begun = time.perf_counter()
                sock.sendall(REQUEST)
                got = b""
                while len(got) < len(REPLY):
                    chunk = sock.recv(len(REPLY) - len(got))
                    if not chunk:
                        raise EOFError
                    got += chunk
                self.latencies.append(time.perf_counter() - begun)
            except (OSError, EOFError):
                self.ends += 1
                if sock is not None:
                    sock.close()
                sock = None
        if sock is not None:
            sock.close()


def records(lines: list[str]) -> list[dict[str, Any]]:
    out = []
    for line in lines:
        with contextlib.suppress(ValueError):
            record = json.loads(line)
            if isinstance(record, dict):
                out.append(record)
    return out


def run(mode: str, connections: int, duration: float) -> dict[str, Any]:
    args = [sys.executable, "-m", "kitegreen", TARGET, "--workers", "2", "--port", "0"]
    args += ["--exit-wait-time", "2", "--log-format", "json"]
    if mode == "recycle":
        args += ["--max-requests", "200", "--max-requests-jitter", "50"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("KITE_")}
    proc = subprocess.Popen(
        args, cwd=HERE.parent, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    lines: list[str] = []

    def pump() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            lines.append(line.decode("utf-8", "replace"))

    reader = gevent.spawn(pump)
    try:
        deadline = time.monotonic() + 30.0
        while sum(r.get("event") == "worker ready" for r in records(lines)) < 2:
            if time.monotonic() > deadline or proc.poll() is not None:
                raise SystemExit("".join(lines[-20:]))
            gevent.sleep(0.05)
        listening = next(r for r in records(lines) if r.get("event") == "listening")
        host, _, port = listening["address"].rpartition(":")
        clients = [Client((host, int(port))) for _ in range(connections)]
        end = time.monotonic() + duration
        if mode == "reload":
            for generation in (1, 2, 3):
                proc.send_signal(signal.SIGHUP)
                while not any(
                    r.get("event") == "reload complete" and r.get("generation") == generation
                    for r in records(lines)
                ):
                    if time.monotonic() > end + 30.0:
                        raise SystemExit("reload did not complete")
                    gevent.sleep(0.05)
        gevent.sleep(max(end - time.monotonic(), 0.0))
        for client in clients:
            client.running = False
        gevent.joinall([c.greenlet for c in clients], timeout=15.0)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20.0)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        reader.join(timeout=5.0)
    found = records(lines)
    latencies = sorted(x for c in clients for x in c.latencies)
    handed = [r for r in found if r.get("event") == "connections handed over"]

    def ms(q: float) -> float:
        return round(latencies[min(int(q * len(latencies)), len(latencies) - 1)] * 1000, 2)

    return {
        "mode": mode,
        "calls": len(latencies),
        "ends_seen": sum(c.ends for c in clients),
        "workers_replaced": sum(
            r.get("event") in ("stopping a worker: recycled", "stopping an old worker: reload")
            for r in found
        ),
        "handed_over": sum(r["handed"] for r in handed),
        "ended_by_worker": sum(r["ended"] for r in handed),
        "p50_ms": ms(0.5),
        "p99_ms": ms(0.99),
        "max_ms": round(latencies[-1] * 1000, 2),
        "mean_ms": round(statistics.fmean(latencies) * 1000, 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--connections", type=int, default=50)
    parser.add_argument("--duration", type=float, default=6.0)
    parser.add_argument("--modes", default="steady,recycle,reload")
    options = parser.parse_args()
    rows = [run(m, options.connections, options.duration) for m in options.modes.split(",")]
    keys = list(rows[0])
    print("| " + " | ".join(keys) + " |")
    print("|" + "---|" * len(keys))
    for row in rows:
        print("| " + " | ".join(str(row[k]) for k in keys) + " |")


if __name__ == "__main__":
    main()
