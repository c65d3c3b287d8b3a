"""Many connections at once: each is answered in order, and an idle one holds no greenlet.

Between messages a connection holds only its socket, its read watcher and its state; warm
worker greenlets serve whichever connection has bytes (kitegreen/rpc/dispatch.py).
"""

from __future__ import annotations

import gc
import resource
import socket
import struct
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from typing import Any

import gevent.event
import pytest
from clients import read_exactly
from conftest import wait_until
from greenlet import greenlet
from service import Handler, testsvc_thrift
from thriftpy2.protocol.cybin import TCyBinaryProtocol
from thriftpy2.transport.memory import TCyMemoryBuffer
from wire import REPLY, encode, wrap

import kitegreen
from kitegreen.rpc.dispatch import KEEP_WARM

PIPELINED = 3
"""Calls each connection sends in one write before reading any reply."""


def _raise_fd_limit(needed: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= needed:
        return
    if hard != resource.RLIM_INFINITY and hard < needed:
        pytest.skip(f"needs {needed} file descriptors; the hard RLIMIT_NOFILE is {hard}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))


@pytest.fixture
def fd_limit() -> Iterator[Callable[[int], None]]:
    """``fd_limit(n)`` raises the soft RLIMIT_NOFILE to ``n`` (or skips); restored after."""
    before = resource.getrlimit(resource.RLIMIT_NOFILE)
    yield _raise_fd_limit
    resource.setrlimit(resource.RLIMIT_NOFILE, before)


def _connect_all(stack: ExitStack, address: tuple[str, int], count: int) -> list[socket.socket]:
    socks = []
    for _ in range(count):
        sock = stack.enter_context(socket.create_connection(address, timeout=30.0))
        socks.append(sock)
    return socks


def _read_reply(sock: socket.socket, method: str = "echo") -> tuple[int, int, Any]:
    """One framed binary reply to ``method``: ``(message type, seqid, returned value)``."""
    (size,) = struct.unpack("!i", read_exactly(sock, 4))
    proto = TCyBinaryProtocol(TCyMemoryBuffer(read_exactly(sock, size)))
    _, mtype, seqid = proto.read_message_begin()
    result = getattr(testsvc_thrift.TestService, f"{method}_result")()
    proto.read_struct(result)
    return mtype, seqid, result.success


class _Gated(Handler):
    """``slow`` waits until the test opens the gate (the server and the test share one hub)."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = gevent.event.Event()
        self.waiting = 0

    def slow(self, seconds: float, message: str) -> str:
        self.waiting += 1
        self.gate.wait(seconds)
        return message


def _live_greenlets() -> int:
    return sum(1 for o in gc.get_objects() if isinstance(o, greenlet) and not o.dead)


class TestManyConnections:
    def test_5000_connections_each_answered_in_order(
        self, make_server: Callable[..., kitegreen.RpcServer], fd_limit: Callable[[int], None]
    ) -> None:
        """5,000 connections held at once, each with calls pipelined in one write: every
        reply comes back on its own connection, in the order of its calls."""
        conns = 5000
        fd_limit(2 * conns + 500)  # both ends live in this process
        server = make_server(limit_connections=conns + 100, backlog=conns)
        deadline = time.monotonic() + 90.0
        with ExitStack() as stack:
            socks = _connect_all(stack, server.address, conns)
            wait_until(lambda: server.engine.connections == conns, timeout=30.0)
            for i, sock in enumerate(socks):
                calls = b"".join(
                    wrap("framed", encode("binary", "echo", seqid=k + 1, message=f"{i}.{k}"))
                    for k in range(PIPELINED)
                )
                sock.sendall(calls)
            for i, sock in enumerate(socks):
                replies = [_read_reply(sock) for _ in range(PIPELINED)]
                assert replies == [(REPLY, k + 1, f"{i}.{k}") for k in range(PIPELINED)]
                assert time.monotonic() < deadline, f"only {i} connections answered in 90 s"
            # Served by a few warm workers: none is held per connection.
            assert server.engine.greenlets() <= KEEP_WARM + 2

    @pytest.mark.timeout(120)
    def test_a_waiting_handler_holds_up_none_of_the_calls_that_arrived_with_it(
        self, make_server: Callable[..., kitegreen.RpcServer]
    ) -> None:
        """Calls that arrive together are served in one batch, one after another, by one
        worker: a handler among them that waits hands the rest of the batch to another worker.
        Here every other call waits (for a gate opened only once all the others are answered)
        and all of them are sent before the server runs: each of the others is answered while
        the waiting ones still wait (a call held up behind them would time out after 30 s).
        Behind each waiting call its connection pipelines another: it is answered after it, in
        order (a connection served by two workers at once would answer it first)."""
        handler = _Gated()
        server = make_server(handler=handler)
        with ExitStack() as stack:
            socks = _connect_all(stack, server.address, 40)
            wait_until(lambda: server.engine.connections == 40)
            waits, answers = socks[0::2], socks[1::2]
            # The server shares this hub: sendall() on a connected socket with room in its
            # buffer does not yield, so all 40 calls are on the wire before the server reads.
            for i, sock in enumerate(socks):
                if i % 2 == 0:
                    calls = wrap("framed", encode("binary", "slow", seconds=60.0, message=str(i)))
                    calls += wrap("framed", encode("binary", "echo", seqid=2, message=f"{i}b"))
                else:
                    calls = wrap("framed", encode("binary", "echo", message=str(i)))
                sock.sendall(calls)
            for i, sock in zip(range(1, 40, 2), answers, strict=True):
                assert _read_reply(sock) == (REPLY, 1, str(i))
            assert handler.waiting == len(waits)
            assert not handler.gate.is_set()
            handler.gate.set()
            for i, sock in zip(range(0, 40, 2), waits, strict=True):
                assert _read_reply(sock, "slow") == (REPLY, 1, str(i))
                assert _read_reply(sock) == (REPLY, 2, f"{i}b")

    def test_idle_connections_hold_no_greenlet(
        self, make_server: Callable[..., kitegreen.RpcServer]
    ) -> None:
        """500 connections that each made a call and now wait: the engine runs no more
        greenlets than its warm workers and background tasks, and each connection is still
        served when it calls again."""
        server = make_server()
        baseline = server.engine.greenlets()
        alive = _live_greenlets()
        with ExitStack() as stack:
            socks = _connect_all(stack, server.address, 500)
            for i, sock in enumerate(socks):
                sock.sendall(wrap("framed", encode("binary", "echo", message=str(i))))
            for i, sock in enumerate(socks):
                assert _read_reply(sock) == (REPLY, 1, str(i))
            wait_until(lambda: server.engine.overload()["conn_busy"] == 0)
            assert server.engine.connections == 500
            assert server.engine.greenlets() <= baseline + KEEP_WARM
            assert server.engine.greenlets() < 50
            # Counted independently of the engine's own account: every greenlet alive.
            assert _live_greenlets() <= alive + KEEP_WARM
            for i, sock in enumerate(socks):
                sock.sendall(wrap("framed", encode("binary", "echo", seqid=2, message=str(i))))
                assert _read_reply(sock) == (REPLY, 2, str(i))
