"""Warm greenlets that serve whichever connection has bytes to read.

A connection between messages holds no greenlet: only its socket, its read watcher and its
state. When bytes arrive, the watcher's callback (in the hub) puts the connection's job on a
ready queue, with no Python frame (``deque.append`` is the callback). After the loop has run
every I/O callback of its iteration, a check watcher at the lowest priority hands the queue to
a worker here, which serves the jobs one after another and returns to the pool: one switch in
and one out for all the connections that became readable together (a loaded server finds
dozens per iteration), where a switch per connection cost ~4,000 instructions a request.

A parked greenlet per connection made every switch copy that connection's stack slice out and
in, and at 500 connections those stacks no longer stayed in the core's cache
(docs/design.md); a few warm workers taken last-in first-out keep the same stack hot whatever
the connection count.

Workers are made lazily: a job that waits (its handler waits on I/O, a lock, a sleep, a slow
client) returns to the hub with the rest of the queue still there, and the check watcher,
running on, hands it to another worker; the one that waited, once resumed, finishes its job and
takes from the same queue. So no connection waits behind another's handler, and each
connection's job is on the queue at most once (its watcher is stopped until it waits again),
so its requests are still served one at a time and in order. At most :data:`KEEP_WARM` wait
parked; the others end when their work ends.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Any

import gevent
from gevent import GreenletExit
from greenlet import greenlet as RawGreenlet  # noqa: N812 - the type, named as gevent does

KEEP_WARM = 32
"""Workers kept parked for the next batch. A handler that does not wait lets its worker go on
to the next job, so one worker serves a whole iteration of the loop; more are kept for
handlers that wait, whose workers come back later."""

Job = Callable[[Any], object]


class Dispatcher:
    """Runs jobs on warm greenlets; owned by the engine (no greenlet of its own).

    A job must not raise an :class:`Exception` (the connection's run catches everything);
    :class:`GreenletExit` ends its worker, as a cut-off at the end of a stop does.
    """

    def __init__(self, keep_warm: int = KEEP_WARM) -> None:
        self._hub = gevent.get_hub()
        self._keep_warm = keep_warm
        self._ready: deque[tuple[Job, Any]] = deque()
        self.ready: Callable[[tuple[Job, Any]], None] = self._ready.append
        """``ready((job, arg))``: run ``job(arg)`` once the loop's I/O callbacks of this
        iteration have run; only from an I/O watcher's callback (as a watcher's callback itself,
        with the pair as its argument: no Python frame). From anywhere else, :meth:`submit`."""
        self._parked: list[RawGreenlet] = []
        """Workers waiting for a job, the most recently used last (its stack is warmest)."""
        self._workers: set[RawGreenlet] = set()
        """Every worker alive, parked or busy."""
        self.dispatches = 0
        """Jobs run so far (the hub watch tells a busy worker from a blocked one)."""
        # After every I/O callback of an iteration (lowest priority: libev invokes pending
        # watchers from the highest), before the loop polls again; from start() to stop().
        # Unreferenced: it does not keep the loop running by itself.
        self._check = self._hub.loop.check(ref=False, priority=self._hub.loop.MINPRI)

    def __len__(self) -> int:
        """Workers alive: busy and parked."""
        return len(self._workers)

    @property
    def busy(self) -> int:
        """Workers running a job now (a job that waits included)."""
        return len(self._workers) - len(self._parked)

    def start(self) -> None:
        """Start handing queued jobs out, once an iteration; idempotent."""
        if not self._check.active:
            self._check.start(self._drain)

    def stop(self) -> None:
        """Stop handing queued jobs out; only once no connection can queue one any more (all
        are closed: a read watcher left armed would queue its job for ever, unserved). A job
        still queued is run first. Idempotent."""
        if self._ready:
            self._hub.loop.run_callback(self._drain)
        self._check.stop()

    def dispatch(self, job: Job, arg: Any) -> None:
        """Run ``job(arg)`` now on a worker; only from the hub (a loop callback): the worker
        runs until it waits or the queue is empty, then the hub goes on."""
        self._ready.append((job, arg))
        self._drain()

    def submit(self, job: Job, arg: Any) -> None:
        """Run ``job(arg)`` on a worker soon; from any greenlet."""
        self._hub.loop.run_callback(self.dispatch, job, arg)

    def kill_busy(self) -> None:
        """End every busy worker with :class:`GreenletExit` (the end of a stop's wait): their
        jobs are cut off. From any greenlet; done from the hub soon after."""
        for worker in self._workers.difference(self._parked):
            self._hub.loop.run_callback(_throw, worker)

    def close(self) -> None:
        """End the parked workers; busy ones end when their job does, and a job queued later
        (a connection that outlived the stop) gets a worker of its own until :meth:`stop`."""
        self._keep_warm = 0
        parked = list(self._parked)
        self._parked.clear()
        for worker in parked:
            self._hub.loop.run_callback(_throw, worker)

    def _drain(self) -> None:
        """In the hub: hand the queued jobs to workers until none is left (a worker whose job
        waits comes back here with the rest still queued: the next worker takes them)."""
        ready = self._ready
        parked = self._parked
        while ready:
            if parked:
                worker = parked.pop()
            else:
                worker = RawGreenlet(self._work, self._hub)
                self._workers.add(worker)
            try:
                worker.switch()
            except BaseException:
                # A job ended its worker with something other than GreenletExit (SystemExit
                # from a handler, say), which surfaces here. The jobs behind it have not
                # started, and their read watchers would queue them again at the next poll:
                # they run before it, from the loop's next callbacks.
                if ready:
                    self._hub.loop.run_callback(self._drain)
                raise

    def _work(self) -> None:
        me = RawGreenlet.getcurrent()
        ready = self._ready
        parked = self._parked
        switch = self._hub.switch
        try:
            while True:
                while ready:
                    job, arg = ready.popleft()
                    self.dispatches += 1
                    job(arg)
                    del job, arg
                    # The job's connection context must not outlive it in a parked worker.
                    me.gr_context = None
                if len(parked) >= self._keep_warm:
                    return
                parked.append(me)
                # Only _drain() switches to a parked worker, and it took it off the list.
                switch()
        except GreenletExit:
            pass
        finally:
            self._workers.discard(me)
            if me in parked:
                parked.remove(me)


def _throw(worker: RawGreenlet) -> None:
    if not worker.dead:
        worker.throw(GreenletExit)
