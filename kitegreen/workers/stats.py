"""What an instance's workers counted, gathered over their control channels and summed.

A scrape asks every live worker for its figures at once and waits at most
:data:`STATS_TIMEOUT`; a worker that does not answer in time (its hub is blocked) is shown with
its last figures, marked stale. When a worker exits, its last figures (the final ones it sends
as it stops, or else the last it answered with) are folded into the totals of retired workers:
the instance's counters never go backwards across a reload, a scale-down or a crash. Only what
a crashed worker counted after its last answer is lost. The counters among the workers' process
figures (CPU seconds, garbage collections) are kept the same way.

Figures are kept only for workers the arbiter tracks (from their spawn until their exit is
handled), and only the newest of a worker's figures by the sequence number the worker puts on
each: a scrape's answers arrive after a wait in which the worker may have exited and been
retired (its figures would then be counted twice, once retired and once live, for ever), and
two scrapes at once may see their answers come back in either order.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import gevent

from kitegreen.observability.metrics import empty_snapshot, is_counter_figure, merge_snapshots
from kitegreen.workers.process import WorkerProcess

STATS_TIMEOUT = 1.0
"""Seconds a scrape waits for the workers' answers."""


class InstanceStats:
    """The last figures of each live worker, and the sum of the retired ones."""

    def __init__(self) -> None:
        self._tracked: dict[int, dict[str, Any] | None] = {}
        self.stale: set[int] = set()
        """Live workers that did not answer the last refresh."""
        self._retired = empty_snapshot()
        self.retired_process: dict[str, float] = {}
        """The process counters (CPU seconds, collections) of exited workers, summed."""

    def track(self, pid: int) -> None:
        """Keep ``pid``'s figures from now until :meth:`retire` (the arbiter, at a spawn)."""
        self._tracked.setdefault(pid, None)

    def update(self, pid: int, stats: Mapping[str, Any]) -> bool:
        """Record ``pid``'s figures (an answer, or its final figures).

        Returns:
            False if they were ignored: ``pid`` is not tracked (retired already), or figures
            with a later sequence number were recorded before.
        """
        if pid not in self._tracked:
            return False
        last = self._tracked[pid]
        if last is not None and _seq(last) >= _seq(stats):
            return False
        self._tracked[pid] = dict(stats)
        self.stale.discard(pid)
        return True

    def refresh(self, workers: Iterable[WorkerProcess], timeout: float = STATS_TIMEOUT) -> None:
        """Ask every worker in ``workers`` for its figures, in parallel; wait up to ``timeout``."""
        # A worker still importing the application cannot answer yet; asking it would only
        # make the scrape wait.
        asking = [w for w in workers if w.ready_at is not None and not w.channel.closed]
        requests = {
            w.pid: gevent.spawn(w.channel.request, {"type": "stats"}, timeout) for w in asking
        }
        gevent.joinall(list(requests.values()), timeout=timeout + 0.5)
        for pid, greenlet in requests.items():
            reply = greenlet.value if greenlet.successful() else None
            if reply is None:
                greenlet.kill(block=False)
                if pid in self._tracked:
                    self.stale.add(pid)
            else:
                self.update(pid, reply)

    def retire(self, pid: int) -> None:
        """Fold ``pid``'s last counters into the retired totals (its gauges end with it), and
        ignore whatever figures of it still arrive."""
        stats = self._tracked.pop(pid, None)
        self.stale.discard(pid)
        metrics = (stats or {}).get("metrics")
        if metrics:
            self._retired = merge_snapshots([self._retired, {**metrics, "gauges": {}}])
        for name, value in ((stats or {}).get("process") or {}).items():
            if is_counter_figure(name):
                self.retired_process[name] = self.retired_process.get(name, 0.0) + value

    def live(self) -> dict[int, dict[str, Any]]:
        """The last figures of each live worker that has sent some, by pid."""
        return {pid: stats for pid, stats in self._tracked.items() if stats is not None}

    def totals(self) -> dict[str, Any]:
        """Counters and histograms of the instance (retired and live workers), gauges of the
        live ones: one :meth:`~kitegreen.observability.metrics.Metrics.snapshot`-shaped value."""
        live = [s["metrics"] for s in self.live().values() if s.get("metrics")]
        return merge_snapshots([self._retired, *live])


def _seq(stats: Mapping[str, Any]) -> int:
    """The sequence number a worker puts on its figures (``Worker.stats``)."""
    return int(stats.get("seq", 0))


def requests_of(metrics: Mapping[str, Any] | None) -> int:
    """Requests counted in a metrics snapshot, over all methods."""
    if not metrics:
        return 0
    return sum(int(m["requests"]) for m in metrics["methods"].values())
