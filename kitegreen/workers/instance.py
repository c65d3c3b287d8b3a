"""One instance, whatever the number of workers: what Consul, the debug port and the limits see.

The arbiter owns what belongs to the instance rather than to a process, once:

- **Consul registration**: registered once, for the shared listener's port; deregistered first
  when the instance stops, before any worker is told to stop.
- **Remote configuration**: watched once; a change reaches every worker over its control
  channel at once (well within the 2 s the issue asks for).
- **Limits**: ``limit_connections``, ``limit_qps`` and the per-method QPS limits stay the
  instance's. Each worker enforces its share, ``ceil(limit / n)`` for the n workers serving
  (0 stays 0, off): those that became ready, until they exit (one told to stop still serves
  what it has while it drains). The shares are sent again whenever a worker becomes ready or
  exits and whenever a limit changes; a worker starting takes the share it will have once
  ready. The instance may take in up to ``n - 1`` more than the limit through rounding, and a
  worker whose connections are busier than the others' refuses requests before the instance
  as a whole reaches its QPS limit.
- **The debug server**: one per instance, on the arbiter. ``/metrics`` sums the workers'
  counters and histograms and shows each worker's gauges with a ``pid`` label;
  ``/runtime/kite`` shows each worker and the totals; ``/health`` is 200 only while every
  wanted worker is up and the instance is not stopping.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from kitegreen._version import VERSION
from kitegreen.config import Config
from kitegreen.consul_client import ConsulConnection
from kitegreen.debug import DebugServer
from kitegreen.events import EventQueue
from kitegreen.limiter import Limits
from kitegreen.metrics import InstanceMetrics, process_figures
from kitegreen.registry import ConsulRegistry, make_registrar
from kitegreen.remote_config import RemoteConfigWatcher
from kitegreen.reporter import NullReporter, ReportGate
from kitegreen.transport.listener import ListenSpec, describe_address
from kitegreen.workers.process import READY, WorkerProcess
from kitegreen.workers.stats import InstanceStats, requests_of

CONFIG_CHANGE = "Config Change"


def share(limit: int, workers: int) -> int:
    """One worker's share of an instance's limit: ``ceil(limit / workers)``; 0 stays 0 (off)."""
    return -(-limit // workers) if limit else 0


class Instance:
    """The instance-wide parts of an arbiter: registration, remote config, limits, debug server.

    Args:
        config: the instance's settings.
        spec: what the listener is bound to.
        address: where it is bound (the TCP port, resolved if 0 was asked for).
        workers: returns the worker processes alive now.
        arbiter: returns the arbiter's own state for /runtime/kite and /metrics
            (``pid``, ``workers_wanted``, ``workers_ready``, ``generation``, ``phase``,
            ``worker_restarts``).
        healthy: whether every wanted worker is up and the instance is not stopping.
        log: a structlog logger.
    """

    def __init__(
        self,
        config: Config,
        spec: ListenSpec,
        address: tuple[str, int] | str,
        *,
        workers: Callable[[], Sequence[WorkerProcess]],
        arbiter: Callable[[], dict[str, Any]],
        healthy: Callable[[], bool],
        log: Any,
    ) -> None:
        self.config = config
        self.address = address
        self._workers = workers
        self._arbiter = arbiter
        self._healthy = healthy
        self.log = log
        self.events = EventQueue(config.event_capacity)
        self.reports = ReportGate(config.report_interval, self.events, NullReporter(), log)
        self.stats = InstanceStats()
        self._remote: dict[str, Any] = {}
        self.limits = self._compose_limits()
        self._consul = ConsulConnection(config.consul_addr, config.consul_token)
        self.registrar = make_registrar(
            config,
            spec,
            address[1] if isinstance(address, tuple) else 0,
            registry=lambda: ConsulRegistry(self._consul.client()),
            on_change=self.reports.registry_change,
            log=log,
        )
        self.remote_config: RemoteConfigWatcher | None = None
        if config.remote_config:
            self.remote_config = RemoteConfigWatcher(
                self._consul.client(),
                config.service_name,
                config.cluster,
                apply=self._apply_remote_limits,
                on_event=self.reports.remote_config_event,
                log=log,
            )
        self.metrics: InstanceMetrics | None = (
            InstanceMetrics(self._metrics_source, self._arbiter_families)
            if config.enable_metrics
            else None
        )
        self.debug_server: DebugServer | None = None
        if config.enable_debug_server:
            port = address[1] if isinstance(address, tuple) else 0
            self.debug_server = DebugServer(
                config.debug_host,
                config.effective_debug_port(port),
                max_connections=config.debug_max_connections,
                idle_timeout=config.debug_idle_timeout,
                max_per_peer=config.debug_max_connections_per_peer,
                request_timeout=config.debug_request_timeout,
                runtime=self.runtime_info,
                metrics=self.metrics.exposition if self.metrics else None,
                healthy=healthy,
                log=log,
            )

    @property
    def registered(self) -> bool:
        """Whether the instance registers in Consul (it then keeps serving ``drain_time``)."""
        return self.registrar is not None

    def start(self) -> None:
        """Start registration, the remote configuration watch and the debug server."""
        for part in (self.debug_server, self.registrar, self.remote_config):
            if part is not None:
                part.start()

    def deregister(self) -> None:
        """Deregister from Consul: the first step of stopping. Idempotent."""
        if self.registrar is not None:
            self.registrar.deregister()

    def stop(self) -> None:
        """Stop every part; idempotent."""
        for part in (self.remote_config, self.registrar, self.debug_server):
            if part is not None:
                part.stop()
        self._consul.close()

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

    def reconfigure(self, config: Config) -> None:
        """Take the local limits of a reloaded configuration, and tell the workers."""
        self.config = config
        self.limits = self._compose_limits()
        self.send_limits(source="reload")

    def send_limits(self, source: str, to: Iterable[WorkerProcess] | None = None) -> None:
        """Send the current shares to ``to`` (every live worker when None)."""
        message = {"type": "limits", "source": source, **self.worker_limits()}
        for worker in self._workers() if to is None else to:
            worker.channel.send(message)

    def _compose_limits(self) -> Limits:
        local, remote = self.config, self._remote
        return Limits(
            connections=remote.get("limit_connections", local.limit_connections),
            qps=remote.get("limit_qps", local.limit_qps),
            endpoint_qps=dict(remote.get("endpoint_qps_limits", local.endpoint_qps_limits)),
        )

    def _apply_remote_limits(self, changes: dict[str, Any]) -> None:
        for name, value in changes.items():
            if value is None:
                self._remote.pop(name, None)
            else:
                self._remote[name] = value
        before, self.limits = self.limits, self._compose_limits()
        if self.limits == before:
            return
        self.log.info(
            "limits changed",
            source="consul",
            conn=self.limits.connections,
            qps=self.limits.qps,
            endpoint_qps=dict(self.limits.endpoint_qps),
            worker_share=self.worker_limits(),
        )
        self.events.push(
            CONFIG_CHANGE,
            f"consul: conn {before.connections}->{self.limits.connections}, "
            f"qps {before.qps}->{self.limits.qps}, endpoint_qps {dict(self.limits.endpoint_qps)}",
        )
        self.send_limits(source="consul")

    # -- the debug server ----------------------------------------------------------------------

    def runtime_info(self) -> dict[str, Any]:
        """What the arbiter's ``GET /runtime/kite`` shows: the instance, each worker, totals."""
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
        conn_now = sum(int(o["conn_now"]) for o in overloads)
        conn_busy = sum(int(o["conn_busy"]) for o in overloads)
        config = self.config
        return {
            "service": config.service_name,
            "cluster": config.cluster,
            "version": {"service": config.version, "kitegreen": VERSION},
            "address": describe_address(self.address),
            "arbiter": self._arbiter(),
            "workers": rows,
            "totals": {
                "requests": requests_of(self.stats.totals()),
                "conn_now": conn_now,
                "conn_busy": conn_busy,
            },
            "overload": {
                "conn_now": conn_now,
                "conn_busy": conn_busy,
                "conn_limit": self.limits.connections,
                "qps_limit": self.limits.qps,
                "endpoint_qps_limits": dict(self.limits.endpoint_qps),
                "limits_enabled": not config.service_mesh_mode,
                "worker_share": self.worker_limits(),
            },
            "remote_configs": self.remote_config.snapshot() if self.remote_config else {},
            "events": [e.as_dict() for e in self.events.recent()],
        }

    def _metrics_source(
        self,
    ) -> tuple[
        Mapping[str, Any],
        Mapping[int | None, Mapping[str, float]],
        Mapping[int, Mapping[str, float]],
    ]:
        workers = list(self._workers())
        self.stats.refresh(workers)
        live = self.stats.live()
        gauges: dict[int | None, Mapping[str, float]] = {}
        processes: dict[int, Mapping[str, float]] = {}
        for pid, figures in live.items():
            if figures.get("metrics"):
                gauges[pid] = figures["metrics"]["gauges"]
            if figures.get("process"):
                processes[pid] = figures["process"]
        arbiter_pid = int(self._arbiter()["pid"])
        processes[arbiter_pid] = process_figures()
        return self.stats.totals(), gauges, processes

    def _arbiter_families(self) -> Iterable[Any]:
        state = self._arbiter()
        yield GaugeMetricFamily(
            "kitegreen_workers", "Worker processes serving now.", value=state["workers_ready"]
        )
        yield GaugeMetricFamily(
            "kitegreen_workers_wanted",
            "Worker processes the arbiter keeps up (--workers, changed by TTIN and TTOU).",
            value=state["workers_wanted"],
        )
        yield CounterMetricFamily(
            "kitegreen_worker_restarts",
            "Workers that exited unasked (crashed, killed, timed out) and were replaced.",
            value=state["worker_restarts"],
        )


def ready_count(workers: Iterable[WorkerProcess]) -> int:
    """How many of ``workers`` are serving."""
    return sum(1 for w in workers if w.state == READY)
