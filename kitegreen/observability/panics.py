"""Logging handler panics without letting a client fill the disk.

Every undeclared exception is a panic (kite's ``onPanic``): counted in the metrics and reported,
always. Its traceback (about 2 KB) is logged for the first :data:`BURST` panics of a method in
each :data:`INTERVAL`; after that the method's panics are only counted, and the count is logged
with the next traceback (``suppressed``) or when the server stops.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from kitegreen.exceptions import describe

BURST = 3
"""Tracebacks logged per method per interval."""
INTERVAL = 60.0
"""Seconds of one logging window."""


class _Window:
    __slots__ = ("logged", "start", "suppressed")

    def __init__(self, start: float) -> None:
        self.start = start
        self.logged = 0
        self.suppressed = 0


class PanicLog:
    """Rate-limited ``handler panic`` log lines, per method.

    Args:
        log: a structlog logger.
        burst: tracebacks per method per interval.
        interval: seconds of one window.
        clock: monotonic clock, injectable for tests.
    """

    def __init__(
        self,
        log: Any,
        burst: int = BURST,
        interval: float = INTERVAL,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._log = log
        self._burst = burst
        self._interval = interval
        self._clock = clock
        self._windows: dict[str, _Window] = {}

    def panic(self, method: str, exc: BaseException, **context: Any) -> bool:
        """Log one panic of ``method``, with its traceback unless the window's burst is spent.

        Returns:
            Whether a line was written.
        """
        now = self._clock()
        window = self._windows.get(method)
        suppressed = 0
        if window is None or now - window.start >= self._interval:
            suppressed = window.suppressed if window is not None else 0
            window = self._windows[method] = _Window(now)
        if window.logged >= self._burst:
            window.suppressed += 1
            return False
        window.logged += 1
        self._log.error(
            "handler panic",
            method=method,
            error=describe(exc),
            suppressed=suppressed,
            exc_info=exc,
            **context,
        )
        return True

    def flush(self) -> None:
        """Log the panics held back in the current windows (at stop)."""
        for method, window in self._windows.items():
            if window.suppressed:
                self._log.error(
                    "handler panics not logged", method=method, suppressed=window.suppressed
                )
                window.suppressed = 0
