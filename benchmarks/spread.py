"""Shared listener or SO_REUSEPORT for ``--workers N``: ``python benchmarks/spread.py``.

Three ways for N gevent worker processes to take connections from one port, measured with the
same minimal workers (a ``StreamServer`` answering ``ping\\n`` with ``pong\\n``, nothing else, so
that only the accept path differs):

``shared/100``   one listening socket bound by the parent, inherited by every worker; gevent's
                 default ``max_accept`` (100 connections per wake-up of the accept loop)
``shared/1``     the same with ``max_accept = 1`` (what gunicorn's gevent worker sets)
``balanced``     ``shared/1`` plus kitegreen's accept balance (``kitegreen/workers/balance.py``):
                 a worker with more than its share of open connections leaves the listener to
                 the others for 2 ms; what kitegreen's workers run
``reuseport``    one ``SO_REUSEPORT`` socket per worker; the kernel hashes each connection to one

What is measured, each round with fresh workers:

- **burst**: ``--connections`` clients connect at once, then each sends a ping and reads the
  pong; how many connections each worker took.
- **trickle**: the same number connect one after the other, each waiting for its pong first.
- **load**: the C load generator (``benchmarks/loadgen.c``) runs ``--load-connections`` kept-alive
  connections for ``--duration`` seconds; how many requests each worker answered.
- **stalled**: one worker stops accepting (as a worker whose hub is blocked does) for
  ``--stall`` seconds while 40 clients connect and ping; how many waited more than half the stall.
- **closed**: one worker stops accepting, 40 clients connect and send a ping, then that worker
  closes its listening socket (as a worker that stops does); how many were answered, reset, or
  ended cleanly.

Spread is reported as each worker's share and as max/min. Everything is bounded in time: clients
have timeouts, the load generator stops by itself, workers are killed in ``finally``.
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

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import run as bench  # noqa: E402 - the benchmarks folder is not a package

from kitegreen.workers.board import Board  # noqa: E402 - imports no gevent: safe to fork after

PING, PONG = b"ping\n", b"pong\n"
MODES = ("shared/100", "shared/1", "balanced", "reuseport")
CLIENT_TIMEOUT = 10.0


# -- the workers (children, gevent) ---------------------------------------------------------


def worker_main(
    listener: socket.socket | None,
    port: int,
    max_accept: int,
    control: int,
    slot: Any = None,
) -> None:
    """A forked worker: serve ping/pong, obey the parent's commands on ``control``; with a
    board ``slot``, gate its accepts with kitegreen's accept balance."""
    from gevent import monkey

    monkey.patch_all()
    import gevent
    from gevent import socket as gsocket
    from gevent.server import StreamServer

    from kitegreen.workers.balance import AcceptBalance

    counts = {"connections": 0, "requests": 0, "open": 0}
    gate = None
    if slot is not None:
        gate = AcceptBalance(slot.board, slot, lambda: counts["open"], stale_after=1.0)

        def pulse() -> None:
            while True:
                slot.stamp()
                gevent.sleep(0.25)

        gevent.spawn(pulse)
    if listener is None:
        sock = gsocket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(("127.0.0.1", port))
        sock.listen(1024)
    else:
        sock = gsocket.socket(fileno=listener.detach())

    def handle(conn: Any, _address: Any) -> None:
        counts["connections"] += 1
        counts["open"] += 1
        buf = b""
        try:
            while True:
                data = conn.recv(65536)
                if not data:
                    return
                buf += data
                n = len(buf) // len(PING)
                buf = buf[n * len(PING) :]
                if n:
                    counts["requests"] += n
                    conn.sendall(PONG * n)
        except OSError:
            return
        finally:
            counts["open"] -= 1
            conn.close()

    class Gated(StreamServer):  # type: ignore[misc]
        """kitegreen's Acceptor does the same before each accept."""

        def do_read(self) -> Any:
            if gate is not None:
                delay = gate()
                if delay > 0:
                    self.stop_accepting()
                    gevent.spawn_later(delay, self.start_accepting)
                    return None
            return super().do_read()

    server = Gated(sock, handle)
    server.max_accept = max_accept
    server.start()
    if slot is not None:
        slot.set_accepting(True)
    commands = gsocket.socket(fileno=control)
    reader = commands.makefile("rb")
    for line in reader:
        command = line.strip().decode()
        if command == "pause":
            # As a worker whose hub is blocked: its slot still says it accepts (until its
            # heartbeat goes stale), but it takes nothing.
            server.stop_accepting()
        elif command == "resume":
            server.start_accepting()
        elif command == "close":
            server.stop_accepting()
            sock.close()
        elif command == "report":
            commands.sendall(json.dumps(counts).encode() + b"\n")
        elif command == "exit":
            break
    gevent.sleep(0)
    os._exit(0)


class Workers:
    """N forked workers in one mode; the parent's handle on them."""

    def __init__(self, mode: str, n: int) -> None:
        self.port = bench.free_port()
        self.pids: list[int] = []
        self.controls: list[socket.socket] = []
        listener = None
        if mode != "reuseport":
            listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind(("127.0.0.1", self.port))
            listener.listen(1024)
        max_accept = 100 if mode == "shared/100" else 1
        board = Board(size=n) if mode == "balanced" else None
        for index in range(n):
            slot = board.slot(index) if board is not None else None
            ours, theirs = socket.socketpair()
            pid = os.fork()
            if pid == 0:
                ours.close()
                for other in self.controls:
                    other.close()
                try:
                    worker_main(listener, self.port, max_accept, theirs.detach(), slot)
                finally:
                    os._exit(1)
            theirs.close()
            self.pids.append(pid)
            self.controls.append(ours)
        if listener is not None:
            listener.close()
        deadline = time.monotonic() + 10
        while not ping_once(self.port):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{mode} workers did not start")
            time.sleep(0.02)
        # Every worker must be accepting before the measurement: each answers a report.
        self.report()

    def command(self, index: int, command: str) -> None:
        self.controls[index].sendall(command.encode() + b"\n")

    def report(self) -> list[dict[str, int]]:
        out = []
        for i, control in enumerate(self.controls):
            self.command(i, "report")
            control.settimeout(10)
            data = b""
            while not data.endswith(b"\n"):
                data += control.recv(4096)
            out.append(json.loads(data))
        return out

    def close(self) -> None:
        for i in range(len(self.controls)):
            with contextlib.suppress(OSError):
                self.command(i, "exit")
        for pid in self.pids:
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:
                if os.waitpid(pid, os.WNOHANG)[0]:
                    break
                time.sleep(0.02)
            else:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
        for control in self.controls:
            control.close()


# -- the clients (parent, plain blocking sockets) -------------------------------------------


def ping_once(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1.0) as s:
            s.sendall(PING)
            return s.recv(len(PONG)) == PONG
    except OSError:
        return False


def burst(port: int, n: int) -> None:
    socks = [
        socket.create_connection(("127.0.0.1", port), timeout=CLIENT_TIMEOUT) for _ in range(n)
    ]
    try:
        for s in socks:
            s.sendall(PING)
        for s in socks:
            if s.recv(len(PONG)) != PONG:
                raise RuntimeError("bad pong")
    finally:
        for s in socks:
            s.close()


def trickle(port: int, n: int) -> None:
    socks = []
    try:
        for _ in range(n):
            s = socket.create_connection(("127.0.0.1", port), timeout=CLIENT_TIMEOUT)
            socks.append(s)
            s.sendall(PING)
            if s.recv(len(PONG)) != PONG:
                raise RuntimeError("bad pong")
    finally:
        for s in socks:
            s.close()


def stalled(workers: Workers, stall: float) -> int:
    """Clients that waited more than half the stall while worker 0 did not accept."""
    workers.command(0, "pause")
    time.sleep(0.1)
    started = time.monotonic()
    socks = [
        socket.create_connection(("127.0.0.1", workers.port), timeout=CLIENT_TIMEOUT)
        for _ in range(40)
    ]
    for s in socks:
        s.sendall(PING)
    time.sleep(max(stall - (time.monotonic() - started), 0))
    waited = 0
    # Those answered by now did not wait for the stalled worker.
    for s in socks:
        s.setblocking(False)
        try:
            if s.recv(len(PONG)) != PONG:
                raise RuntimeError("bad pong")
        except BlockingIOError:
            waited += 1
    workers.command(0, "resume")
    for s in socks:
        s.close()
    return waited


def closed(workers: Workers) -> dict[str, int]:
    """Outcomes of 40 pings queued while worker 0 did not accept, once it closed its socket."""
    workers.command(0, "pause")
    time.sleep(0.1)
    socks = [
        socket.create_connection(("127.0.0.1", workers.port), timeout=CLIENT_TIMEOUT)
        for _ in range(40)
    ]
    for s in socks:
        s.sendall(PING)
    time.sleep(0.3)
    workers.command(0, "close")
    outcomes = {"answered": 0, "reset": 0, "clean end": 0, "timeout": 0}
    for s in socks:
        s.settimeout(3.0)
        try:
            data = s.recv(len(PONG))
            outcomes["answered" if data == PONG else "clean end"] += 1
        except ConnectionResetError:
            outcomes["reset"] += 1
        except TimeoutError:
            outcomes["timeout"] += 1
        finally:
            s.close()
    return outcomes


def load(workers: Workers, conns: int, duration: float) -> dict[str, Any]:
    loadgen = bench.build_loadgen()
    req, rep = bench.BUILD / "spread.request", bench.BUILD / "spread.reply"
    req.write_bytes(PING)
    rep.write_bytes(PONG)
    cmd = [
        str(loadgen),
        "--port",
        str(workers.port),
        "--request",
        str(req),
        "--reply",
        str(rep),
        "--conns",
        str(conns),
        "--warmup",
        "0.5",
        "--duration",
        str(duration),
    ]
    proc = subprocess.run(cmd, capture_output=True, timeout=duration + 30, check=False)
    result: dict[str, Any] = json.loads(proc.stdout)
    return result


def shares(counts: list[int]) -> dict[str, Any]:
    total = sum(counts)
    return {
        "counts": counts,
        "shares": [round(c / total, 3) if total else 0.0 for c in counts],
        "max_over_min": round(max(counts) / min(counts), 2) if min(counts) else float("inf"),
    }


def measure(mode: str, n: int, args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {"mode": mode, "workers": n}
    for name, client in (("burst", burst), ("trickle", trickle)):
        workers = Workers(mode, n)
        try:
            before = [r["connections"] for r in workers.report()]
            client(workers.port, args.connections)
            after = [r["connections"] for r in workers.report()]
            out[name] = shares([a - b for a, b in zip(after, before, strict=True)])
        finally:
            workers.close()
    workers = Workers(mode, n)
    try:
        before = [r["requests"] for r in workers.report()]
        result = load(workers, args.load_connections, args.duration)
        after = [r["requests"] for r in workers.report()]
        out["load"] = {
            **shares([a - b for a, b in zip(after, before, strict=True)]),
            "rps": round(result.get("rps", 0)),
        }
    finally:
        workers.close()
    workers = Workers(mode, n)
    try:
        out["stalled_waited"] = stalled(workers, args.stall)
    finally:
        workers.close()
    workers = Workers(mode, n)
    try:
        out["closed"] = closed(workers)
    finally:
        workers.close()
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--connections", type=int, default=200)
    parser.add_argument("--load-connections", type=int, default=50)
    parser.add_argument("--duration", type=float, default=3.0)
    parser.add_argument("--stall", type=float, default=1.0)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    bench.raise_nofile(args.connections * 2 + 256)
    runs = []
    for rnd in range(args.rounds):
        for mode in MODES:
            result = measure(mode, args.workers, args)
            result["round"] = rnd
            runs.append(result)
            print(json.dumps(result), flush=True)
    print()
    print(
        "| mode | burst max/min | trickle max/min | load max/min | load req/s | "
        "stalled: waited of 40 | closed: answered / reset of 40 |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    for mode in MODES:
        mine = [r for r in runs if r["mode"] == mode]

        def med(key: str, runs: list[dict[str, Any]] = mine) -> float:
            return statistics.median(r[key]["max_over_min"] for r in runs)

        waited = statistics.median(r["stalled_waited"] for r in mine)
        answered = statistics.median(r["closed"]["answered"] for r in mine)
        reset = statistics.median(r["closed"]["reset"] for r in mine)
        rps = statistics.median(r["load"]["rps"] for r in mine)
        print(
            f"| {mode} | {med('burst'):.2f} | {med('trickle'):.2f} | {med('load'):.2f} | "
            f"{rps:,.0f} | {waited:.0f} | {answered:.0f} / {reset:.0f} |"
        )
    loadavg = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    print(
        f"\nmedians over {args.rounds} rounds, {args.workers} workers, "
        f"{os.cpu_count()} CPUs, load average {loadavg}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
