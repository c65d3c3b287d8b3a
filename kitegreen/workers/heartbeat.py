"""The heartbeat: how the arbiter sees that a worker's gevent hub still runs.

Each worker has a slot of shared anonymous memory (8 bytes), mapped by the arbiter before the
fork. A greenlet of the worker's (:class:`Pulse`) stamps it with ``CLOCK_MONOTONIC``, which is
one clock for every process on the machine; the arbiter reads the slot without a system call
or a message. A greenlet, not a thread: the stamp is meant to stop when the hub stops, which
is precisely what a thread would not notice. A file's mtime (gunicorn's way) would cost a
system call per beat on both sides.
"""

from __future__ import annotations

import mmap
import os
import struct
import time
from collections.abc import Callable
from typing import Any

import gevent
from gevent.event import Event as GEvent

_SLOT = struct.Struct("d")


class Heartbeat:
    """One worker's slot: written by the worker, read by the arbiter.

    Created by the arbiter before the fork; the mapping is shared with the child.
    """

    def __init__(self) -> None:
        self._map = mmap.mmap(-1, mmap.PAGESIZE)
        self.stamp()

    def stamp(self) -> None:
        """Record that the hub ran now."""
        _SLOT.pack_into(self._map, 0, time.monotonic())

    def last(self) -> float:
        """The monotonic time of the last stamp."""
        # A stamp is one aligned 8-byte store, but nothing in Python promises that: a read that
        # straddled a write would differ from the next one.
        while True:
            first = _SLOT.unpack_from(self._map, 0)[0]
            if _SLOT.unpack_from(self._map, 0)[0] == first:
                return float(first)

    def age(self, now: float | None = None) -> float:
        """Seconds since the last stamp."""
        return (time.monotonic() if now is None else now) - self.last()

    def close(self) -> None:
        """Unmap the slot (the arbiter, once the worker is reaped)."""
        self._map.close()


class Pulse:
    """The worker's greenlet that stamps its heartbeat and watches for the arbiter's death.

    Args:
        heartbeat: the slot to stamp.
        interval: seconds between stamps (a fraction of ``worker_timeout``).
        parent: the arbiter's pid.
        orphaned: called once if the parent changes (the arbiter died and the worker was
            handed to another process), as a fallback where the kernel cannot be asked to
            signal the parent's death.
    """

    def __init__(
        self, heartbeat: Heartbeat, interval: float, parent: int, orphaned: Callable[[], Any]
    ) -> None:
        self._heartbeat = heartbeat
        self.interval = interval
        self._parent = parent
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
            self._heartbeat.stamp()
            if os.getppid() != self._parent:
                self._orphaned()
                return
            if self._stopping.wait(self.interval):
                return
