"""Warm greenlets that serve whichever connection has bytes to read.

A connection between messages holds no greenlet: only its socket, its read watcher and its
state. When bytes arrive, the watcher's callback (in the hub) hands the connection to a worker
here, which reads the message, calls the handler, replies and returns to the pool. A parked
greenlet per connection made every switch copy that connection's stack slice out and in, and
at 500 connections those stacks no longer stayed in the core's cache (docs/design.md); a few
warm workers taken last-in first-out keep the same stack hot whatever the connection count.

Workers are made lazily: one that is busy (its handler waits on I/O, a lock, a sleep, a slow
client) never holds up another connection, since a ready connection finds a parked worker or
gets a new one. At most :data:`KEEP_WARM` wait parked; the others end when their work ends.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import gevent
from gevent import GreenletExit
from greenlet import greenlet as RawGreenlet  # noqa: N812 - the type, named as gevent does

KEEP_WARM = 32
"""Workers kept parked for the next ready connection. A handler that does not wait returns its
worker before the hub runs the next callback, so one worker serves a whole wake-up of the loop;
more are kept for handlers that wait, whose workers come back later."""

Job = Callable[[Any], object]


class Dispatcher:
    """Runs ``job(arg)`` on a warm greenlet; owned by the engine (no greenlet of its own).

    A job must not raise an :class:`Exception` (the connection's run catches everything);
    :class:`GreenletExit` ends its worker, as a cut-off at the end of a stop does.
    """

    def __init__(self, keep_warm: int = KEEP_WARM) -> None:
        self._hub = gevent.get_hub()
        self._keep_warm = keep_warm
        self._parked: list[RawGreenlet] = []
        """Workers waiting for a job, the most recently used last (its stack is warmest)."""
        self._workers: set[RawGreenlet] = set()
        """Every worker alive, parked or busy."""
        self.dispatches = 0
        """Jobs handed out so far (the hub watch tells a busy worker from a blocked one)."""

    def __len__(self) -> int:
        """Workers alive: busy and parked."""
        return len(self._workers)

    @property
    def busy(self) -> int:
        """Workers running a job now (a job that waits included)."""
        return len(self._workers) - len(self._parked)

    def dispatch(self, job: Job, arg: Any) -> None:
        """Run ``job(arg)`` now on a worker; only from the hub (an io or loop callback): the
        worker runs until it waits or finishes, then the hub goes on."""
        self.dispatches += 1
        parked = self._parked
        if parked:
            parked.pop().switch(job, arg)
            return
        worker = RawGreenlet(self._work, self._hub)
        self._workers.add(worker)
        worker.switch(job, arg)

    def submit(self, job: Job, arg: Any) -> None:
        """Run ``job(arg)`` on a worker soon; from any greenlet."""
        self._hub.loop.run_callback(self.dispatch, job, arg)

    def kill_busy(self) -> None:
        """End every busy worker with :class:`GreenletExit` (the end of a stop's wait): their
        jobs are cut off. From any greenlet; done from the hub soon after."""
        for worker in self._workers.difference(self._parked):
            self._hub.loop.run_callback(_throw, worker)

    def close(self) -> None:
        """End the parked workers; busy ones end when their job does."""
        self._keep_warm = 0
        parked = list(self._parked)
        self._parked.clear()
        for worker in parked:
            self._hub.loop.run_callback(_throw, worker)

    def _work(self, job: Job, arg: Any) -> None:
        me = RawGreenlet.getcurrent()
        parked = self._parked
        switch = self._hub.switch
        try:
            while True:
                job(arg)
                del job, arg
                # The job's connection context must not outlive it in a parked worker.
                me.gr_context = None
                if len(parked) >= self._keep_warm:
                    return
                parked.append(me)
                # Only dispatch() switches to a parked worker, and it took it off the list.
                job, arg = switch()
        except GreenletExit:
            pass
        finally:
            self._workers.discard(me)
            if me in parked:
                parked.remove(me)


def _throw(worker: RawGreenlet) -> None:
    if not worker.dead:
        worker.throw(GreenletExit)
