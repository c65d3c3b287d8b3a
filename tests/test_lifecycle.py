"""A server process's life, through the launcher: what it keeps in memory once large messages
have passed, and what its clients see when it is stopped under load."""

from __future__ import annotations

import errno
import resource
import signal
import socket
import time
from dataclasses import dataclass, field
from typing import Any

import gevent
import pytest
from conftest import TESTS, testsvc_thrift, wait_until
from gevent import monkey
from gevent.event import Event
from test_launcher import QUIET, TARGET, Launcher, launcher_env
from wire import encode

from kitegreen.codec import _thrift

# Every test starts the launcher as a subprocess: slow.
pytestmark = [pytest.mark.timeout(60), pytest.mark.slow]

MIB = 1 << 20


def vm_kb(pid: int, key: str) -> int:
    with open(f"/proc/{pid}/status", encoding="ascii") as status:
        for line in status:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise AssertionError(f"no {key} in /proc/{pid}/status")


def read_exactly(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(min(n - len(data), 1 << 20))
        if not chunk:
            break
        data += chunk
    return data


def reply_to(method: str, seqid: int, **result: Any) -> bytes:
    """The exact reply bytes kitegreen sends (binary, buffered), for a byte-for-byte check."""
    cls = getattr(testsvc_thrift.TestService, f"{method}_result")
    return _thrift.write_message(
        _thrift.BINARY, method, 2, seqid, cls(**result), _thrift.compile(cls), False
    )


class TestMemory:
    def test_idle_memory_returns_to_baseline_after_large_messages(self):
        """20 connections each carry one 12 MiB echo, then sit idle: the server's resident
        memory comes back to within 16 MiB of where it was (it held +522 MB before the
        connection dropped its buffers and the launcher pinned malloc's mmap threshold)."""
        with Launcher(TARGET, *QUIET) as server:
            address = server.address()
            small = encode("binary", "echo_binary", data=b"x")
            big = encode("binary", "echo_binary", data=b"z" * (12 * MIB))
            big_reply = reply_to("echo_binary", 1, success=b"z" * (12 * MIB))
            conns = [socket.create_connection(address, timeout=10) for _ in range(20)]
            try:
                for conn in conns:
                    conn.sendall(small)
                    assert read_exactly(conn, len(reply_to("echo_binary", 1, success=b"x")))
                baseline = vm_kb(server.proc.pid, "VmRSS")
                for conn in conns:
                    conn.sendall(big)
                    assert read_exactly(conn, len(big_reply)) == big_reply

                # The last reply is read whole, so the server is back to waiting; its
                # greenlets may still be running their ends of the calls.
                def kept_mb() -> float:
                    return (vm_kb(server.proc.pid, "VmRSS") - baseline) / 1024

                wait_until(
                    lambda: kept_mb() < 16,
                    3.0,
                    interval=0.05,
                    what=lambda: (
                        "resident memory back within 16 MB of where it was; 20 idle "
                        f"connections kept {kept_mb():.0f} MB after 12 MiB echoes"
                    ),
                )
            finally:
                for conn in conns:
                    conn.close()


@dataclass
class LoadClient:
    """One keep-alive connection calling add() in a loop until the server ends it, checking
    each reply byte for byte. ``pipeline`` requests are sent before their replies are read."""

    address: tuple[str, int]
    pipeline: int = 1
    replies: int = 0
    ending: str = ""
    """How the connection ended: "eof" (clean, at a reply boundary), or what went wrong."""
    started: Event = field(default_factory=Event)

    def run(self) -> None:
        seqid = 0
        try:
            sock = socket.create_connection(self.address, timeout=10)
        except OSError as exc:
            self.ending = f"connect failed: {exc}"
            return
        with sock:
            while True:
                batch = []
                for _ in range(self.pipeline):
                    seqid += 1
                    batch.append(seqid)
                try:
                    sock.sendall(b"".join(encode("binary", "add", s, a=s, b=1) for s in batch))
                except OSError as exc:
                    # A send into a connection the server has closed with a FIN is not an
                    # error yet: what the next read returns decides.
                    if exc.errno == errno.ECONNRESET:
                        self.ending = "reset on send"
                        return
                for s in batch:
                    expected = reply_to("add", s, success=s + 1)
                    try:
                        got = read_exactly(sock, len(expected))
                    except ConnectionResetError:
                        self.ending = "reset"
                        return
                    except OSError as exc:
                        self.ending = f"error: {exc}"
                        return
                    if not got:
                        self.ending = "eof"
                        return
                    if got != expected:
                        self.ending = f"half or wrong reply: {got[:40]!r}"
                        return
                    self.replies += 1
                    self.started.set()


class TestStopUnderLoad:
    @pytest.mark.parametrize("pipeline", [1, 3], ids=["one-at-a-time", "pipelined-by-3"])
    def test_sigterm_under_keep_alive_load_loses_nothing(self, pipeline):
        """23 keep-alive connections calling in a loop, then SIGTERM: every connection ends with
        a clean end-of-stream at a reply boundary (no reset, no half reply), every request the
        server handled was answered (its access log counts the calls, the clients count the
        replies), and the launcher exits 0."""
        env = launcher_env(KITE_ACCESS_LOG="true", KITE_LOG_FORMAT="json")
        with Launcher(TARGET, *QUIET, "--exit-wait-time", "5", env=env) as server:
            address = server.address()
            clients = [LoadClient(address, pipeline=pipeline) for _ in range(23)]
            greenlets = [gevent.spawn(c.run) for c in clients]
            for client in clients:
                assert client.started.wait(10), "a client got no reply before the stop"
            # Every connection calling at the moment of the signal: each has had a reply since
            # the last one started.
            marks = [c.replies for c in clients]
            wait_until(
                lambda: all(c.replies > m for c, m in zip(clients, marks, strict=True)),
                5.0,
                what="a reply on every connection once all had started",
            )
            server.proc.send_signal(signal.SIGTERM)
            assert server.wait(timeout=15) == 0, server.output()
            gevent.joinall(greenlets, timeout=10)
            handled = sum(
                1 for e in server.events() if e.get("event") == "access" and e["method"] == "add"
            )
        endings = [c.ending for c in clients]
        assert endings == ["eof"] * len(clients), endings
        assert sum(c.replies for c in clients) == handled


def test_stop_refuses_new_connections_only_after_drain_time():
    """--drain-time 1: after SIGTERM the server keeps accepting and serving for a second
    (clients that find it through Consul are still arriving), then refuses."""
    with Launcher(TARGET, *QUIET, "--drain-time", "1", "--exit-wait-time", "2") as server:
        address = server.address()
        server.proc.send_signal(signal.SIGTERM)
        assert server.wait_for_event("stopping")["drain_time"] == 1.0
        signalled = time.monotonic()
        expected = reply_to("add", 1, success=5)
        with socket.create_connection(address, timeout=2) as sock:
            sock.sendall(encode("binary", "add", 1, a=2, b=3))
            assert read_exactly(sock, len(expected)) == expected
        assert time.monotonic() - signalled < 1.0
        assert server.wait(timeout=10) == 0
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(address, timeout=2).close()


WAVE = 1500
"""Connections cut by the idle timeout in the same second, in the wave test."""


def raise_descriptor_limit(needed: int) -> tuple[int, int]:
    """Raise the soft limit on open descriptors to ``needed`` (the launched server inherits
    it); return the limits to restore. Skips when the hard limit is lower."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < needed:
        if hard != resource.RLIM_INFINITY and hard < needed:
            pytest.skip(f"needs {needed} open descriptors; the hard limit is {hard}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))
    return soft, hard


def summary(seconds: list[float]) -> str:
    """``n, p50, p99, max`` of sorted latencies, in milliseconds."""
    if not seconds:
        return "none"
    at = [seconds[min(int(len(seconds) * q), len(seconds) - 1)] * 1000 for q in (0.5, 0.99)]
    return (
        f"{len(seconds)}, p50 {at[0]:.2f} ms, p99 {at[1]:.2f} ms, max {seconds[-1] * 1000:.2f} ms"
    )


class TestIdleTimeoutWave:
    def test_1500_connections_cut_in_the_same_second_do_not_stall_a_busy_client(self):
        """1,500 connections go idle in the same second and are cut by the idle timeout:
        every one is closed within a bound, and a client pinging on another connection
        throughout is never held up for more than 100 ms (it was 11-17 ms at p99 when every
        connection was cut in the same loop iteration; the figures are printed)."""
        idle_timeout = 2.0
        limits = raise_descriptor_limit(WAVE + 256)
        poll_type = monkey.get_original("select", "poll")
        held: dict[int, socket.socket] = {}
        latencies: list[tuple[float, float]] = []  # (when, seconds), measured
        try:
            with Launcher(
                TARGET, *QUIET, "--idle-timeout", str(idle_timeout), env=launcher_env()
            ) as launcher:
                address = launcher.address()
                expected = reply_to("ping", 1)
                request = encode("binary", "ping")
                measuring = Event()
                done = Event()

                def ping_loop() -> None:
                    with socket.create_connection(address, timeout=5.0) as sock:
                        while not done.is_set():
                            started = time.perf_counter()
                            sock.sendall(request)
                            assert read_exactly(sock, len(expected)) == expected
                            if measuring.is_set():
                                took = time.perf_counter() - started
                                latencies.append((time.monotonic() - opened_at, took))
                            gevent.sleep(0.001)

                pinger = gevent.spawn(ping_loop)
                # Open the wave as fast as possible: they all start waiting within a second.
                opened_at = time.monotonic()
                for _ in range(WAVE):
                    sock = socket.create_connection(address, timeout=5.0)
                    held[sock.fileno()] = sock
                opened_in = time.monotonic() - opened_at
                assert opened_in < idle_timeout, f"opening took {opened_in:.2f}s"
                measuring.set()
                # Watch every held connection for its end with one poll a round. They are
                # read and closed only at the end: doing it here would put a wave of work of
                # the test's own in front of the pinger, which shares this process.
                poller = poll_type()
                for fd in held:
                    poller.register(fd, 0x001)  # POLLIN: readable, end-of-stream included
                ended: list[int] = []
                closed_at: list[float] = []
                deadline = time.monotonic() + idle_timeout + 10.0
                while len(ended) < WAVE and time.monotonic() < deadline and not pinger.dead:
                    for fd, _ in poller.poll(0):
                        poller.unregister(fd)
                        ended.append(fd)
                        closed_at.append(time.monotonic() - opened_at)
                    gevent.sleep(0.02)
                measuring.clear()
                done.set()
                pinger.join(timeout=5.0)
                assert pinger.successful(), pinger.exception
                for fd in ended:
                    sock = held.pop(fd)
                    sock.setblocking(False)
                    assert sock.recv(1) == b"", "an idle connection was sent bytes"
                    sock.close()
        finally:
            for sock in held.values():
                sock.close()
            resource.setrlimit(resource.RLIMIT_NOFILE, limits)
        assert not held, f"{len(held)} of {WAVE} connections never closed"
        # The figures before the cut are the machine's noise, for comparison.
        calm = sorted(took for when, took in latencies if when < closed_at[0] - 0.1)
        cutting = sorted(
            took for when, took in latencies if closed_at[0] - 0.1 <= when <= closed_at[-1] + 0.1
        )
        print(
            f"\n{WAVE} cut between {closed_at[0]:.2f}s and {closed_at[-1]:.2f}s after opening "
            f"(opened in {opened_in:.2f}s); pings before the cut: {summary(calm)}; "
            f"while cutting: {summary(cutting)}"
        )
        # Cut after idle_timeout, within a sweep interval and the spreading of the closes.
        assert closed_at[0] >= idle_timeout - 0.1
        assert closed_at[-1] < opened_in + idle_timeout + 3.0
        assert cutting, "no ping was answered while the connections were cut"
        assert cutting[-1] < 0.1, f"a ping waited {cutting[-1] * 1000:.0f} ms"


STARVED = "hub stalled: the process did not run"

REAL_SLEEP_TARGET = """\
from gevent import monkey
from service import LoggingHandler, testsvc_thrift

import kitegreen

real_sleep = monkey.get_original("time", "sleep")


class Sleeping(LoggingHandler):
    def block_hub(self, seconds):
        real_sleep(seconds)  # not gevent's: nothing else runs meanwhile


server = kitegreen.RpcServer(
    testsvc_thrift.TestService,
    Sleeping(),
    kitegreen.Config(service_name="launcher-test", host="127.0.0.1", port=0),
)
"""


class TestHubWatch:
    """The hub watch in a launched server (threshold 0.1 s, the default) tells a process that
    did not run from code that blocked it."""

    @staticmethod
    def call(address: tuple[str, int], method: str, **args: Any) -> None:
        request = encode("binary", method, **args)
        expected = reply_to(method, 1)
        with socket.create_connection(address, timeout=10.0) as sock:
            sock.sendall(request)
            assert read_exactly(sock, len(expected)) == expected

    def test_a_process_stopped_for_half_a_second_is_not_a_block(self):
        """SIGSTOP for 0.5 s, then SIGCONT: no "hub blocked" is logged (no code is blamed),
        a starvation line says what happened, and the server serves on."""
        with Launcher(TARGET, *QUIET) as launcher:
            address = launcher.address()
            self.call(address, "ping")
            launcher.proc.send_signal(signal.SIGSTOP)
            try:
                time.sleep(0.5)  # the stop being measured, not a wait for something
            finally:
                launcher.proc.send_signal(signal.SIGCONT)
            stalled = launcher.wait_for_event(STARVED, timeout=10.0)
            self.call(address, "ping")
            assert stalled["seconds"] >= 0.4
            assert stalled["cpu_seconds"] < 0.1
            assert launcher.named("hub blocked") == [], launcher.output()[-3000:]

    def test_a_real_sleep_in_a_handler_is_reported(self, tmp_path):
        """A handler calling the unpatched time.sleep blocks the hub while the process runs:
        "hub blocked" is logged with the handler's line on top of the stack."""
        (tmp_path / "sleeping.py").write_text(REAL_SLEEP_TARGET)
        env = launcher_env(PYTHONPATH=str(TESTS), PYTHONDONTWRITEBYTECODE="1")
        with Launcher(str(tmp_path / "sleeping.py") + ":server", *QUIET, env=env) as launcher:
            address = launcher.address()
            self.call(address, "block_hub", seconds=0.5)
            blocked = launcher.wait_for_event("hub blocked", timeout=10.0)
            assert blocked["seconds"] >= 0.3
            assert "sleeping.py" in blocked["where"], blocked
            assert "real_sleep(seconds)" in blocked["stack"]
