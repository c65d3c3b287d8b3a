"""The workers of one instance, as its :class:`~kitegreen.instance.Instance` governs them.

- **Limits**: ``limit_connections``, ``limit_qps`` and the per-method QPS limits stay the
  instance's. Each worker enforces its share, ``ceil(limit / n)`` for the n workers serving
  (0 stays 0, off): those that became ready, until they exit (one told to stop still serves
  what it has while it drains). The shares are sent again whenever a worker becomes ready or
  exits and whenever a limit changes; a worker starting takes the share it will have once
  ready. The instance may take in up to ``n - 1`` more than the limit through rounding, and a
  worker whose connections are busier than the others' refuses requests before the instance
  as a whole reaches its QPS limit.
- **What the debug server shows**: ``/metrics`` sums the workers' counters and histograms and
  shows each worker's gauges with a ``worker`` label, its number (see
  ``observability/metrics.py``); ``/runtime/kite`` shows each worker and the
  totals; ``/health`` is 200 only while every wanted worker is up and the instance is not
  stopping.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from kitegreen.config import Config
from kitegreen.limiter import Limits
from kitegreen.observability.metrics import InstanceMetrics, instance_figures, process_figures
from kitegreen.workers.process import READY, WorkerProcess
from kitegreen.workers.stats import InstanceStats, requests_of


def share(limit: int, workers: int) -> int:
    """One worker's share of an instance's limit: ``ceil(limit / workers)``; 0 stays 0 (off)."""
    return -(-limit // workers) if limit else 0


class Fleet:
    """The worker processes of an arbiter, seen as one data plane (a
    :class:`~kitegreen.instance.Serving`).

    Args:
        config: the instance's settings (``enable_metrics``).
        limits: the instance's limits at start.
        workers: returns the worker processes alive now.
        arbiter: returns the arbiter's own state for /runtime/kite and /metrics
            (``pid``, ``workers_wanted``, ``workers_ready``, ``generation``, ``phase``,
            ``worker_restarts``).
        healthy: whether every wanted worker is up and the instance is not stopping.
    """

    def __init__(
        self,
        config: Config,
        limits: Limits,
        *,
        workers: Callable[[], Sequence[WorkerProcess]],
        arbiter: Callable[[], dict[str, Any]],
        healthy: Callable[[], bool],
    ) -> None:
        self._workers = workers
        self._arbiter = arbiter
        self._healthy = healthy
        self.limits = limits
        self.stats = InstanceStats()
        self.metrics: InstanceMetrics | None = (
            InstanceMetrics(self._metrics_source) if config.enable_metrics else None
        )

    # -- Serving -------------------------------------------------------------------------------

    def apply_limits(self, limits: Limits, source: str) -> dict[str, Any]:
        """Send every live worker its share of ``limits``."""
        self.limits = limits
        self.send_limits(source)
        return {"worker_share": self.worker_limits()}

    def load(self) -> dict[str, Any]:
        """The workers' connections, summed, as of the last :meth:`runtime`, and one worker's
        share of the limits."""
        overloads = [o for o in self._overloads() if o]
        return {
            "conn_now": sum(int(o["conn_now"]) for o in overloads),
            "conn_busy": sum(int(o["conn_busy"]) for o in overloads),
            "worker_share": self.worker_limits(),
        }

    def runtime(self) -> dict[str, Any]:
        """The arbiter, each worker, the totals."""
        workers = list(self._workers())
        self.stats.refresh(workers)
        live = self.stats.live()
        now = time.monotonic()
        rows = []
        for worker in workers:
            figures = live.get(worker.pid, {})
            rows.append(
                {
                    **worker.as_dict(now),
                    "stale": worker.pid in self.stats.stale,
                    "requests": requests_of(figures.get("metrics")),
                    "overload": figures.get("overload"),
                }
            )
        overloads = [row["overload"] for row in rows if row["overload"]]
        return {
            "arbiter": self._arbiter(),
            "workers": rows,
            "totals": {
                "requests": requests_of(self.stats.totals()),
                "conn_now": sum(int(o["conn_now"]) for o in overloads),
                "conn_busy": sum(int(o["conn_busy"]) for o in overloads),
            },
        }

    def healthy(self) -> bool:
        """Every wanted worker is up and the instance is not stopping."""
        return self._healthy()

    def metrics_exposition(self) -> Callable[[], bytes] | None:
        """The instance's metrics: the workers' summed, the processes' gauges."""
        return self.metrics.exposition if self.metrics else None

    # -- limits --------------------------------------------------------------------------------

    def serving(self) -> int:
        """The workers that hold a share of the limits: ready, and not exited yet."""
        return sum(1 for w in self._workers() if w.ready_at is not None and not w.exited)

    def worker_limits(self, workers: int | None = None) -> dict[str, Any]:
        """One worker's share of the limits, as ``Config`` fields.

        Args:
            workers: how many share them; the workers serving when None (a worker being
                spawned is given the share it will have once ready).
        """
        n = max(self.serving() if workers is None else workers, 1)
        return {
            "limit_connections": share(self.limits.connections, n),
            "limit_qps": share(self.limits.qps, n),
            "endpoint_qps_limits": {m: share(q, n) for m, q in self.limits.endpoint_qps.items()},
        }

    def send_limits(self, source: str, to: Iterable[WorkerProcess] | None = None) -> None:
        """Send the current shares to ``to`` (every live worker when None)."""
        message = {"type": "limits", "source": source, **self.worker_limits()}
        for worker in self._workers() if to is None else to:
            worker.channel.send(message)

    # -- metrics -------------------------------------------------------------------------------

    def _overloads(self) -> list[Any]:
        # The figures of the last refresh: runtime() has just asked every worker.
        live = self.stats.live()
        return [live.get(w.pid, {}).get("overload") for w in self._workers()]

    def _metrics_source(
        self,
    ) -> tuple[
        Mapping[str, Any],
        Mapping[str, Mapping[str, float]],
        Mapping[str, float],
        Mapping[str, float],
    ]:
        workers = list(self._workers())
        self.stats.refresh(workers)
        live = self.stats.live()
        ranks = {w.pid: w.rank for w in workers}
        by_rank: dict[str, dict[str, float]] = {}
        processes = []
        for pid, figures in live.items():
            if pid not in ranks:
                continue
            process = figures.get("process") or {}
            processes.append(process)
            gauges = (figures.get("metrics") or {}).get("gauges", {})
            # A reload's new worker runs beside the one it replaces, under the same number:
            # their figures are added.
            into = by_rank.setdefault(str(ranks[pid]), {})
            for name, value in (*gauges.items(), *process.items()):
                into[name] = into.get(name, 0.0) + value
        state = self._arbiter()
        instance = {
            "workers": state["workers_ready"],
            "workers_wanted": state["workers_wanted"],
            "worker_restarts": state["worker_restarts"],
        }
        figures = instance_figures(process_figures(), processes, self.stats.retired_process)
        return self.stats.totals(), by_rank, figures, instance


def ready_count(workers: Iterable[WorkerProcess]) -> int:
    """How many of ``workers`` are serving."""
    return sum(1 for w in workers if w.state == READY)
