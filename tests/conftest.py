"""Shared fixtures: the test service, its handler, servers on loopback and real clients.

gevent patches the standard library first, as the launcher does, so that the blocking clients
(thriftpy2's and Apache Thrift's) yield to the in-process server instead of starving it.
"""

from __future__ import annotations

from gevent import monkey

monkey.patch_all()

import contextlib  # noqa: E402
import gc  # noqa: E402
import inspect  # noqa: E402
import io  # noqa: E402
import logging  # noqa: E402
import socket  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import tracemalloc  # noqa: E402
from collections.abc import Callable, Iterator  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import gevent  # noqa: E402
import pytest  # noqa: E402
import structlog  # noqa: E402

import kitegreen  # noqa: E402
from kitegreen.observability import logs  # noqa: E402

TESTS = Path(__file__).parent
sys.path.insert(0, str(TESTS / "gen_apache"))
sys.path.insert(0, str(TESTS))

from service import Handler, testsvc_thrift  # noqa: E402

__all__ = ["Handler", "can_connect", "loopback_config", "testsvc_thrift", "wait_until"]


def loopback_config(**overrides: Any) -> kitegreen.Config:
    """A config for tests: loopback, an ephemeral port, no debug server unless asked."""
    values: dict[str, Any] = {
        "host": "127.0.0.1",
        "port": 0,
        "enable_debug_server": False,
        "exit_wait_time": 5.0,
    }
    values.update(overrides)
    return kitegreen.Config(**values)


@pytest.fixture
def handler() -> Handler:
    return Handler()


@pytest.fixture
def make_server(handler: Handler) -> Iterator[Callable[..., kitegreen.RpcServer]]:
    """Factory: ``make_server(**config)`` starts a server on loopback; all are stopped after.
    ``close_linger=`` shortens how long its closing connections wait for their clients;
    ``handler=`` serves with another handler than the test's."""
    servers: list[kitegreen.RpcServer] = []

    def make(
        close_linger: float | None = None, handler: Handler = handler, **overrides: Any
    ) -> kitegreen.RpcServer:
        server = kitegreen.RpcServer(
            testsvc_thrift.TestService, handler, loopback_config(**overrides)
        )
        server.set_close_timings(close_linger=close_linger)
        server.start()
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.stop(timeout=2.0)


@pytest.fixture
def json_log_stream() -> Iterator[io.StringIO]:
    """kitegreen's JSON logs (structlog's and the standard library's) configured into a
    StringIO in this process; structlog's and the root logger's setup restored after."""
    saved = structlog.get_config()
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    stream = io.StringIO()
    logs.configure("json", "info", stream=stream)
    yield stream
    structlog.configure(**saved)
    root.handlers[:] = handlers
    root.setLevel(level)
    logging.captureWarnings(False)


@pytest.fixture
def server(make_server: Callable[..., kitegreen.RpcServer]) -> kitegreen.RpcServer:
    """A started server with default settings on 127.0.0.1."""
    return make_server()


def wait_until(
    predicate: Callable[[], Any],
    timeout: float = 5.0,
    interval: float = 0.01,
    *,
    what: str | Callable[[], str] | None = None,
) -> Any:
    """Poll ``predicate`` until it returns something truthy, and return that.

    Raises:
        AssertionError: ``timeout`` passed first; the message says what was awaited (``what``,
            a text or a callable giving one, read only then; by default the predicate's
            source) and the predicate's last value.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            awaited = what() if callable(what) else what or _source(predicate)
            raise AssertionError(
                f"timed out after {timeout:g} s waiting for {awaited} (last value: {value!r})"
            )
        gevent.sleep(interval)


def _source(predicate: Callable[[], Any]) -> str:
    """The code of ``predicate`` as written, for a timeout message."""
    try:
        text = inspect.getsource(predicate).strip()
    except (OSError, TypeError):
        return repr(predicate)
    start = text.find("lambda")
    return " ".join((text[start:] if start >= 0 else text).split())


class CpuTime:
    """The CPU time a :func:`cpu_time` block took, once it has ended."""

    seconds = 0.0


@contextlib.contextmanager
def cpu_time() -> Iterator[CpuTime]:
    """Measure the CPU time this thread spends in the block, with the cyclic GC held off.

    For a bound on work done ("refused at once, not after walking the count it announces"):
    wall time also counts the moments the scheduler gives the CPU to another process, and on a
    loaded 2-core machine one such moment outlasts a 10 ms bound; a collection of the test
    process's own objects is not the code's work either.
    """
    taken = CpuTime()
    collecting = gc.isenabled()
    gc.disable()
    started = time.thread_time()
    try:
        yield taken
    finally:
        taken.seconds = time.thread_time() - started
        if collecting:
            gc.enable()


def can_connect(address: tuple[str, int]) -> bool:
    """Whether a new connection to ``address`` is accepted right now."""
    try:
        with socket.create_connection(address, timeout=1.0):
            return True
    except OSError:
        return False


def assert_no_leak(work: Callable[[], object], *, settle: int = 500, rounds: int = 2000) -> None:
    """Fail if ``rounds`` calls of ``work`` leave 64 KiB or more behind (tracemalloc).

    Measured between two points after ``settle`` calls, so that caches filled once (by this
    test or an earlier one) are not counted: a leak grows with the rounds, a cache does not.
    """
    for _ in range(200):
        work()
    tracemalloc.start()
    try:
        for _ in range(settle):
            work()
        gc.collect()
        before, _ = tracemalloc.get_traced_memory()
        for _ in range(rounds):
            work()
        gc.collect()
        after, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert after - before < 64 * 1024, f"{after - before} bytes left behind by {rounds} rounds"
