"""Rate-limited reports (kite's ``report`` with ``lastConnReport``/``lastQPSReport``/...).

An overloaded server would otherwise write a log line and an event per refused request. Each
kind of report goes out at most once per ``report_interval``; what was held back in between is
counted and told with the next one.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

from kitegreen.observability.events import EventQueue

CONNECTION_OVERLOAD = "Connection Overload"
QPS_OVERLOAD = "QPS Overload"
PANIC = "Panic"
HUB_BLOCKED = "Hub Blocked"
REGISTRY = "Registry"
REMOTE_CONFIG = "Remote Config"
REGISTRY_CHANGE = "Registry Change"
"""The event of a registration or a deregistration (a failure is a :data:`REGISTRY` report)."""


@runtime_checkable
class Reporter(Protocol):
    """Where reports go besides the log and the event ring (an alerting system, say)."""

    def report(self, kind: str, message: str, suppressed: int) -> None:
        """Deliver one report.

        Args:
            kind: the report's kind, e.g. ``"QPS Overload"``.
            message: what happened.
            suppressed: how many reports of this kind were held back since the last one.
        """


class NullReporter:
    """The default :class:`Reporter`: the log and the event ring already carry every report."""

    def report(self, kind: str, message: str, suppressed: int) -> None:
        """Do nothing."""


class ReportGate:
    """Lets at most one report per kind through per interval, counting the rest.

    Args:
        interval: seconds between two reports of the same kind.
        events: the ring that records each report as an event.
        reporter: the pluggable destination.
        log: a structlog logger.
        clock: monotonic clock, injectable for tests.
    """

    def __init__(
        self,
        interval: float,
        events: EventQueue,
        reporter: Reporter,
        log: Any,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.interval = interval
        self._events = events
        self._reporter = reporter
        self._log = log
        self._clock = clock
        self._last: dict[str, float] = {}
        self.suppressed: dict[str, int] = {}
        """Reports held back per kind since that kind last went out."""

    def report(self, kind: str, message: str) -> bool:
        """Report ``message`` unless a report of ``kind`` went out within the interval.

        Returns:
            True if the report went out, False if it was counted and held back.
        """
        now = self._clock()
        last = self._last.get(kind)
        if last is not None and now - last < self.interval:
            self.suppressed[kind] = self.suppressed.get(kind, 0) + 1
            return False
        self._last[kind] = now
        held = self.suppressed.pop(kind, 0)
        self._log.warning("report", kind=kind, message=message, suppressed=held)
        self._events.push(kind, f"{message} ({held} similar suppressed)" if held else message)
        try:
            self._reporter.report(kind, message, held)
        except Exception:  # noqa: BLE001 - a broken reporter must not break the request path
            self._log.exception("reporter failed", kind=kind)
        return True

    def registry_change(self, kind: str, detail: str) -> None:
        """A :class:`~kitegreen.discovery.registry.Registrar`'s ``on_change``: a failure is
        reported, a registration or a deregistration is an event."""
        if kind == "failed":
            self.report(REGISTRY, detail)
        else:
            self._events.push(REGISTRY_CHANGE, f"{kind}: {detail}")

    def remote_config_event(self, kind: str, detail: str) -> None:
        """A :class:`~kitegreen.discovery.remote_config.RemoteConfigWatcher`'s ``on_event``:
        a rejected value or an unreachable Consul is reported (applied changes are events of whoever
        applies them)."""
        if kind != "changed":
            self.report(REMOTE_CONFIG, f"{kind}: {detail}")
