"""Where the cost of more connections goes: ``python benchmarks/conns.py [STUDY ...]``.

kitegreen's server CPU per request grows between 50 and 500 connections (``run.py``'s target
"at 500 no more than 1.10x its own at 50"). Each study below separates one possible cause, on
``ping()`` over binary/buffered, kitegreen with its limits off, at ``--conns`` (50,500,5000):

``null``        the C null server (``loadgen --serve``) pinned like a server: its CPU per
                request is mostly the kernel's loopback TCP path, so its growth is the kernel's
``curve``       one kitegreen server, the connection counts measured back to back, twice
``steady``      the same, but the CPU of a request in steady state: each count is run for
                ``--duration`` and for four times as long, and the server's extra CPU is
                divided by the extra requests, so that accepting, setting up and closing the
                connections (two seconds of connecting at 5,000, which ``curve`` and
                ``run.py`` count in) and the warm-up drop out
``split``       kitegreen and the C null server in turn, each count in each round: CPU per
                request in user space and in the kernel apart, and how each grows against the
                first count. The null server's kernel time is the loopback TCP path alone, so
                the kernel's growth with the connection count is measured beside kitegreen's;
                with, per request, the TCP segments and fired delayed ACKs (``nstat``) and
                the times the load generator slept waiting for a reply (the server's send
                wakes it, in the server's system time); last, kitegreen's growth over the null
                server's in the same cells. ``--rate R`` paces every cell at R
                requests a second, so that both servers and every count do the same work at
                the same pace (each connection sends every conns / R seconds)
``syscalls``    system calls per request (``strace -c -f`` attached for a fixed request count)
``cachegrind``  user-space instructions and simulated cache misses per request (valgrind's
                cachegrind, last level set to ``--cache`` bytes, by default an EPYC core's
                512 KiB L2), a run without load subtracted; slow: about a minute per count
``idle``        resident memory per idle connection, ``--idle`` (10,000) held after one ping
                each (the server's RSS before and after, as ``run.py`` measures it)

``--server`` studies another server of ``run.py`` the same way: ``cachegrind --server
thriftpy2-threaded`` gives the cheapest peer's user-space instructions per request (valgrind
runs one thread at a time, so a threaded server's figure leaves out what its threads cost the
kernel and the scheduler, not what they cost in user space).

Every run is bounded by a request count or a duration, and binds 127.0.0.1 only. Needs the
load generator ``run.py`` builds, and ``strace`` / ``valgrind`` for those studies.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import run  # noqa: E402 - the benchmarks folder is not a package
import servers  # noqa: E402

WIRE = "binary-buffered"
SUBJECT = "kitegreen-unlimited"


def loadgen(port: int, msg: run.Message, conns: int, requests: int) -> int:
    """Serve ``requests`` calls over ``conns`` connections; how many were done."""
    proc = subprocess.run(
        [
            str(run.LOADGEN),
            *("--port", str(port), "--request", str(msg.request), "--reply", str(msg.reply)),
            *("--conns", str(conns), "--warmup", "0", "--duration", "300"),
            *("--max-requests", str(requests), "--connect-timeout", "30"),
        ],
        capture_output=True,
        timeout=360,
        check=True,
    )
    result = json.loads(proc.stdout)
    return int(result["requests"] + result.get("warmup_requests", 0))


def start(cmd: list[str], port: int, msg: run.Message, within: float) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(
        cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True
    )
    deadline = time.monotonic() + within
    while not run.call_once(port, msg, timeout=1.0):
        if time.monotonic() > deadline or proc.poll() is not None:
            os.killpg(proc.pid, signal.SIGKILL)
            raise SystemExit(f"server did not start: {' '.join(cmd[:4])} ...")
        time.sleep(0.05)
    return proc


def stop(proc: subprocess.Popen[bytes]) -> str:
    """SIGTERM the server's group; what it wrote on standard error."""
    os.killpg(proc.pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    return err.decode(errors="replace")


def cpu_per_request(
    label: str, pid: int, port: int, args: argparse.Namespace, msg: run.Message, pin: bool
) -> None:
    """Each connection count in turn, ``--rounds`` times: req/s and the server's CPU µs/req."""
    for rnd in range(args.rounds):
        first = None
        for conns in args.conns:
            cpu0 = run.cpu_seconds(pid)
            res = run.run_loadgen(port, msg, conns, args.warmup, args.duration, pin)
            us = run._per_request(run.cpu_seconds(pid) - cpu0, res)
            rps = res["rps"]
            first = first or us
            print(
                f"{label} round {rnd} {conns:5d} conns: {rps:9,.0f} req/s {us:6.2f} µs/req "
                f"({us / first:.2f}x at {args.conns[0]}), p99 {res.get('p99_us', 0) / 1000:.2f} ms"
            )


def study_null(args: argparse.Namespace, msg: run.Message, pin: bool) -> None:
    port = run.free_port()
    cmd = [str(run.LOADGEN), "--port", str(port), "--request", str(msg.request)]
    cmd += ["--reply", str(msg.reply), "--serve", "300"]
    proc = start(run.pinned(run.SERVER_CORE, cmd, pin), port, msg, 5.0)
    try:
        cpu_per_request("null", proc.pid, port, args, msg, pin)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


def study_curve(args: argparse.Namespace, msg: run.Message, pin: bool) -> None:
    server = run.start_server(args.server, args.wire, msg, pin)
    try:
        cpu_per_request("curve", server.proc.pid, server.port, args, msg, pin)
    finally:
        server.stop()


def study_steady(args: argparse.Namespace, msg: run.Message, pin: bool) -> None:
    server = run.start_server(args.server, args.wire, msg, pin)
    pid = server.proc.pid
    try:
        for rnd in range(args.rounds):
            first = None
            for conns in args.conns:
                spent = []
                for duration in (args.duration, 4 * args.duration):
                    cpu0 = run.cpu_seconds(pid)
                    res = run.run_loadgen(server.port, msg, conns, args.warmup, duration, pin)
                    done = sum(res.get(k, 0) for k in ("requests", "warmup_requests", "refused"))
                    spent.append((run.cpu_seconds(pid) - cpu0, done, res))
                (short_cpu, short_done, _), (long_cpu, long_done, res) = spent
                us = (long_cpu - short_cpu) * 1e6 / (long_done - short_done)
                whole = long_cpu * 1e6 / long_done
                first = first or us
                print(
                    f"steady round {rnd} {conns:5d} conns: {res['rps']:9,.0f} req/s "
                    f"{us:6.2f} µs/req in steady state ({us / first:.2f}x at {args.conns[0]}), "
                    f"{whole:6.2f} µs/req with set-up, connect {res.get('connect_s', 0):.2f} s",
                    flush=True,
                )
    finally:
        server.stop()


def study_split(args: argparse.Namespace, msg: run.Message, pin: bool) -> None:
    server = run.start_server(args.server, args.wire, msg, pin)
    null = None
    # (subject, conns) -> {round: (user, kernel) µs per request}
    seen: dict[tuple[str, int], dict[int, tuple[float, float]]] = {}
    try:
        port = run.free_port()
        cmd = [str(run.LOADGEN), "--port", str(port), "--request", str(msg.request)]
        cmd += ["--reply", str(msg.reply), "--serve", "3600"]
        cmd += ["--touch", str(args.null_touch)] if args.null_touch else []
        null = start(run.pinned(run.SERVER_CORE, cmd, pin), port, msg, 5.0)
        subjects = (
            ("kitegreen", server.serving_pids(), server.port),
            ("null", [null.pid], port),
        )
        for rnd in range(args.rounds):
            for label, pids, p in subjects:
                for conns in args.conns:
                    split_cell(label, pids, p, conns, rnd, args, msg, pin, seen)
    finally:
        server.stop()
        if null is not None:
            os.killpg(null.pid, signal.SIGKILL)
            null.wait(timeout=10)
    first = args.conns[0]
    for conns in args.conns[1:]:
        totals = {}
        for label in ("kitegreen", "null"):
            few, many = seen.get((label, first), {}), seen.get((label, conns), {})
            pairs = [(few[r], many[r]) for r in few if r in many]  # a failed cell: none
            totals[label] = _median_ratio(pairs, sum)
            print(
                f"split {label:9} {conns} against {first} conns, medians of the rounds' ratios: "
                f"user {_median_ratio(pairs, lambda c: c[0]):.2f}x, "
                f"kernel {_median_ratio(pairs, lambda c: c[1]):.2f}x, "
                f"total {totals[label]:.2f}x"
            )
        # The server's growth over the kernel's own in the same cells: what the connection
        # count costs the server beyond what it costs any server on this machine's TCP.
        print(
            f"split kitegreen's growth at {conns} over the null server's: "
            f"{totals['kitegreen'] / totals['null']:.2f}"
        )


def split_cell(
    label: str,
    pids: list[int],
    port: int,
    conns: int,
    rnd: int,
    args: argparse.Namespace,
    msg: run.Message,
    pin: bool,
    seen: dict[tuple[str, int], dict[int, tuple[float, float]]],
) -> None:
    """One cell of the split study: printed, and its (user, kernel) µs per request kept."""
    tcp0, woken0 = tcp_counters(), loadgen_sleeps()
    before = run.CpuSample.of(pids)
    res = run.run_loadgen(port, msg, conns, args.warmup, args.duration, pin, rate=args.rate)
    after = run.CpuSample.of(pids)
    tcp1, woken1 = tcp_counters(), loadgen_sleeps()
    if "error" in res:
        print(f"split round {rnd} {label:9} {conns:5d} conns: failed: {res['error']}", flush=True)
        return
    user_s, sys_s = before.spent_until(after, pin)
    user, kernel = run._per_request(user_s, res), run._per_request(sys_s, res)
    seen.setdefault((label, conns), {})[rnd] = (user, kernel)
    done = sum(res.get(k, 0) for k in ("requests", "warmup_requests", "refused", "warmup_refused"))
    tcp = " ".join(
        f"{name} {(tcp1[key] - tcp0[key]) / done:.3f}"
        for key, name in TCP_COUNTERS.items()
        if key in tcp0 and key in tcp1
    )
    print(
        f"split round {rnd} {label:9} {conns:5d} conns: {res['rps']:9,.0f} req/s, "
        f"p50 {res.get('p50_us', 0) / 1000:5.1f} ms, µs/req user {user:5.2f} "
        f"kernel {kernel:5.2f} total {user + kernel:5.2f}; per request: {tcp} "
        f"loadgen-sleeps {(woken1 - woken0) / done:.3f}",
        flush=True,
    )


TCP_COUNTERS = {"TcpOutSegs": "segments", "TcpExtDelayedACKs": "delayed-ACKs"}
"""The machine's TCP counters the split study reads (``nstat``), by what it prints."""


def tcp_counters() -> dict[str, int]:
    """:data:`TCP_COUNTERS` now, machine-wide; empty without ``nstat``. On this loopback-only
    bench nearly every segment is the load's: a request and its reply are 2, and what is
    above is pure ACKs (a new connection's first segments are acknowledged at once; a socket
    that stops seeing its peer answer within TCP's 40 ms least ACK timeout acknowledges
    segments on their own, and only some of those are the delayed-ACK timer's)."""
    try:
        out = subprocess.run(
            ["nstat", "-az", *TCP_COUNTERS], capture_output=True, text=True, check=True
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return {}
    return {m[1]: int(m[2]) for m in re.finditer(r"^(\w+)\s+(\d+)", out, re.MULTILINE)}


def loadgen_sleeps() -> int:
    """Voluntary context switches of the load generators that have exited so far. Unpaced, each
    is the load generator waiting for a reply, which a server's send then wakes, in the
    server's system time (loopback delivers in the sender's system call): a server that
    answers slower than the load generator reads pays for waking it. Paced (``--rate``), the
    waits for the next turn count too."""
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_nvcsw


def _median_ratio(
    pairs: list[tuple[tuple[float, float], tuple[float, float]]],
    part: Callable[[tuple[float, float]], float],
) -> float:
    """The median over rounds of ``part(at many) / part(at few)``; nan without a round to
    divide by (a cell too short for the clock's ticks to see one part's time)."""
    ratios = [part(many) / part(few) for few, many in pairs if part(few) > 0]
    return statistics.median(ratios) if ratios else float("nan")


def study_syscalls(args: argparse.Namespace, msg: run.Message, pin: bool) -> None:
    for conns in args.conns:
        port = run.free_port()
        proc = start(servers.command(args.server, port, args.wire), port, msg, 30.0)
        out = run.BUILD / f"strace.{conns}.txt"
        tracer = subprocess.Popen(
            ["strace", "-c", "-f", "-p", str(proc.pid), "-o", str(out)],
            stderr=subprocess.DEVNULL,
        )
        try:
            time.sleep(1.0)  # strace attaches to every thread; no event says when it has
            done = loadgen(port, msg, conns, args.requests)
        finally:
            tracer.send_signal(signal.SIGINT)
            tracer.wait(timeout=30)
            stop(proc)
        rows = []
        for line in out.read_text().splitlines():
            parts = line.split()
            if len(parts) >= 5 and parts[0][0].isdigit() and parts[-1] != "total":
                rows.append((parts[-1], int(parts[3]) / done))
        top = ", ".join(f"{name} {per:.3f}" for name, per in sorted(rows, key=lambda r: -r[1])[:4])
        total = sum(per for _, per in rows)
        print(f"syscalls {conns:5d} conns: {total:.3f} per request ({top})")


def study_cachegrind(args: argparse.Namespace, msg: run.Message, pin: bool) -> None:
    def measure(conns: int) -> tuple[int, dict[str, int]]:
        port = run.free_port()
        cmd = ["valgrind", "--tool=cachegrind", "--cache-sim=yes", f"--LL={args.cache},8,64"]
        cmd += [f"--cachegrind-out-file={run.BUILD / f'cachegrind.{conns}.out'}"]
        proc = start(cmd + servers.command(args.server, port, args.wire), port, msg, 120.0)
        try:
            done = loadgen(port, msg, conns, args.requests) if conns else 0
        finally:
            text = stop(proc)
        figures = {}
        for key, pattern in (
            ("instructions", r"I\s+refs:\s+([\d,]+)"),
            ("D1 misses", r"D1\s+misses:\s+([\d,]+)"),
            ("LL data misses", r"LLd misses:\s+([\d,]+)"),
        ):
            found = re.search(pattern, text)
            if found is None:
                raise SystemExit(f"no {key!r} in cachegrind's summary")
            figures[key] = int(found.group(1).replace(",", ""))
        return done, figures

    _, idle = measure(0)
    for conns in args.conns:
        done, figures = measure(conns)
        per = ", ".join(f"{k} {(v - idle[k]) / done:,.1f}" for k, v in figures.items())
        print(f"cachegrind {conns:5d} conns, {done} requests, per request: {per}")


def study_idle(args: argparse.Namespace, msg: run.Message, pin: bool) -> None:
    server = run.start_server(args.server, args.wire, msg, pin)
    try:
        m = run.measure_idle_rss(server, msg, args.idle, pin)
    finally:
        server.stop()
    if "error" in m:
        raise SystemExit(f"idle: {m['error']}")
    print(
        f"idle {args.idle} connections held: RSS {m['before_kb']} -> {m['after_kb']} KB, "
        f"{m['per_conn_kb']:.2f} KB per connection"
    )


STUDIES = {
    "null": study_null,
    "curve": study_curve,
    "steady": study_steady,
    "split": study_split,
    "syscalls": study_syscalls,
    "cachegrind": study_cachegrind,
    "idle": study_idle,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("studies", nargs="*", help=f"any of {', '.join(STUDIES)} (default: all)")
    parser.add_argument("--conns", default="50,500,5000", help="comma-separated connection counts")
    parser.add_argument("--idle", type=int, default=10000, help="connections held, idle study")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--duration", type=float, default=3.0)
    parser.add_argument("--requests", type=int, default=20000, help="per count, strace/valgrind")
    parser.add_argument("--cache", type=int, default=512 * 1024, help="simulated cache, bytes")
    parser.add_argument(
        "--rate",
        type=float,
        default=0.0,
        help="split: requests a second, every cell (0: as many as the server answers)",
    )
    parser.add_argument(
        "--null-touch",
        type=int,
        default=0,
        help="split: bytes of its own per connection the null server writes a byte of each "
        "cache line of per request (a server's per-connection state, without its code)",
    )
    parser.add_argument(
        "--server",
        default=SUBJECT,
        choices=servers.SERVERS + servers.EXTRA_SERVERS,
        help="the server studied (another than kitegreen prices a peer the same way)",
    )
    parser.add_argument(
        "--wire",
        default=WIRE,
        choices=servers.WIRES + servers.EXTRA_WIRES,
        help="the ping's wire (ttheader/theader: a header ping, see run.py)",
    )
    args = parser.parse_args(argv)
    if not (0 <= args.rate <= 1e8) or not 0 <= args.null_touch <= 16384:
        parser.error("--rate takes 0 to 1e8 requests a second, --null-touch 0 to 16384 bytes")
    args.conns = [int(c) for c in args.conns.split(",")]
    unknown = [s for s in args.studies if s not in STUDIES]
    if unknown:
        parser.error(f"unknown study {unknown[0]!r}; choose from {', '.join(STUDIES)}")
    run.build_loadgen()
    # The load generator and the server inherit the limit: one descriptor per connection.
    run.raise_nofile(max(args.idle, *args.conns) + 256)
    msg = run.encode_messages()["ping", args.wire]
    pin = run.can_pin()
    for name in args.studies or list(STUDIES):
        STUDIES[name](args, msg, pin)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
