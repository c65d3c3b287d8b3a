"""The board: a slot of shared memory per worker, written by the worker, read by everyone.

The arbiter maps it (anonymous, shared) before it forks the first worker, so every worker
inherits the same pages. Each worker owns one slot and writes three numbers there:

- its **heartbeat**: ``CLOCK_MONOTONIC`` (one clock for every process on the machine) at the last
  time its hub ran; the arbiter reads it without a system call or a message, and kills a worker
  whose heartbeat is older than ``worker_timeout``;
- the **connections** it has open, and whether it is **accepting**: the other workers read these
  to share new connections out evenly (``balance.py``);
- whether it is **retiring** (recycled: ``recycle.py``): a worker handing its connections over
  picks an accepting worker that is not (``handoff.py``).

A file's mtime (gunicorn's heartbeat) would cost a system call per beat and per check, and could
not carry the other two figures. Each number is one aligned 8-byte store by the slot's one
writer; a reader that catches the memory mid-update reads it again.
"""

from __future__ import annotations

import functools
import mmap
import struct
import time
from collections.abc import Mapping

from kitegreen.config import MAX_WORKERS

_FIELDS = 4
_HEARTBEAT, _OPEN, _ACCEPTING, _RETIRING = range(_FIELDS)
_DOUBLE = struct.Struct("d")
_HEADER = 1
"""One number before the slots: how many slots are in use (the highest in use, plus one)."""


@functools.lru_cache(maxsize=64)
def _slots_struct(count: int) -> struct.Struct:
    return struct.Struct(f"{count * _FIELDS}d")


class Board:
    """Slots for up to ``size`` workers at once (a reload runs one more than ``workers``).

    Args:
        size: how many slots.
    """

    def __init__(self, size: int = MAX_WORKERS + 1) -> None:
        self.size = size
        length = (_HEADER + size * _FIELDS) * _DOUBLE.size
        self._map = mmap.mmap(-1, -(-length // mmap.PAGESIZE) * mmap.PAGESIZE)

    def slot(self, index: int) -> Slot:
        """Slot ``index``, cleared and stamped now, counted in use (the arbiter, at a fork)."""
        if not 0 <= index < self.size:
            raise IndexError(f"slot {index} is not on a board of {self.size}")
        slot = Slot(self, index)
        slot.clear()
        if index >= self.in_use():
            _DOUBLE.pack_into(self._map, 0, float(index + 1))
        return slot

    def in_use(self) -> int:
        """How many slots a reader must look at: the highest in use, plus one."""
        return int(self._read(0))

    def fewest_open(self, exclude: int, now: float, stale_after: float) -> int | None:
        """The fewest connections open in an accepting slot other than ``exclude`` whose
        heartbeat is fresher than ``stale_after``; None if there is no such slot."""
        count = min(self.in_use(), self.size)
        if count == 0:
            return None
        layout = _slots_struct(count)
        offset = _HEADER * _DOUBLE.size
        while True:
            values = layout.unpack_from(self._map, offset)
            if layout.unpack_from(self._map, offset) == values:
                break
        fewest: float | None = None
        for index in range(count):
            base = index * _FIELDS
            if (
                index != exclude
                and values[base + _ACCEPTING] > 0
                and now - values[base + _HEARTBEAT] < stale_after
                and (fewest is None or values[base + _OPEN] < fewest)
            ):
                fewest = values[base + _OPEN]
        return None if fewest is None else int(fewest)

    def adopter(
        self,
        exclude: int,
        now: float,
        stale_after: float,
        unseen: Mapping[int, tuple[float, int]] | None = None,
    ) -> int | None:
        """The slot, other than ``exclude``, to hand a connection to: accepting, not retiring,
        heartbeat fresher than ``stale_after``, fewest connections open; None if none.

        ``unseen`` maps a slot to its count as last read and the connections handed to it
        since, which its count does not show yet while it still reads the same (a worker
        publishes its count with its heartbeat): they are added to it.
        """
        count = min(self.in_use(), self.size)
        best: tuple[float, int] | None = None
        for index in range(count):
            if index == exclude:
                continue
            heartbeat, opened, accepting, retiring = (
                self._read(self._offset(index, f)) for f in range(_FIELDS)
            )
            eligible = accepting > 0 and not retiring and now - heartbeat < stale_after
            if unseen is not None and index in unseen and unseen[index][0] == opened:
                opened += unseen[index][1]
            if eligible and (best is None or opened < best[0]):
                best = (opened, index)
        return None if best is None else best[1]

    def open_count(self, index: int) -> float:
        """The connections slot ``index`` last said it has open."""
        return self._read(self._offset(index, _OPEN))

    def _offset(self, index: int, field: int) -> int:
        return (_HEADER + index * _FIELDS + field) * _DOUBLE.size

    def _read(self, offset: int) -> float:
        while True:
            value: float = _DOUBLE.unpack_from(self._map, offset)[0]
            if _DOUBLE.unpack_from(self._map, offset)[0] == value:
                return value


class Slot:
    """One worker's slot: the worker writes it, the arbiter and the other workers read it."""

    def __init__(self, board: Board, index: int) -> None:
        self.board = board
        self.index = index

    def stamp(self) -> None:
        """Record that the hub ran now."""
        self._put(_HEARTBEAT, time.monotonic())

    def heartbeat(self) -> float:
        """The monotonic time of the last stamp."""
        return self.board._read(self.board._offset(self.index, _HEARTBEAT))

    def age(self, now: float | None = None) -> float:
        """Seconds since the last stamp."""
        return (time.monotonic() if now is None else now) - self.heartbeat()

    def set_open(self, connections: int) -> None:
        """Publish how many connections this worker has open."""
        self._put(_OPEN, float(connections))

    def set_accepting(self, accepting: bool) -> None:
        """Publish whether this worker accepts new connections."""
        self._put(_ACCEPTING, 1.0 if accepting else 0.0)

    def set_retiring(self) -> None:
        """Publish that this worker asked to be recycled: no connection is handed to it."""
        self._put(_RETIRING, 1.0)

    def retiring(self) -> bool:
        """Whether this worker asked to be recycled."""
        return self.board._read(self.board._offset(self.index, _RETIRING)) > 0

    def clear(self) -> None:
        """Not accepting, nothing open, stamped now: a worker just forked, or just reaped."""
        self._put(_RETIRING, 0.0)
        self.set_accepting(False)
        self.set_open(0)
        self.stamp()

    def _put(self, field: int, value: float) -> None:
        _DOUBLE.pack_into(self.board._map, self.board._offset(self.index, field), value)
