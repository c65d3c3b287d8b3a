"""The worker's pulse and watchdog: a greenlet that stamps its heartbeat on the board, and a C
thread that ends the worker when the stamps stop.

The pulse is a greenlet, not a thread: the stamp is meant to stop when the hub stops, which is
precisely what a thread would not notice. Each beat also publishes the worker's open
connections (for the other workers' accept balance), checks that the arbiter is still its
parent, and re-arms the watchdog.

The watchdog is faulthandler's ``dump_traceback_later``: a C thread that, unless re-armed within
``worker_timeout``, writes every thread's Python stack to the worker's stack file and exits
the process (status 1). It needs neither the hub nor the GIL-holding code to cooperate, nor the
arbiter: a worker whose hub is blocked ends itself even once its arbiter is gone, when
PDEATHSIG's SIGTERM, the control channel's end-of-stream and the parent check would all wait
for the hub. The arbiter reads the stack file when it reaps the worker, and logs it.
"""

from __future__ import annotations

import faulthandler
import os
from collections.abc import Callable
from typing import IO, Any

import gevent
from gevent.event import Event as GEvent

from kitegreen.workers.board import Slot


class Watchdog:
    """Ends the process, its stacks written to ``file``, unless re-armed within ``timeout``.

    Args:
        timeout: seconds between two :meth:`arm` calls after which the process ends.
        file: where the stacks go (the worker's stack file, which the arbiter reads).
    """

    def __init__(self, timeout: float, file: IO[bytes]) -> None:
        self.timeout = timeout
        self._file = file

    def arm(self) -> None:
        """Start (or restart) the countdown. CPython starts a new thread for each arming, some
        tens of microseconds, once per heartbeat."""
        faulthandler.dump_traceback_later(self.timeout, exit=True, file=self._file)

    def disarm(self) -> None:
        """Stop the countdown (the worker is about to exit by itself)."""
        faulthandler.cancel_dump_traceback_later()


class Pulse:
    """Stamps a worker's slot every ``interval`` seconds while its hub runs.

    Args:
        slot: the worker's slot on the board.
        interval: seconds between stamps (a fraction of ``worker_timeout``).
        parent: the arbiter's pid.
        open_connections: returns the worker's open connections now.
        orphaned: called once if the parent changes (the arbiter died and the worker was
            handed to another process), as a fallback where the kernel cannot be asked to
            signal the parent's death; the pulse goes on beating while the worker drains.
        watchdog: re-armed at every beat.
        log: a structlog logger.
    """

    def __init__(
        self,
        slot: Slot,
        interval: float,
        *,
        parent: int,
        open_connections: Callable[[], int],
        orphaned: Callable[[], Any],
        watchdog: Watchdog,
        log: Any,
    ) -> None:
        self._slot = slot
        self.interval = interval
        self._parent = parent
        self._open = open_connections
        self._orphaned = orphaned
        self._watchdog = watchdog
        self._log = log
        self._orphan_seen = False
        self._stopping = GEvent()
        self._greenlet: gevent.Greenlet | None = None

    def start(self) -> None:
        """Start stamping; idempotent."""
        if self._greenlet is None:
            self._greenlet = gevent.spawn(self._run)

    def stop(self) -> None:
        """Stop stamping and disarm the watchdog; idempotent."""
        self._stopping.set()
        greenlet, self._greenlet = self._greenlet, None
        if greenlet is not None:
            greenlet.kill(block=False)
        self._watchdog.disarm()

    def _run(self) -> None:
        while True:
            try:
                self.beat()
            except Exception:  # noqa: BLE001 - the next beat may succeed; the watchdog decides
                self._log.exception("heartbeat failed")
            if self._stopping.wait(self.interval):
                return

    def beat(self) -> None:
        """Stamp, publish the open connections, re-arm the watchdog, check the parent."""
        self._slot.stamp()
        self._watchdog.arm()
        self._slot.set_open(self._open())
        if not self._orphan_seen and os.getppid() != self._parent:
            self._orphan_seen = True
            self._orphaned()
