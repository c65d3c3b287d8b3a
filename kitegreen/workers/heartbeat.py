"""The worker's pulse: the greenlet that stamps its heartbeat on the board.

A greenlet, not a thread: the stamp is meant to stop when the hub stops, which is precisely what
a thread would not notice. Each beat also publishes the worker's open connections (for the
other workers' accept balance) and checks that the arbiter is still its parent.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import gevent
from gevent.event import Event as GEvent

from kitegreen.workers.board import Slot


class Pulse:
    """Stamps a worker's slot every ``interval`` seconds while its hub runs.

    Args:
        slot: the worker's slot on the board.
        interval: seconds between stamps (a fraction of ``worker_timeout``).
        parent: the arbiter's pid.
        open_connections: returns the worker's open connections now.
        orphaned: called once if the parent changes (the arbiter died and the worker was
            handed to another process), as a fallback where the kernel cannot be asked to
            signal the parent's death.
    """

    def __init__(
        self,
        slot: Slot,
        interval: float,
        parent: int,
        open_connections: Callable[[], int],
        orphaned: Callable[[], Any],
    ) -> None:
        self._slot = slot
        self.interval = interval
        self._parent = parent
        self._open = open_connections
        self._orphaned = orphaned
        self._stopping = GEvent()
        self._greenlet: gevent.Greenlet | None = None

    def start(self) -> None:
        """Start stamping; idempotent."""
        if self._greenlet is None:
            self._greenlet = gevent.spawn(self._run)

    def stop(self) -> None:
        """Stop stamping; idempotent."""
        self._stopping.set()
        greenlet, self._greenlet = self._greenlet, None
        if greenlet is not None:
            greenlet.kill(block=False)

    def _run(self) -> None:
        while True:
            self._slot.stamp()
            self._slot.set_open(self._open())
            if os.getppid() != self._parent:
                self._orphaned()
                return
            if self._stopping.wait(self.interval):
                return
