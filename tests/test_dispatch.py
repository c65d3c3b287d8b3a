"""The dispatcher's batches: jobs queued by read watchers run once each, in the iteration that
queued them, from start() to stop(); and a connection that outlives a stop is still served.

Real watchers on real sockets (Unix socket pairs), real servers on loopback.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Callable, Iterator
from typing import Any

import gevent
import gevent.event
import pytest
from clients import read_exactly
from conftest import loopback_config, wait_until
from service import Handler, testsvc_thrift
from wire import encode, wrap

import kitegreen
from kitegreen.rpc.dispatch import Dispatcher

pytestmark = pytest.mark.timeout(30)


class _Boom(BaseException):
    """Neither an Exception nor GreenletExit: what a job must never raise, yet might."""


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair()
    with a, b:
        a.setblocking(False)
        yield a, b


def _watch(
    dispatcher: Dispatcher, sock: socket.socket, runs: list[str], name: str
) -> tuple[Any, Callable[[Any], None]]:
    """A read watcher on ``sock`` that queues a job as a connection's does; the job reads what
    arrived and stops the watcher, as ``MessageStream.receive`` does."""
    watcher = gevent.get_hub().loop.io(sock.fileno(), 1)

    def job(_: Any) -> None:
        watcher.stop()
        runs.append(name)
        sock.recv(100)

    watcher.start(dispatcher.ready, (job, None))
    return watcher, job


class TestBatches:
    def test_nothing_runs_before_start_and_a_queued_job_runs_at_stop(
        self, pair: tuple[socket.socket, socket.socket]
    ) -> None:
        dispatcher = Dispatcher()
        ran = gevent.event.Event()
        dispatcher.ready((lambda _: ran.set(), None))
        assert not ran.wait(0.05), "ran before start()"
        dispatcher.stop()  # never started: it runs what is queued all the same
        assert ran.wait(5.0)
        dispatcher.close()

    def test_a_job_that_ends_its_worker_strands_none_queued_behind_it(
        self, pair: tuple[socket.socket, socket.socket]
    ) -> None:
        """A job raising something no job should (here a bare BaseException) ends its worker
        and surfaces in the hub; the jobs queued behind it in the same batch still run, once
        each: not left queued while their watchers, still armed, queue them again."""
        ours, theirs = pair
        dispatcher = Dispatcher()
        runs: list[str] = []

        def boom(_: Any) -> None:
            raise _Boom

        hub = gevent.get_hub()
        saved = hub.print_exception
        hub.print_exception = lambda *args: None  # type: ignore[method-assign]
        try:
            watcher, _ = _watch(dispatcher, ours, runs, "second")
            theirs.sendall(b"x")
            dispatcher.ready((boom, None))  # first in the batch the watcher joins
            dispatcher.start()
            # A second copy would be queued at the next poll and run in the same batch as the
            # first: by the time the first has run, both have.
            wait_until(lambda: runs, timeout=5.0, what="the job behind the failing one")
            assert runs == ["second"]
        finally:
            hub.print_exception = saved  # type: ignore[method-assign]
            watcher.close()
            dispatcher.stop()
            dispatcher.close()


class _SwallowsTheCutOff(Handler):
    """``slow`` waits; cut off at the end of a stop, it goes on cleaning up for a while."""

    def slow(self, seconds: float, message: str) -> str:
        try:
            gevent.sleep(seconds)
        except BaseException:  # the handler under test misbehaves on purpose
            gevent.sleep(1.5)  # outlives the stop's last wait (1 s) for connections to close
        return message


def test_a_connection_that_outlives_the_stop_is_still_served() -> None:
    """A handler that swallows the stop's cut-off keeps its connection open past the end of
    the stop; the call its client pipelined behind is still answered (the dispatcher runs
    until the last connection closes), not queued for ever."""
    server = kitegreen.RpcServer(
        testsvc_thrift.TestService, _SwallowsTheCutOff(), loopback_config(exit_wait_time=0.2)
    )
    server.set_close_timings(close_linger=0.05)
    server.start()
    with socket.create_connection(server.address, timeout=10.0) as sock:
        sock.sendall(wrap("framed", encode("binary", "slow", seconds=30.0, message="a")))
        wait_until(lambda: server.overload()["conn_busy"] == 1, timeout=5.0, what="the call")
        sock.sendall(wrap("framed", encode("binary", "echo", message="b")))
        server.stop(timeout=0.2)
        for method, value in (("slow", "a"), ("echo", "b")):
            (size,) = struct.unpack("!i", read_exactly(sock, 4))
            reply = read_exactly(sock, size)
            assert method.encode() in reply
            assert reply.endswith(value.encode() + b"\x00")
