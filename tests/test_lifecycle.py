"""A server process's life, through the launcher: what it keeps in memory once large messages
have passed, and what its clients see when it is stopped under load."""

from __future__ import annotations

import errno
import signal
import socket
import time
from dataclasses import dataclass, field
from typing import Any

import gevent
import pytest
from conftest import testsvc_thrift, wait_until
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
