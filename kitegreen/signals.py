"""Signal handlers that only request, and the stop they request of one server.

gevent calls a signal handler from its hub, where nothing may block; spawning is all the handler
does, and the action (stopping, draining, logging stacks, queueing a request for the arbiter)
runs as a greenlet like any other. The launcher's single process, the arbiter of
``--workers N`` and each worker install their actions through :func:`install_signal_handlers`;
the single process and each worker stop their server through one :class:`ServerStop`.
"""

from __future__ import annotations

import functools
import os
import signal
import sys
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Protocol

from kitegreen.exits import EXIT_UNCLEAN_STOP


def install_signal_handlers(actions: Mapping[signal.Signals, Callable[[], object]]) -> list[Any]:
    """Run ``actions[signum]`` in a new greenlet each time signal ``signum`` arrives.

    Returns:
        gevent's handles, whose ``cancel()`` restores the default handling.
    """
    import gevent

    return [gevent.signal_handler(sig, gevent.spawn, action) for sig, action in actions.items()]


def format_stacks() -> str:
    """Every greenlet's and thread's stack, as SIGUSR1 and SIGQUIT log them."""
    from gevent.util import format_run_info

    return "\n".join(format_run_info())


class Stoppable(Protocol):
    """What :class:`ServerStop` stops (an ``RpcServer``)."""

    def stop(self, timeout: float | None = None) -> bool: ...


class ServerStop:
    """Stopping one server on request: gracefully (it drains), or at once (SIGQUIT, Go's quit:
    the stacks logged, requests in flight cut off), which also cuts a graceful stop short.

    Args:
        server: returns the server to stop; None while it is not there yet (a worker still
            importing the application), when a graceful stop only takes note.
        log: a structlog logger.
        before: called at the start of either stop (a worker stops taking connections there,
            for the other workers' sake).
    """

    def __init__(
        self,
        server: Callable[[], Stoppable | None],
        log: Any,
        before: Callable[[], object] = lambda: None,
    ) -> None:
        self._server = server
        self._log = log
        self._before = before
        self.requested = False
        """Whether a stop was asked for."""
        self.quick = False
        """Whether it was asked to stop at once (the exit status is then 1)."""

    def graceful(self, reason: str, **fields: Any) -> None:
        """Stop the server and wait for its drain; runs in a greenlet of its own."""
        self.requested = True
        self._before()
        server = self._server()
        if server is not None:
            self._log.info(reason, **fields)
            server.stop()

    def at_once(self, reason: str, **fields: Any) -> None:
        """Log the stacks and stop without draining; leave the process at once if a graceful
        stop is already waiting (``stop()`` is idempotent: only that cuts the wait short)."""
        self._log.warning(reason, stack=format_stacks(), **fields)
        self.quick = True
        server = self._server()
        if self.requested or server is None:
            sys.stderr.flush()
            os._exit(EXIT_UNCLEAN_STOP)
        self.requested = True
        self._before()
        server.stop(timeout=0)

    def dump_stacks(self) -> None:
        """Log every greenlet's and thread's stack (SIGUSR1)."""
        self._log.info("greenlet and thread stacks", signal="SIGUSR1", stack=format_stacks())

    def actions(
        self, graceful: Iterable[signal.Signals]
    ) -> dict[signal.Signals, Callable[[], object]]:
        """The signal actions: each of ``graceful`` stops gracefully, SIGQUIT at once, SIGUSR1
        logs the stacks."""
        actions: dict[signal.Signals, Callable[[], object]] = {
            signum: functools.partial(
                self.graceful, "signal received, stopping", signal=signum.name
            )
            for signum in graceful
        }
        actions[signal.SIGQUIT] = functools.partial(
            self.at_once, "signal received, stopping at once without draining", signal="SIGQUIT"
        )
        actions[signal.SIGUSR1] = self.dump_stacks
        return actions
