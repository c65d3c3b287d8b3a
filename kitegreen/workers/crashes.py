"""Start-up crashes: when a worker's exit counts as one, how long its replacement waits, and when
the arbiter gives up.

A worker that exits unasked before it was ready, or within :data:`CRASH_WINDOW` of being ready,
counts as a start-up crash: the code, its settings or the machine keep it from starting. Each
crash doubles the wait before the next spawn (from 0.1 s up to 5 s); :data:`MAX_STARTUP_CRASHES`
with no proof of health between them exhaust the policy.

Proof of health is a worker *spawned after the last crash* that has stayed ready for
:data:`CRASH_WINDOW`. A worker that was already serving before the crashes proves nothing about
what crashes its replacements: with it counted, one crash-looping worker beside healthy ones,
or a reload whose new code exits right after it starts while the old workers serve on, would
clear the count on every tick and be restarted every 0.1 s for ever.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Protocol

from kitegreen.discovery.backoff import Backoff

MAX_STARTUP_CRASHES = 5
"""Start-up crashes in a row after which the arbiter gives up."""
CRASH_WINDOW = 10.0
"""Seconds after becoming ready within which a worker's exit counts as a start-up crash, and
for which a worker spawned after a crash must stay ready to clear the count."""
BACKOFF_INITIAL = 0.1
BACKOFF_MAX = 5.0


class Started(Protocol):
    """What the policy reads of a worker: when it was spawned, and became ready."""

    @property
    def spawned_at(self) -> float: ...

    @property
    def ready_at(self) -> float | None: ...


class CrashPolicy:
    """Counts start-up crashes of one generation of workers and spaces out their replacements.

    Args:
        limit: crashes in a row that exhaust the policy.
        window: see :data:`CRASH_WINDOW`.
        backoff: the waits before a crashed worker's replacement.
        clock: the monotonic clock the workers' ``spawned_at`` and ``ready_at`` come from.
    """

    def __init__(
        self,
        *,
        limit: int = MAX_STARTUP_CRASHES,
        window: float = CRASH_WINDOW,
        backoff: Backoff | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.limit = limit
        self.window = window
        self._backoff = backoff or Backoff(initial=BACKOFF_INITIAL, maximum=BACKOFF_MAX)
        self._clock = clock
        self.crashes = 0
        """Start-up crashes since the last proof of health."""
        self.last_crash_at: float | None = None
        self.not_before = 0.0
        """No replacement is spawned before this time (after a crash, the backoff)."""

    @property
    def exhausted(self) -> bool:
        """Whether :attr:`limit` crashes came with no proof of health between them."""
        return self.crashes >= self.limit

    def exited(self, worker: Started) -> float | None:
        """Record that ``worker`` exited unasked.

        Returns:
            The seconds its replacement waits if the exit was a start-up crash; None if the
            worker had been ready for :attr:`window` (replaced at once, nothing counted).
        """
        now = self._clock()
        if worker.ready_at is not None and now - worker.ready_at >= self.window:
            return None
        self.crashes += 1
        self.last_crash_at = now
        delay = self._backoff.next()
        self.not_before = now + delay
        return delay

    def note_health(self, workers: Iterable[Started]) -> bool:
        """Forget the crashes if one of ``workers`` proves the code healthy (see the module
        docstring).

        Returns:
            Whether the crashes were forgotten just now.
        """
        if self.last_crash_at is None:
            return False
        now = self._clock()
        last = self.last_crash_at
        for worker in workers:
            ready = worker.ready_at
            if worker.spawned_at > last and ready is not None and now - ready >= self.window:
                self.crashes = 0
                self.last_crash_at = None
                self._backoff.reset()
                return True
        return False

    @property
    def proven(self) -> bool:
        """Whether no crash waits for a proof of health."""
        return self.last_crash_at is None

    def may_spawn(self) -> bool:
        """Whether a replacement may be spawned now (the backoff has passed)."""
        return self._clock() >= self.not_before

    def wait(self) -> float:
        """Seconds until :meth:`may_spawn` turns true; 0 if it is."""
        return max(self.not_before - self._clock(), 0.0)
