"""Exponential backoff with jitter for background retries (Consul registration and watches)."""

from __future__ import annotations

import random


class Backoff:
    """Delays that double from ``initial`` up to ``maximum``, each with up to 20 % jitter.

    Jitter keeps a fleet of servers that lost Consul together from retrying in lockstep.
    """

    def __init__(self, initial: float = 0.5, maximum: float = 30.0) -> None:
        self.initial = initial
        self.maximum = maximum
        self._next = initial

    def next(self) -> float:
        """The delay before the next attempt."""
        delay = self._next
        self._next = min(self.maximum, self._next * 2)
        return delay * (1.0 + random.random() * 0.2)  # noqa: S311 - jitter, not security

    def reset(self) -> None:
        """Start over after a success."""
        self._next = self.initial
