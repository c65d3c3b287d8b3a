"""The open connections of one server: counting them, sweeping the idle ones, ending them."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import gevent

from kitegreen.transport.stream import HandOver, IdleTimeout, MessageStream, StopServing


class StreamSet:
    """The streams a server has open."""

    def __init__(self) -> None:
        self._streams: set[MessageStream] = set()

    def add(self, stream: MessageStream) -> None:
        """Track ``stream`` until :meth:`discard`."""
        self._streams.add(stream)

    def discard(self, stream: MessageStream) -> None:
        """Stop tracking ``stream``."""
        self._streams.discard(stream)

    def __len__(self) -> int:
        return len(self._streams)

    def __iter__(self) -> Iterator[MessageStream]:
        return iter(list(self._streams))

    def busy(self) -> int:
        """Streams in the middle of a request: reading it, running its handler, replying."""
        return sum(1 for s in self._streams if s.idle_for(0.0) is None)

    def end_idle(self, first_request_grace: float = 0.0, *, hand_over: bool = False) -> int:
        """End every stream that waits for a request with nothing unread (for a stop).

        Args:
            first_request_grace: seconds for which a connection that has received nothing yet
                is spared after it started waiting: its client connected while the server
                still accepted, and its first request may be on its way (ended now, that
                request would be answered with an end-of-stream). A later call ends it.

            hand_over: raise :class:`HandOver` rather than :class:`StopServing`: the
                connections are handed to another worker (a recycled worker's stop), not
                closed, and none needs sparing; one no worker took when last offered waits
                for its :attr:`~MessageStream.offer_again_at`.

        Returns:
            How many were told to end; each closes with a FIN (or hands itself over) on a
            worker greenlet.
        """
        now = time.monotonic()
        ended = 0
        for stream in self:
            waited = stream.idle_for(now)
            if hand_over:
                if now >= stream.offer_again_at:
                    ended += stream.interrupt_if_idle(HandOver("handing the connection over"))
                continue
            if stream.wire is None and waited is not None and waited < first_request_grace:
                continue
            ended += stream.interrupt_if_idle(StopServing("server stopping"))
        return ended


SWEEP_BATCH = 32
"""Connections the idle sweeper cuts before it lets the loop run again. Each cut runs that
connection's greenlet to its close (an exception raised and caught, a shutdown, a log call),
so cuts made in one go delay every other connection by their sum: 1,500 connections cut in one
sweep held another client's ping for 25 ms on a loaded 2-core machine (11-17 ms at p99 in the
issue's measurement); cut 32 at a time, the ping's worst was 6-14 ms, that machine's own noise
(``tests/test_lifecycle.py::TestIdleTimeoutWave``, figures in docs/operations-limits.md)."""

SWEEP_PAUSE = 0.001
"""Seconds the sweeper sleeps between batches: a real sleep, so the loop polls for I/O and
serves the other connections before the next batch (``sleep(0)`` may run the next batch
first). 1,500 connections are cut over about 50 ms more than in one go."""


class IdleSweeper:
    """Closes connections that have waited longer than ``idle_timeout`` for their next request.

    One greenlet checks every connection a few times per timeout, instead of a gevent timer
    armed and disarmed around every wait on the request path. The connections found expired
    are cut :data:`SWEEP_BATCH` at a time with the loop let run between batches, so that
    thousands of connections that went idle in the same second (a client fleet's pools, a
    load test ending) are cut without a pause in serving the rest.

    Args:
        streams: the connections to watch.
        idle_timeout: seconds a connection may wait between requests (> 0).
        clock: monotonic clock, injectable for tests.
    """

    def __init__(
        self,
        streams: StreamSet,
        idle_timeout: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._streams = streams
        self.idle_timeout = idle_timeout
        self.interval = min(max(idle_timeout / 4, 0.05), 1.0)
        self._clock = clock
        self._greenlet: gevent.Greenlet | None = None

    def start(self) -> None:
        """Start sweeping; idempotent."""
        if self._greenlet is None:
            self._greenlet = gevent.spawn(self._run)

    def stop(self) -> None:
        """Stop sweeping; idempotent."""
        greenlet, self._greenlet = self._greenlet, None
        if greenlet is not None:
            greenlet.kill(block=False)

    def _run(self) -> None:
        while True:
            gevent.sleep(self.interval)
            self.sweep()

    def sweep(self) -> int:
        """Close every connection idle past the timeout now, :data:`SWEEP_BATCH` at a time
        with a pause between batches; return how many."""
        now = self._clock()
        expired = [s for s in self._streams if (s.idle_for(now) or 0.0) > self.idle_timeout]
        closed = 0
        for i, stream in enumerate(expired):
            if i and i % SWEEP_BATCH == 0:
                gevent.sleep(SWEEP_PAUSE)
                now = self._clock()
            # Checked again after a pause: the connection may have taken a request meanwhile
            # and be idle again since a moment ago.
            waited = stream.idle_for(now)
            if waited is not None and waited > self.idle_timeout:
                closed += stream.interrupt_if_idle(IdleTimeout("idle_timeout"))
        return closed
