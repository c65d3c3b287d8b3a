"""Benchmark kitegreen against its peers on loopback: ``python benchmarks/run.py [--quick]``.

``--workers 1,2,4,8`` runs kitegreen with each worker count (``kitegreen``, ``kitegreen-w2``, ...)
and adds a scaling table; ``--loadgens K`` splits each cell's connections over K load-generator
processes, so that the load generator is not what limits several workers.

For every round, wire format and server (the server order rotates each round, so rounds of
one server never run back to back), the server is started pinned to core 0, and for each
method and connection count the C load generator, pinned to core 1, warms up and then
measures a closed loop (one request in flight per connection). Reported figures are the
medians over rounds. Each round also measures resident memory per idle connection and the
time from spawning a server to its first answered ``ping()``.

Everything is bounded in time: every subprocess has a timeout, the load generator stops by
itself, and every server is killed in ``finally``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import hashlib
import json
import os
import random
import resource
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import time
from dataclasses import dataclass, field
from functools import partial
from importlib import metadata
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import servers  # noqa: E402 - the benchmarks folder is not a package

BUILD = HERE / ".build"
LOADGEN_SRC = HERE / "loadgen.c"
LOADGEN = BUILD / "loadgen"
RESULTS = HERE / "results"
LOGS = BUILD / "logs"

METHODS = ("ping", "echo", "records")
CONNS = (1, 50, 500)
IDLE_CONNECTIONS = 2000
SEQID = 1
SERVER_CORE = "0"
"""The server's cores for taskset (a range such as ``0-3`` with workers); set by :func:`main`."""
LOADGEN_CORES = ["1"]
"""One core per load-generator process; set by :func:`main`."""
TARGET_SCALING = 0.8
START_TIMEOUT = 20.0
GUNICORN_PINS = ("gunicorn==19.9.0", "setproctitle")
GUNICORN_THRIFT = "gunicorn_thrift==0.2.25"

TARGET_VS_BEST_50 = 1.15
DELAYED_ACK_US = 40_000
"""Linux's least ACK timeout (``TCP_ATO_MIN``, ``TCP_DELACK_MIN``). Each connection of a cell
sends once every connections / throughput seconds (one request in flight). Where that interval,
or a reply's wait, nears 40 ms, the machine's segments per request rise above the 2 of a
request and its reply (pure ACKs, mostly not sent by the delayed-ACK timer: ``conns.py split``
counts both), and such cells measure more kernel time: 5,000 connections at 125,000 req/s sit
there, 50 or 500 connections never do."""
TARGET_GROWTH = {500: 1.10, 5000: 1.25}
"""CPU per request at that many connections, at most this times its own at 50."""
TARGET_RSS_KB = 12.0
TARGET_START_MS = 1000.0


# -- setup ----------------------------------------------------------------------------------


def build_loadgen() -> Path:
    """Compile loadgen.c with the system compiler when the binary is missing or stale."""
    BUILD.mkdir(exist_ok=True)
    if LOADGEN.exists() and LOADGEN.stat().st_mtime >= LOADGEN_SRC.stat().st_mtime:
        return LOADGEN
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        sys.exit("run.py: no C compiler (cc or gcc) found; install one, e.g. apt-get install gcc")
    subprocess.run(
        [cc, "-O2", "-Wall", "-o", str(LOADGEN), str(LOADGEN_SRC)], check=True, timeout=120
    )
    return LOADGEN


def ensure_gunicorn_venv() -> None:
    """Create benchmarks/.venv-gunicorn with gunicorn 19.9 and gunicorn_thrift, if missing.

    gunicorn_thrift 0.2.25 (its last release) pins ``gevent<1.5``, which does not build on
    Python 3.11; its code runs on current gevent, so it is installed with ``--no-deps`` next to
    gunicorn 19.9.0 (the version it pins) and the same gevent and thriftpy2 as this
    virtualenv, which keeps the comparison about servers rather than library versions.
    """
    gunicorn = servers.GUNICORN_VENV / "bin" / "gunicorn_thrift"
    if gunicorn.exists():
        return
    print(f"creating {servers.GUNICORN_VENV} (gunicorn 19.9 + gunicorn_thrift) ...", flush=True)
    venv = servers.GUNICORN_VENV
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True, timeout=300)
    pip = [
        str(venv / "bin" / "python"),
        "-m",
        "pip",
        "install",
        "--quiet",
        "--disable-pip-version-check",
    ]
    same = [f"{name}=={metadata.version(name)}" for name in ("gevent", "greenlet", "thriftpy2")]
    subprocess.run([*pip, *GUNICORN_PINS, *same], check=True, timeout=900)
    subprocess.run([*pip, "--no-deps", GUNICORN_THRIFT], check=True, timeout=300)


@dataclass(frozen=True)
class Message:
    """One pre-encoded request and the exact reply every server must send to it."""

    method: str
    wire: str
    request: Path
    reply: Path
    refusal: Path | None = None
    """kitegreen's refusal of the call past its QPS limit: the load generator counts it
    (``refused``) and goes on, where any other reply is a mismatch that drops the connection."""


def encode_messages() -> dict[tuple[str, str], Message]:
    """Encode every call of :data:`METHODS` and its reply for every wire format."""
    from thriftpy2.thrift import TApplicationException, TMessageType
    from thriftpy2.transport.memory import TCyMemoryBuffer

    from kitegreen.rpc.loop import LOADSHEDDING

    bench = servers.load_bench()
    out_dir = BUILD / "messages"
    out_dir.mkdir(parents=True, exist_ok=True)
    messages = {}
    for wire in servers.WIRES + servers.EXTRA_WIRES:
        pfactory, _ = servers.factories(wire)
        framed = wire.endswith("framed")
        for method in METHODS:
            args, result = servers.call_values(bench, method)
            encoded = []
            # kitegreen's answer past its QPS limit (rpc/loop.py, _overloaded): LOADSHEDDING.
            refused = TApplicationException(
                LOADSHEDDING, f"QPS Overload: {method} refused by the qps limit"
            )
            for mtype, struct_ in (
                (TMessageType.CALL, args),
                (TMessageType.REPLY, result),
                (TMessageType.EXCEPTION, refused),
            ):
                buf = TCyMemoryBuffer()
                proto = pfactory.get_protocol(buf)
                proto.write_message_begin(method, mtype, SEQID)
                proto.write_struct(struct_)
                proto.write_message_end()
                data = buf.getvalue()
                if wire in servers.HEADER_WIRES:
                    data = header_frame(wire, mtype, data)
                elif framed:
                    data = struct.pack("!i", len(data)) + data
                encoded.append(data)
            request = out_dir / f"{method}-{wire}.request"
            reply = out_dir / f"{method}-{wire}.reply"
            refusal = out_dir / f"{method}-{wire}.refusal"
            request.write_bytes(encoded[0])
            reply.write_bytes(encoded[1])
            refusal.write_bytes(encoded[2])
            messages[method, wire] = Message(method, wire, request, reply, refusal)
    return messages


def header_frame(wire: str, mtype: int, message: bytes) -> bytes:
    """``message`` in the header a Kitex (``ttheader``) or an fbthrift/baseplate (``theader``)
    client sends; for a reply, the header kitegreen answers it with."""
    from kitegreen.codec.headers import IntKey, build_frame

    if wire == "ttheader":
        if mtype == 1:  # CALL: what kitex's client TTHeader handler and metainfo write
            int_info = {
                IntKey.FROM_SERVICE: "bench.caller",
                IntKey.FROM_METHOD: "Handle",
                IntKey.TO_SERVICE: "bench.server",
                IntKey.TO_METHOD: "ping",
                IntKey.MSG_TYPE: "1",
                IntKey.TRANSPORT_TYPE: "framed",
                IntKey.LOG_ID: "202612050300000102030405060708",
                IntKey.RPC_TIMEOUT: "1000",
            }
            str_info = {
                "isn": "Bench",
                "RPC_TRANSIT_tenant": "t-1",
                "RPC_PERSIST_region": "eu-1",
            }
        else:  # kitegreen's reply: the message type, as Kitex's server writes it
            int_info, str_info = {IntKey.MSG_TYPE: str(mtype)}, {}
        return build_frame(
            "ttheader",
            seqid=SEQID,
            protocol="binary",
            payload=message,
            str_info=str_info,
            int_info={int(k): v for k, v in int_info.items()},
        )
    str_info = (
        {
            "client_timeout": "1000",
            "Trace": "1234567890123",
            "Span": "2345678901234",
            "Parent": "3456789012345",
            "Sampled": "1",
            "User-Agent": "bench",
        }
        if mtype == 1
        else {}
    )
    return build_frame(
        "theader", seqid=SEQID, protocol="binary", payload=message, str_info=str_info
    )


# -- processes ------------------------------------------------------------------------------


def can_pin(server_cores: int = 1, loadgens: int = 1) -> bool:
    """Whether the server and each load generator can have cores of their own."""
    cores = len(os.sched_getaffinity(0))
    return shutil.which("taskset") is not None and cores >= server_cores + loadgens


def set_cores(server_cores: int, loadgens: int) -> None:
    """Give the server the first ``server_cores`` cores and each load generator one after."""
    global SERVER_CORE, LOADGEN_CORES
    cores = sorted(os.sched_getaffinity(0))
    SERVER_CORE = ",".join(str(c) for c in cores[:server_cores])
    LOADGEN_CORES = [str(c) for c in cores[server_cores : server_cores + loadgens]]


def worker_count(name: str) -> int:
    """Worker processes of a server variant: N for ``kitegreen-wN``, else 1."""
    return int(name.rsplit("-w", 1)[1]) if name.startswith("kitegreen-w") else 1


def pinned(core: str, cmd: list[str], pin: bool) -> list[str]:
    return ["taskset", "-c", core, *cmd] if pin else cmd


def free_port() -> int:
    """A free loopback port below the ephemeral range.

    Ephemeral ports are what the load generator's client sockets use (and leave in
    TIME_WAIT by the hundred), and what other programs' port-0 listeners get; a server port
    from below that range collides with neither.
    """
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(10000, max(low, 10001))
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free loopback port found below the ephemeral range")


def call_once(port: int, msg: Message, timeout: float) -> bool:
    """Send ``msg``'s request on a new connection; True if the exact reply came back."""
    expected = msg.reply.read_bytes()
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
            sock.sendall(msg.request.read_bytes())
            got = b""
            while len(got) < len(expected):
                chunk = sock.recv(len(expected) - len(got))
                if not chunk:
                    return False
                got += chunk
    except OSError:
        return False
    if got != expected:
        raise RuntimeError(f"unexpected reply to {msg.method} ({msg.wire}): {got[:64]!r}...")
    return True


def children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(p) for p in text.split()]


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


Ticks = dict[str, tuple[int, int, int, int]]


def core_ticks() -> Ticks:
    """``{core: (total, stolen, user, kernel)}`` ticks from /proc/stat: kernel is system, irq
    and softirq together (where the kernel charges a loopback peer's receive done in softirq
    context without ``CONFIG_IRQ_TIME_ACCOUNTING``, it is the interrupted task's system time)."""
    out = {}
    for line in Path("/proc/stat").read_text().splitlines():
        if line.startswith("cpu") and line[3:4].isdigit():
            name, *values = line.split()
            ticks = [int(v) for v in values[:8]]
            out[name[3:]] = (
                sum(ticks),
                ticks[7],
                ticks[0] + ticks[1],
                ticks[2] + ticks[5] + ticks[6],
            )
    return out


def kernel_share(before: Ticks, after: Ticks, core: str) -> float | None:
    """The kernel's share of ``core``'s busy ticks between two reads; None without any."""
    if core not in before or core not in after:
        return None
    user = after[core][2] - before[core][2]
    kernel = after[core][3] - before[core][3]
    return kernel / (user + kernel) if user + kernel > 0 else None


@dataclass(frozen=True)
class CpuSample:
    """A server's CPU so far (its processes' user and system seconds) and every core's ticks,
    read together at the start or the end of a cell."""

    user: float
    system: float
    ticks: Ticks
    at: float

    @classmethod
    def of(cls, pids: list[int]) -> CpuSample:
        user, system = cpu_total_times(pids)
        return cls(user, system, core_ticks(), time.monotonic())

    def spent_until(self, end: CpuSample, pin: bool) -> tuple[float, float]:
        """The server's CPU seconds from here to ``end``: (user space, kernel).

        The total is the processes' own. With the server alone on a pinned core, it is split
        by that core's kernel share of its busy ticks over the cell; otherwise by the
        processes' own (user, system) difference, which is noisier: /proc/PID/stat rescales
        its tick-sampled split over the process's whole life, so the difference of two reads
        carries the error of both.
        """
        user, system = end.user - self.user, end.system - self.system
        share = kernel_share(self.ticks, end.ticks, SERVER_CORE) if pin else None
        if share is None:
            return user, system
        total = user + system
        return total * (1.0 - share), total * share


def steal_share(before: Ticks, after: Ticks, core: str) -> float:
    """The share of ``core``'s time the hypervisor gave to someone else between two reads."""
    if core not in before or core not in after:
        return 0.0
    total = after[core][0] - before[core][0]
    return (after[core][1] - before[core][1]) / total if total > 0 else 0.0


def cpu_times(pid: int) -> tuple[float, float]:
    """``pid``'s CPU seconds so far: (user space, kernel). The kernel's share includes the
    loopback TCP work its sends do for the peer's socket (loopback delivers in the sender's
    system call), so it is the part a server's own code changes least."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def cpu_seconds(pid: int) -> float:
    return sum(cpu_times(pid))


def cpu_total_times(pids: list[int]) -> tuple[float, float]:
    """User and kernel CPU seconds of ``pids`` together (a process that has gone counts 0)."""
    user = system = 0.0
    for pid in pids:
        with contextlib.suppress(OSError, IndexError, ValueError):
            u, s = cpu_times(pid)
            user += u
            system += s
    return user, system


def cpu_total(pids: list[int]) -> float:
    """CPU seconds of ``pids`` together (a process that has gone counts 0)."""
    return sum(cpu_total_times(pids))


@dataclass
class Server:
    """One running server process (its process group is ours to kill)."""

    name: str
    wire: str
    port: int
    proc: subprocess.Popen[bytes]
    start_ms: float = 0.0
    log_path: Path = field(default_factory=Path)

    @property
    def worker_pid(self) -> int:
        """The process that serves requests: gunicorn's worker, else the process itself."""
        if self.name == "gunicorn-thrift":
            kids = children(self.proc.pid)
            if kids:
                return kids[0]
        return self.proc.pid

    def serving_pids(self) -> list[int]:
        """Every process whose CPU and memory are the server's: with kitegreen's workers, the
        arbiter and its workers."""
        if worker_count(self.name) > 1:
            return [self.proc.pid, *children(self.proc.pid)]
        return [self.worker_pid]

    def stop(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=5)
        # gunicorn's worker may outlive its arbiter by a moment; it is in the same group.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)

    def log_tail(self) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-15:])
        except OSError:
            return ""


def start_server(name: str, wire: str, ping: Message, pin: bool) -> Server:
    """Spawn ``name`` pinned to the server core; return once it has answered a ``ping()``.

    ``start_ms`` is the time from spawning the process to the first answered ping. A server
    that does not answer in time is tried once more on another port before giving up.
    """
    try:
        return _start_server(name, wire, ping, pin)
    except TimeoutError as exc:
        print(f"  warning: {exc}; trying once more", file=sys.stderr, flush=True)
        return _start_server(name, wire, ping, pin)


def _start_server(name: str, wire: str, ping: Message, pin: bool) -> Server:
    LOGS.mkdir(parents=True, exist_ok=True)
    port = free_port()
    log_path = LOGS / f"{name}-{wire}.log"
    cmd = pinned(SERVER_CORE, servers.command(name, port, wire), pin)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    with log_path.open("wb") as log:
        t0 = time.perf_counter()
        proc = subprocess.Popen(
            cmd,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            env=env,
            cwd=HERE,
        )
    server = Server(name, wire, port, proc, log_path=log_path)
    deadline = t0 + START_TIMEOUT
    try:
        while time.perf_counter() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {proc.returncode}:\n{server.log_tail()}")
            if call_once(port, ping, timeout=2.0):
                server.start_ms = (time.perf_counter() - t0) * 1000
                return server
            time.sleep(0.005)
        raise TimeoutError(
            f"{name} did not answer ping within {START_TIMEOUT:g} s on port "
            f"{port}:\n{server.log_tail()}"
        )
    except BaseException:
        server.stop()
        raise


def run_loadgen(
    port: int,
    msg: Message,
    conns: int,
    warmup: float,
    duration: float,
    pin: bool,
    loadgens: int = 1,
    rate: float = 0.0,
) -> dict[str, Any]:
    """Run ``loadgens`` load generators at once, ``conns`` connections split between them;
    ``rate`` > 0: at most that many requests a second in all (``loadgen --rate``).

    Their figures are merged: requests, errors and req/s add up, CPU use adds up (in cores),
    and p50/p99 are the request-weighted means of each generator's own (an approximation:
    percentiles do not merge exactly).
    """
    one = partial(_run_one_loadgen, port, msg, warmup=warmup, duration=duration, pin=pin)
    if loadgens <= 1:
        return one(conns, LOADGEN_CORES[0], rate=rate)
    shares = [conns // loadgens + (i < conns % loadgens) for i in range(loadgens)]
    cores = [LOADGEN_CORES[i % len(LOADGEN_CORES)] for i in range(loadgens)]
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(loadgens) as pool:
        parts = list(
            pool.map(
                lambda job: one(job[0], job[1], rate=rate * job[0] / conns),
                [(n, core) for n, core in zip(shares, cores, strict=True) if n],
            )
        )
    failed = [p for p in parts if "error" in p]
    if failed:
        return failed[0]
    done = sum(p["requests"] for p in parts) or 1
    merged: dict[str, Any] = {
        "requests": sum(p["requests"] for p in parts),
        "warmup_requests": sum(p.get("warmup_requests", 0) for p in parts),
        "errors": sum(p["errors"] for p in parts),
        "refused": sum(p.get("refused", 0) for p in parts),
        "warmup_refused": sum(p.get("warmup_refused", 0) for p in parts),
        "refused_rps": sum(p.get("refused_rps", 0.0) for p in parts),
        "mismatches": sum(p.get("mismatches", 0) for p in parts),
        "elapsed": max(p["elapsed"] for p in parts),
        "rps": sum(p["rps"] for p in parts),
        "cpu_util": sum(p["cpu_util"] for p in parts),
        "loadgens": len(parts),
    }
    for key in ("p50_us", "p90_us", "p99_us", "p999_us"):
        merged[key] = sum(p.get(key, 0) * p["requests"] for p in parts) / done
    merged["max_us"] = max(p.get("max_us", 0) for p in parts)
    return merged


def _run_one_loadgen(
    port: int,
    msg: Message,
    conns: int,
    core: str,
    *,
    warmup: float,
    duration: float,
    pin: bool,
    rate: float,
) -> dict[str, Any]:
    cmd = pinned(
        core,
        [
            str(LOADGEN),
            "--port",
            str(port),
            "--request",
            str(msg.request),
            "--reply",
            str(msg.reply),
            *(("--refusal", str(msg.refusal)) if msg.refusal is not None else ()),
            "--conns",
            str(conns),
            "--warmup",
            str(warmup),
            "--duration",
            str(duration),
            "--connect-timeout",
            "10",
            *(("--rate", str(rate)) if rate > 0 else ()),
        ],
        pin,
    )
    proc = subprocess.run(cmd, capture_output=True, timeout=warmup + duration + 30, check=False)
    try:
        result: dict[str, Any] = json.loads(proc.stdout)
    except json.JSONDecodeError:
        result = {"error": f"loadgen exited {proc.returncode}: {proc.stderr.decode()[-300:]}"}
    return result


def raise_nofile(n: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = n if hard == resource.RLIM_INFINITY else min(n, hard)
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


def measure_idle_rss(server: Server, ping: Message, n: int, pin: bool) -> dict[str, Any]:
    """Resident memory per idle connection: open ``n``, one ping each, then hold them idle."""
    pids = server.serving_pids()
    call_once(server.port, ping, timeout=2.0)
    time.sleep(0.3)
    before = sum(rss_kb(pid) for pid in pids)
    cmd = pinned(
        LOADGEN_CORES[0],
        [
            str(LOADGEN),
            "--port",
            str(server.port),
            "--request",
            str(ping.request),
            "--reply",
            str(ping.reply),
            "--conns",
            str(n),
            "--hold",
            "60",
            "--connect-timeout",
            "30",
        ],
        pin,
    )
    proc = subprocess.Popen(
        cmd,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        assert proc.stdout is not None
        assert proc.stdin is not None
        line = proc.stdout.readline()
        ready = (
            json.loads(line)
            if line
            else {"error": proc.stderr.read().decode() if proc.stderr else "no output"}
        )
        if ready.get("ready") != n:
            return {"error": f"idle connections not ready: {ready}"}
        time.sleep(1.0)
        after = sum(rss_kb(pid) for pid in pids)
        proc.stdin.close()
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=5)
    return {
        "before_kb": before,
        "after_kb": after,
        "connections": n,
        "per_conn_kb": (after - before) / n,
    }


def measure_ceiling(
    messages: dict[tuple[str, str], Message],
    warmup: float,
    duration: float,
    pin: bool,
    loadgens: int = 1,
) -> dict[str, Any]:
    """The load generator against a C null server: how fast the harness itself can go."""
    msg = messages["ping", "binary-buffered"]
    port = free_port()
    cmd = pinned(
        SERVER_CORE,
        [
            str(LOADGEN),
            "--port",
            str(port),
            "--request",
            str(msg.request),
            "--reply",
            str(msg.reply),
            "--serve",
            str(warmup + duration + 15),
        ],
        pin,
    )
    proc = subprocess.Popen(
        cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    try:
        deadline = time.monotonic() + 5
        while not call_once(port, msg, timeout=1.0):
            if time.monotonic() > deadline or proc.poll() is not None:
                return {"error": "null server did not start"}
            time.sleep(0.01)
        return run_loadgen(port, msg, 50, warmup, duration, pin, loadgens)
    finally:
        proc.kill()
        proc.wait(timeout=5)


# -- the run --------------------------------------------------------------------------------


@dataclass
class Plan:
    servers: tuple[str, ...]
    wires: tuple[str, ...]
    methods: tuple[str, ...]
    conns: tuple[int, ...]
    rounds: int
    warmup: float
    duration: float
    idle_connections: int
    loadgens: int = 1
    rate: float = 0.0
    """Requests a second every cell is paced at (``loadgen --rate``); 0: as many as the server
    answers (closed loop, the server saturated)."""


def run(plan: Plan, pin: bool) -> dict[str, Any]:
    messages = encode_messages()
    raw: list[dict[str, Any]] = []
    rss: list[dict[str, Any]] = []
    starts: list[dict[str, Any]] = []
    failures: list[dict[str, Any]] = []
    loadavg_before = Path("/proc/loadavg").read_text().split()[:3]
    source_before = source_state()
    t_begin = time.monotonic()

    ceiling = measure_ceiling(messages, plan.warmup, plan.duration, pin, plan.loadgens)
    print(
        f"loadgen ceiling (C null server, 50 conns, ping): {ceiling.get('rps', 0):,.0f} req/s, "
        f"loadgen CPU {ceiling.get('cpu_util', 0):.0%}",
        flush=True,
    )

    for rnd in range(plan.rounds):
        order = plan.servers[rnd % len(plan.servers) :] + plan.servers[: rnd % len(plan.servers)]
        for wire in plan.wires:
            for name in order:
                try:
                    server = start_server(name, wire, messages["ping", wire], pin)
                except (RuntimeError, TimeoutError) as exc:
                    # One server that will not start must not cost the whole run.
                    print(f"  {name:<19} did not start: {exc}", flush=True)
                    failures.append({"server": name, "wire": wire, "round": rnd, "error": str(exc)})
                    continue
                try:
                    starts.append(
                        {"server": name, "wire": wire, "round": rnd, "ms": server.start_ms}
                    )
                    for method in plan.methods:
                        for conns in plan.conns:
                            pids = server.serving_pids()
                            before = CpuSample.of(pids)
                            result = run_loadgen(
                                server.port,
                                messages[method, wire],
                                conns,
                                plan.warmup,
                                plan.duration,
                                pin,
                                plan.loadgens,
                                plan.rate,
                            )
                            after = CpuSample.of(pids)
                            user_s, sys_s = before.spent_until(after, pin)
                            ticks0, ticks1 = before.ticks, after.ticks
                            result.update(
                                server=name,
                                wire=wire,
                                method=method,
                                conns=conns,
                                round=rnd,
                                server_cpu_util=(user_s + sys_s) / (after.at - before.at),
                                server_cpu_us_per_req=_per_request(user_s + sys_s, result),
                                server_cpu_user_us_per_req=_per_request(user_s, result),
                                server_cpu_sys_us_per_req=_per_request(sys_s, result),
                                workers=worker_count(name),
                                server_core_steal=steal_share(
                                    ticks0, ticks1, SERVER_CORE.split(",", maxsplit=1)[0]
                                ),
                                loadgen_core_steal=steal_share(ticks0, ticks1, LOADGEN_CORES[0]),
                            )
                            raw.append(result)
                            _progress(result)
                            time.sleep(0.3)
                    if wire == plan.wires[0] and plan.idle_connections:
                        m = measure_idle_rss(
                            server, messages["ping", wire], plan.idle_connections, pin
                        )
                        m.update(server=name, round=rnd)
                        rss.append(m)
                        print(
                            f"  {name:<19} idle RSS: {m.get('per_conn_kb', float('nan')):.1f} "
                            f"KB/conn {m.get('error', '')}",
                            flush=True,
                        )
                finally:
                    server.stop()
                time.sleep(0.5)

    loadavg_after = Path("/proc/loadavg").read_text().split()[:3]
    return {
        "when": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "plan": plan.__dict__,
        "pinned": pin,
        "python": sys.version.split()[0],
        "versions": {n: _version(n) for n in ("kitegreen", "gevent", "thriftpy2", "greenlet")},
        "source_before": source_before,
        "source_after": source_state(),
        "loadavg_before": loadavg_before,
        "loadavg_after": loadavg_after,
        "wall_s": round(time.monotonic() - t_begin, 1),
        "kite_env": {k: v for k, v in os.environ.items() if k.startswith("KITE_")},
        "cores": {"server": SERVER_CORE, "loadgens": LOADGEN_CORES, "cpus": os.cpu_count()},
        "ceiling": ceiling,
        "runs": raw,
        "idle_rss": rss,
        "startup": starts,
        "start_failures": failures,
    }


def _per_request(cpu_s: float, result: dict[str, Any]) -> float:
    """Server CPU µs per request answered, refusals included: insensitive to the time the
    server was not running."""
    done = sum(
        result.get(key, 0) for key in ("requests", "warmup_requests", "refused", "warmup_refused")
    )
    return cpu_s * 1e6 / done if done else float("nan")


def source_state() -> dict[str, str]:
    """The kitegreen checkout being measured: commit and a digest of uncommitted changes.

    kitegreen is installed editable, so each server start runs the working tree as it is at
    that moment; a change between the start and the end of a run is flagged in the summary.
    """
    root = HERE.parent

    def git(*args: str) -> str:
        try:
            out = subprocess.run(
                ["git", *args], cwd=root, capture_output=True, timeout=10, check=False
            )
        except (OSError, subprocess.TimeoutExpired):
            return "?"
        return out.stdout.decode(errors="replace").strip()

    diff = git("diff", "HEAD", "--", "kitegreen")
    return {
        "commit": git("rev-parse", "--short", "HEAD"),
        "uncommitted": hashlib.sha1(diff.encode()).hexdigest()[:10] if diff else "",
    }


def _version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "?"


def _progress(r: dict[str, Any]) -> None:
    if "error" in r:
        print(
            f"  {r['server']:<19} {r['method']:<4} {r['wire']:<15} {r['conns']:>4}c  "
            f"ERROR {r['error']}",
            flush=True,
        )
        return
    flag = f"  errors={r['errors']}" if r.get("errors") else ""
    if r.get("refused"):
        flag += f"  refused {r['refused_rps']:,.0f}/s"
    print(
        f"  {r['server']:<19} {r['method']:<4} {r['wire']:<15} {r['conns']:>4}c "
        f"{r['rps']:>9,.0f} req/s  p50 {r['p50_us']:>7,.0f} us  p99 {r['p99_us']:>8,.0f} us  "
        f"srv cpu {r['server_cpu_util']:.0%} (steal {r['server_core_steal']:.0%})  "
        f"lg cpu {r['cpu_util']:.0%}{flag}",
        flush=True,
    )


# -- summary --------------------------------------------------------------------------------


def summarise(results: dict[str, Any]) -> dict[str, Any]:
    """Medians per cell, idle RSS and start-up per server."""
    cells: dict[str, dict[str, Any]] = {}
    for r in results["runs"]:
        key = f"{r['server']}|{r['method']}|{r['wire']}|{r['conns']}"
        cell = cells.setdefault(
            key,
            {
                "rps": [],
                "p50_us": [],
                "p99_us": [],
                "errors": 0,
                "failed": 0,
                "server_cpu": [],
                "loadgen_cpu": [],
                "cpu_us": [],
                "cpu_user_us": [],
                "cpu_sys_us": [],
                "refused_rps": [],
            },
        )
        if "error" in r:
            cell["failed"] += 1
            continue
        cell["rps"].append(r["rps"])
        cell["p50_us"].append(r["p50_us"])
        cell["p99_us"].append(r["p99_us"])
        cell["server_cpu"].append(r["server_cpu_util"])
        cell["loadgen_cpu"].append(r["cpu_util"])
        cell["cpu_us"].append(r["server_cpu_us_per_req"])
        # Absent from results recorded before the split was.
        cell["cpu_user_us"].append(r.get("server_cpu_user_us_per_req", float("nan")))
        cell["cpu_sys_us"].append(r.get("server_cpu_sys_us_per_req", float("nan")))
        cell["refused_rps"].append(r.get("refused_rps", 0.0))
        cell["errors"] += r["errors"]
    medians = {
        key: {
            "rps": _median(c["rps"]),
            "p50_us": _median(c["p50_us"]),
            "p99_us": _median(c["p99_us"]),
            "errors": c["errors"],
            "failed": c["failed"],
            "server_cpu": _median(c["server_cpu"]),
            "loadgen_cpu": _median(c["loadgen_cpu"]),
            "server_cpu_us_per_req": _median(c["cpu_us"]),
            "server_cpu_user_us_per_req": _median(c["cpu_user_us"]),
            "server_cpu_sys_us_per_req": _median(c["cpu_sys_us"]),
            "refused_rps": _median(c["refused_rps"]),
            "rps_spread": (max(c["rps"]) - min(c["rps"])) / _median(c["rps"])
            if len(c["rps"]) > 1 and _median(c["rps"])
            else 0.0,
        }
        for key, c in cells.items()
    }
    rss: dict[str, float] = {}
    for name in results["plan"]["servers"]:
        vals = [
            m["per_conn_kb"]
            for m in results["idle_rss"]
            if m["server"] == name and "per_conn_kb" in m
        ]
        if vals:
            rss[name] = _median(vals)
    start: dict[str, float] = {}
    for name in results["plan"]["servers"]:
        vals = [s["ms"] for s in results["startup"] if s["server"] == name]
        if vals:
            start[name] = _median(vals)
    steal = [r["server_core_steal"] for r in results["runs"] if "server_core_steal" in r]
    noise = {
        "server_core_steal_median": _median(steal),
        "server_core_steal_max": max(steal, default=float("nan")),
        "rps_spread_median": _median([m["rps_spread"] for m in medians.values()]),
    }
    return {"cells": medians, "idle_rss_kb_per_conn": rss, "startup_ms": start, "noise": noise}


def _median(values: list[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def markdown(results: dict[str, Any], summary: dict[str, Any]) -> str:
    plan = results["plan"]
    cells = summary["cells"]
    lines = []
    head = "| method | wire | server |"
    rule = "|---|---|---|"
    for c in plan["conns"]:
        head += f" {c} conn req/s | p50 µs | p99 µs |"
        rule += "---:|---:|---:|"
    lines += [head, rule]
    for method in plan["methods"]:
        for wire in plan["wires"]:
            for name in plan["servers"]:
                row = f"| {method} | {wire} | {name} |"
                for c in plan["conns"]:
                    m = cells.get(f"{name}|{method}|{wire}|{c}")
                    if m is None or m["rps"] != m["rps"]:
                        row += " failed | | |"
                        continue
                    bad = " ⚠" if m["errors"] or m["failed"] else ""
                    if m.get("refused_rps"):
                        bad += f" (+{m['refused_rps']:,.0f} refused)"
                    row += f" {m['rps']:,.0f}{bad} | {m['p50_us']:,.0f} | {m['p99_us']:,.0f} |"
                lines.append(row)
    lines.append("")
    lines.extend(cpu_table(plan, cells))
    lines.append("")
    lines.append(
        "| server | idle RSS per connection (KB, "
        f"{plan['idle_connections']} held) | start-up to first ping (ms) |"
    )
    lines.append("|---|---:|---:|")
    for name in plan["servers"]:
        r = summary["idle_rss_kb_per_conn"].get(name, float("nan"))
        s = summary["startup_ms"].get(name, float("nan"))
        lines.append(f"| {name} | {r:.1f} | {s:.0f} |")
    lines.append("")
    lines.extend(targets(results, summary))
    lines.extend(scaling(results, summary))
    ceiling = results["ceiling"]
    busiest = max((m["loadgen_cpu"] for m in cells.values() if m["loadgen_cpu"] > 0), default=0.0)
    lines.append("")
    util = ceiling.get("cpu_util", 0)
    implied = ceiling.get("rps", 0) / util if util else 0.0
    lines.append(
        f"Load generator ceiling (C null server, 50 connections, ping): "
        f"{ceiling.get('rps', 0):,.0f} req/s at {util:.0%} of its core "
        f"(so about {implied:,.0f} req/s at 100%); busiest load-generator core during "
        f"the runs: "
        f"{busiest:.0%}."
    )
    noise = summary["noise"]
    lines.append(
        f"Noise: CPU stolen from the server core by the hypervisor: median "
        f"{noise['server_core_steal_median']:.1%}, worst "
        f"{noise['server_core_steal_max']:.1%}; median spread of req/s across rounds "
        f"(max-min)/median: "
        f"{noise['rps_spread_median']:.0%}."
    )
    for f in results.get("start_failures", []):
        lines.append(
            f"**{f['server']} ({f['wire']}, round {f['round']}) did not start**: "
            f"{f['error'].splitlines()[0]}"
        )
    before, after = results["source_before"], results["source_after"]
    dirty = f" + uncommitted changes {before['uncommitted']}" if before["uncommitted"] else ""
    lines.append(
        f"kitegreen: commit {before['commit']}{dirty}"
        + (
            ""
            if before == after
            else f"; **the source changed during the run** (now {after['commit']}"
            f"{' + ' + after['uncommitted'] if after['uncommitted'] else ''}): "
            "rounds measured different code"
        )
        + "."
    )
    lines.append(
        (f"Paced at {plan['rate']:,.0f} requests a second. " if plan.get("rate") else "")
        + f"Rounds: {plan['rounds']}, warmup {plan['warmup']:g} s, measure "
        f"{plan['duration']:g} s, pinned: {results['pinned']}, load average before/after: "
        f"{' '.join(results['loadavg_before'])} / {' '.join(results['loadavg_after'])}, "
        f"wall {results['wall_s']:g} s."
    )
    return "\n".join(lines)


def cpu_table(plan: dict[str, Any], cells: dict[str, Any]) -> list[str]:
    """Server CPU µs per request: what each request costs, whatever else ran on the machine."""
    cols = [(m, w) for m in plan["methods"] for w in plan["wires"]]
    lines: list[str] = []
    for conns in [c for c in plan["conns"] if c > 1]:
        lines += [
            f"Server CPU µs per request at {conns} connections (lower is better):",
            "",
            "| server | " + " | ".join(f"{m} {w}" for m, w in cols) + " |",
            "|---|" + "---:|" * len(cols),
        ]
        for name in plan["servers"]:
            row = f"| {name} |"
            for m, w in cols:
                cell = cells.get(f"{name}|{m}|{w}|{conns}")
                row += f" {cell['server_cpu_us_per_req']:.1f} |" if cell else " |"
            lines.append(row)
        lines.append("")
    return lines


def targets(results: dict[str, Any], summary: dict[str, Any]) -> list[str]:
    """The issue's targets, checked against the medians.

    The subject is ``kitegreen-unlimited`` when it ran (with the QPS limit on, a fast machine
    measures the limit, and refused requests even make CPU per request look cheaper), else
    ``kitegreen``.
    """
    plan = results["plan"]
    cells = summary["cells"]
    subject = "kitegreen-unlimited" if "kitegreen-unlimited" in plan["servers"] else "kitegreen"
    peers = [s for s in plan["servers"] if s not in servers.KITEGREEN]
    if subject not in plan["servers"]:
        return []
    out = [
        f"Targets, for {subject}:",
        "",
        "| target | method | wire | kitegreen | reference | ratio | verdict |",
        "|---|---|---|---:|---:|---:|---|",
    ]

    def cell(name: str, method: str, wire: str, conns: int) -> dict[str, Any] | None:
        m = cells.get(f"{name}|{method}|{wire}|{conns}")
        return m if m is not None and m["rps"] == m["rps"] else None

    def cpu(c: dict[str, Any]) -> float:
        return float(c["server_cpu_us_per_req"])

    def row(
        target: str, method: str, wire: str, ours: str, ref: str, ratio: float, ok: bool
    ) -> None:
        out.append(
            f"| {target} | {method} | {wire} | {ours} | {ref} | {ratio:.2f}x | {_verdict(ok)} |"
        )

    def cpu_row(
        target: str, method: str, wire: str, ours: dict[str, Any], ref: dict[str, Any], most: float
    ) -> None:
        """A row comparing CPU per request: ``ours`` at most ``most`` times ``ref``'s."""
        ratio = cpu(ours) / cpu(ref)
        row(target, method, wire, f"{cpu(ours):.1f} µs", f"{cpu(ref):.1f} µs", ratio, ratio <= most)

    # Paced cells answer another question than saturated ones (see DELAYED_ACK_US): say so.
    rate = float(plan.get("rate") or 0.0)
    paced = f", paced at {rate:,.0f} req/s" if rate else ""
    growth: list[str] = []
    for method in plan["methods"]:
        for wire in plan["wires"]:
            kg50 = cell(subject, method, wire, 50)
            best = max(
                (c for p in peers if (c := cell(p, method, wire, 50))),
                key=lambda c: c["rps"],
                default=None,
            )
            if kg50 and best and wire.startswith("compact"):
                ratio = kg50["rps"] / best["rps"]
                row(
                    f"compact, 50 conns: req/s ≥ {TARGET_VS_BEST_50}x best peer",
                    method,
                    wire,
                    f"{kg50['rps']:,.0f}",
                    f"{best['rps']:,.0f}",
                    ratio,
                    ratio >= TARGET_VS_BEST_50,
                )
            binary = cell(subject, method, "binary-buffered", 50)
            if kg50 and binary and wire.startswith("compact"):
                cpu_row(
                    "compact CPU/req within 15% of binary's (50 conns)",
                    method,
                    wire,
                    kg50,
                    binary,
                    1.15,
                )
            for conns in (50, 500):
                kg = cell(subject, method, wire, conns)
                thr = cell("thriftpy2-threaded", method, wire, conns)
                if kg and thr:
                    cpu_row(f"{conns} conns: CPU/req ≤ threaded's", method, wire, kg, thr, 1.0)
            for conns, most in TARGET_GROWTH.items():
                many = cell(subject, method, wire, conns)
                if kg50 and many:
                    target = f"{conns} conns: CPU/req ≤ {most:.2f}x its own at 50{paced}"
                    cpu_row(target, method, wire, many, kg50, most)
                    if many["server_cpu_user_us_per_req"] == many["server_cpu_user_us_per_req"]:
                        # (nan in results recorded before the split was)
                        growth.append(_split_growth(method, wire, conns, kg50, many, rate))
            kg500 = cell(subject, method, wire, 500)
            thr500 = cell("thriftpy2-threaded", method, wire, 500)
            if kg500 and thr500:
                ratio = kg500["p99_us"] / thr500["p99_us"]
                row(
                    "500 conns: p99 ≤ threaded's",
                    method,
                    wire,
                    f"{kg500['p99_us']:,.0f} µs",
                    f"{thr500['p99_us']:,.0f} µs",
                    ratio,
                    ratio <= 1.0,
                )
    rss = summary["idle_rss_kb_per_conn"].get(subject)
    if rss is not None:
        out.append(
            f"| idle RSS ≤ {TARGET_RSS_KB:g} KB/conn | | | {rss:.1f} KB | | | "
            f"{_verdict(rss <= TARGET_RSS_KB)} |"
        )
    start = summary["startup_ms"].get(subject)
    if start is not None:
        out.append(
            f"| start-up < {TARGET_START_MS:g} ms | | | {start:.0f} ms | | | "
            f"{_verdict(start < TARGET_START_MS)} |"
        )
    if growth:
        out += ["", "Growth against 50 connections, user space and kernel apart:", "", *growth]
    return out


def _split_growth(
    method: str, wire: str, conns: int, few: dict[str, Any], many: dict[str, Any], rate: float
) -> str:
    """One line: how CPU per request grew, in user space and in the kernel (ratios of the
    medians, as the targets table's), each connection's send interval, and a cell that fell
    short of its pace."""

    def ratio(key: str) -> float:
        return many[key] / few[key] if few[key] else float("nan")

    # A connection has one request in flight: it sends once every conns / rps seconds.
    interval_us = conns / many["rps"] * 1e6 if many["rps"] else float("nan")
    line = (
        f"- {method} {wire}, {conns} conns: user space {many['server_cpu_user_us_per_req']:.2f} "
        f"µs ({ratio('server_cpu_user_us_per_req'):.2f}x), kernel "
        f"{many['server_cpu_sys_us_per_req']:.2f} µs ({ratio('server_cpu_sys_us_per_req'):.2f}x); "
        f"each connection sends every {interval_us / 1000:.1f} ms"
    )
    if interval_us >= DELAYED_ACK_US:
        line += (
            ", at or past TCP's 40 ms least ACK timeout, where more requests are acknowledged "
            "by segments of their own (conns.py's split study counts them)"
        )
    if rate and many["rps"] < 0.98 * rate:
        line += f"; **short of its pace**: {many['rps']:,.0f} of {rate:,.0f} req/s"
    return line


def scaling(results: dict[str, Any], summary: dict[str, Any]) -> list[str]:
    """kitegreen's req/s by worker count against one worker's: the issue's scaling target is at
    least 0.8 x N times one worker's req/s with N workers."""
    plan = results["plan"]
    variants = sorted(
        (s for s in plan["servers"] if s == "kitegreen" or s.startswith("kitegreen-w")),
        key=worker_count,
    )
    if len(variants) < 2 or "kitegreen" not in variants:
        return []
    out = [
        "",
        f"Scaling (target: N workers >= {TARGET_SCALING} x N x one worker's req/s; "
        f"{plan.get('loadgens', 1)} load generator(s), "
        + (
            f"server on cores {results['cores']['server']}, load generators on "
            f"{', '.join(results['cores']['loadgens'])}"
            if results.get("pinned")
            else "unpinned: the server and the load generators share every core"
        )
        + "):",
        "",
        "| method | wire | conns | "
        + " | ".join(f"{worker_count(v)} worker(s)" for v in variants)
        + " |",
        "|---|---|---:|" + "---:|" * len(variants),
    ]
    cells = summary["cells"]
    for method in plan["methods"]:
        for wire in plan["wires"]:
            for conns in plan["conns"]:
                one = cells.get(f"kitegreen|{method}|{wire}|{conns}")
                if one is None or one["rps"] != one["rps"]:
                    continue
                row = f"| {method} | {wire} | {conns} |"
                for variant in variants:
                    cell = cells.get(f"{variant}|{method}|{wire}|{conns}")
                    if cell is None or cell["rps"] != cell["rps"]:
                        row += " failed |"
                        continue
                    n = worker_count(variant)
                    ratio = cell["rps"] / one["rps"] if one["rps"] else float("nan")
                    verdict = "" if n == 1 else f" ({ratio:.2f}x, {_verdict(ratio >= 0.8 * n)})"
                    row += f" {cell['rps']:,.0f}{verdict} |"
                out.append(row)
    return out


def _verdict(ok: bool) -> str:
    return "pass" if ok else "**FAIL**"


# -- command line ---------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: 1 round, 1 s per cell, 50 and 500 connections only",
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=3.0, help="seconds measured per cell")
    parser.add_argument("--warmup", type=float, default=3.0, help="seconds of warmup per cell")
    parser.add_argument(
        "--servers",
        default=",".join(servers.SERVERS),
        help="comma-separated; also: " + ", ".join(servers.EXTRA_SERVERS),
    )
    parser.add_argument(
        "--wires",
        default=",".join(servers.WIRES),
        help="comma-separated; also: " + ", ".join(servers.EXTRA_WIRES) + " (header wires: "
        "kitegreen only)",
    )
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--conns", default=",".join(map(str, CONNS)))
    parser.add_argument(
        "--idle-connections",
        type=int,
        default=IDLE_CONNECTIONS,
        help="connections held open for the memory check; 0 skips it",
    )
    parser.add_argument("--no-pin", action="store_true", help="do not pin with taskset")
    parser.add_argument(
        "--workers",
        default="1",
        help="kitegreen's worker counts, comma-separated (1,2,4,8): one server variant each",
    )
    parser.add_argument(
        "--rate",
        type=float,
        default=0.0,
        help="pace every cell at this many requests a second (default: as many as the server "
        "answers); cells compared at one rate do the same work at the same pace",
    )
    parser.add_argument(
        "--loadgens",
        type=int,
        default=1,
        help="load-generator processes per cell, the connections split between them",
    )
    args = parser.parse_args(argv)
    try:
        worker_counts = sorted({int(w) for w in args.workers.split(",")})
    except ValueError:
        parser.error(f"--workers takes counts such as 1,2,4, got {args.workers!r}")
    if worker_counts[0] < 1 or worker_counts[-1] > 64 or not 1 <= args.loadgens <= 64:
        parser.error("worker counts and --loadgens must be between 1 and 64")

    names = _names(args.servers, servers.SERVERS + servers.EXTRA_SERVERS, "server")
    if "kitegreen" in names:
        at = names.index("kitegreen")
        variants = ["kitegreen" if n == 1 else f"kitegreen-w{n}" for n in worker_counts]
        names[at : at + 1] = variants
    plan = Plan(
        servers=tuple(names),
        wires=tuple(_names(args.wires, servers.WIRES + servers.EXTRA_WIRES, "wire")),
        methods=tuple(_names(args.methods, METHODS, "method")),
        conns=tuple(int(c) for c in args.conns.split(",")),
        rounds=args.rounds,
        warmup=args.warmup,
        duration=args.duration,
        idle_connections=args.idle_connections,
        loadgens=args.loadgens,
        rate=args.rate,
    )
    peers = [n for n in plan.servers if not n.startswith("kitegreen")]
    if peers and set(plan.wires) & set(servers.HEADER_WIRES):
        parser.error(f"only kitegreen serves the header wires; not {', '.join(peers)}")
    if args.quick:
        plan.rounds, plan.warmup, plan.duration = 1, 0.5, 1.0
        if args.conns == ",".join(map(str, CONNS)):
            plan.conns = (50, 500)
    if not 1 <= plan.rounds <= 20 or not 0 < plan.duration <= 120 or not 0 <= plan.warmup <= 120:
        parser.error("rounds must be 1-20, duration 0-120 s, warmup 0-120 s")
    if plan.rate and not 1 <= plan.rate <= 1e8:
        parser.error("--rate must be 0 (unpaced) or 1 to 100,000,000 requests a second")
    if any(not 1 <= c <= 5000 for c in plan.conns):
        parser.error("connection counts must be between 1 and 5000")

    server_cores = max(worker_count(name) for name in plan.servers)
    pin = can_pin(server_cores, plan.loadgens) and not args.no_pin
    if pin:
        set_cores(server_cores, plan.loadgens)
    else:
        print(
            f"warning: not pinning (needs taskset and {server_cores + plan.loadgens} cores: "
            f"{server_cores} for the server, one per load generator); numbers will be noisier",
            file=sys.stderr,
        )
    raise_nofile(max(plan.idle_connections, *plan.conns) + 256)
    build_loadgen()
    if "gunicorn-thrift" in plan.servers:
        ensure_gunicorn_venv()

    results = run(plan, pin)
    summary = results["summary"] = summarise(results)
    RESULTS.mkdir(exist_ok=True)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    path = RESULTS / f"{stamp}{'-quick' if args.quick else ''}.json"
    path.write_text(json.dumps(results, indent=1, default=str) + "\n")
    print()
    print(markdown(results, summary))
    print(f"\nraw results: {path.relative_to(HERE.parent)}")
    return 0


def _names(text: str, known: tuple[str, ...], what: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        sys.exit(
            f"run.py: unknown {what} {', '.join(unknown) or '(none)'}; known: {', '.join(known)}"
        )
    return names


if __name__ == "__main__":
    sys.exit(main())
