"""Signal handlers that only request, and the stop they request of one server.

gevent calls a signal handler from its hub, where nothing may block; spawning is all the handler
does, and the action (stopping, draining, logging stacks, queueing a request for the arbiter)
runs as a greenlet like any other. The launcher's single process, the arbiter of
``--workers N`` and each worker install their actions through :func:`install_signal_handlers`;
the single process and each worker stop their server through one :class:`ServerStop`.

:func:`stop_on_signals` is the public helper for an application that embeds the server and owns
its process: SIGTERM and SIGINT stop its servers (an ``RpcServer``, a gevent WSGI server)
gracefully, together.
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


class Drainable(Protocol):
    """A server :func:`stop_on_signals` stops: an ``RpcServer``, or any of gevent's servers
    (``gevent.pywsgi.WSGIServer``, ``StreamServer``)."""

    def stop(self, timeout: float | None = None) -> Any: ...


GRACEFUL_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class SignalStop:
    """The graceful stop of an embedding application's servers, on a signal or on request.

    Made by :func:`stop_on_signals`; see there.
    """

    def __init__(self, servers: Iterable[Drainable], timeout: float | None, log: Any) -> None:
        import gevent.event

        self._servers = tuple(servers)
        self._timeout = timeout
        self._log = log
        self._done = gevent.event.AsyncResult()
        self._handles: list[Any] = []
        self.requested = False
        """Whether a stop was asked for."""

    def stop(self, reason: str = "stop requested", **fields: Any) -> None:
        """Stop every server at once, each draining as its own ``stop()`` does; idempotent.
        Runs in the calling greenlet until they have stopped."""
        import gevent

        if self.requested:
            self._log.info(f"{reason}; already stopping", **fields)
            self._done.wait()
            return
        self.requested = True
        self._log.info(reason, servers=len(self._servers), **fields)
        jobs = [gevent.spawn(_drain, server, self._timeout) for server in self._servers]
        gevent.joinall(jobs)
        self._done.set(all(job.successful() and job.value for job in jobs))

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the servers have stopped.

        Returns:
            True if each stopped cleanly (its requests in flight finished); False if one cut
            requests off or raised, or ``timeout`` passed first.
        """
        import gevent

        try:
            return bool(self._done.get(timeout=timeout))
        except gevent.Timeout:
            return False

    def install(self, signals: Iterable[signal.Signals]) -> None:
        """Stop on each of ``signals``."""
        self._handles += install_signal_handlers(
            {
                signum: functools.partial(
                    self.stop, "signal received, stopping", signal=signum.name
                )
                for signum in signals
            }
        )

    def cancel(self) -> None:
        """Restore the signals' default handling."""
        for handle in self._handles:
            handle.cancel()
        self._handles = []


def _drain(server: Drainable, timeout: float | None) -> bool:
    """Stop ``server``; whether its requests in flight all finished. gevent's servers with a
    pool say nothing of it, so their pool is asked before what is left is killed."""
    from gevent.baseserver import BaseServer

    if isinstance(server, BaseServer) and server.pool is not None:
        server.close()
        wait = server.stop_timeout if timeout is None else timeout
        finished = bool(server.pool.join(timeout=wait))
        server.pool.kill(block=True, timeout=1)
        return finished
    return server.stop(timeout=timeout) is not False


def stop_on_signals(
    *servers: Drainable,
    signals: Iterable[signal.Signals] = GRACEFUL_SIGNALS,
    timeout: float | None = None,
    log: Any = None,
) -> SignalStop:
    """Stop ``servers`` gracefully when SIGTERM or SIGINT arrives: for an application that
    embeds kitegreen's server (next to a WSGI app, say) and owns its process.

    Each signal starts one stop of every server at once, each draining as its ``stop()`` does
    (an ``RpcServer``: deregister, ``drain_time``, stop accepting, requests in flight finish;
    a gevent server: stop accepting, its pool's handlers finish); a second signal during a
    stop changes nothing. The handlers only spawn the stop, as the launcher's do::

        stopping = kitegreen.stop_on_signals(rpc_server, wsgi_server)
        clean = stopping.wait()          # the main greenlet waits here
        sys.exit(0 if clean else 1)

    Args:
        servers: what to stop, concurrently.
        signals: the signals that stop them.
        timeout: how long each server's requests in flight may take; None: each its own
            (``exit_wait_time``, gevent's ``stop_timeout``).
        log: a structlog logger; ``kitegreen``'s when None.

    Returns:
        The stop: :meth:`SignalStop.wait` blocks until it is done, :meth:`SignalStop.stop`
        starts it without a signal, :meth:`SignalStop.cancel` restores the signals.
    """
    if log is None:
        import structlog

        log = structlog.get_logger("kitegreen")
    stop = SignalStop(servers, timeout, log)
    stop.install(signals)
    return stop
