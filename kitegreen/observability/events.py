"""The recent-event ring (kite's ``kitevent.Queue``, Kitex's ``event.Queue``)."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class Event:
    """Something that happened to the server.

    Attributes:
        name: what happened, e.g. ``"Server Start"``, ``"QPS Overload"``.
        detail: free text.
        time: wall-clock seconds since the epoch.
    """

    name: str
    detail: str
    time: float

    def as_dict(self) -> dict[str, Any]:
        """The event as JSON-ready data."""
        return {"name": self.name, "detail": self.detail, "time": self.time}


class EventQueue:
    """A bounded ring of recent events; the oldest fall off the end.

    Safe to push from gevent's monitoring thread as well as from greenlets: ``deque.append``
    and copying a deque are atomic under the GIL, and a lock could not be shared between a
    native thread and greenlets once ``threading`` is monkey-patched.

    Args:
        capacity: how many events are kept.
        clock: wall clock, injectable for tests.
    """

    def __init__(self, capacity: int, clock: Callable[[], float] = time.time) -> None:
        self._ring: deque[Event] = deque(maxlen=capacity)
        self._clock = clock

    def push(self, name: str, detail: str = "") -> Event:
        """Record an event now."""
        event = Event(name, detail, self._clock())
        self._ring.append(event)
        return event

    def recent(self, limit: int | None = None) -> list[Event]:
        """The events kept, newest first; at most ``limit`` of them."""
        events = list(self._ring)
        events.reverse()
        return events if limit is None else events[:limit]
