"""Prometheus metrics (kite's ``GoStatMetrics`` and per-method stats), one registry per server.

The request path only bumps plain integers; a collector turns them into Prometheus families
when ``/metrics`` is scraped. prometheus-client's own ``Counter.inc()`` plus
``Histogram.observe()`` take a lock each (a gevent lock once ``threading`` is patched) and cost
about 3.4 µs per request here, against 0.2 µs for the integers. Plain integers are safe because
every greenlet of a server runs in one hub thread and greenlets never preempt one another.

Each server owns a ``CollectorRegistry`` so that two servers in one process (tests, a monolith
serving two IDLs) do not collide.

With ``--workers N`` the counters live in N processes. Each worker hands the arbiter a
:meth:`Metrics.snapshot` (plain JSON-able numbers) over its control channel;
:func:`merge_snapshots` sums them and :class:`InstanceMetrics` serves the sum from the arbiter's
debug server. The families are built by one function, :func:`families`, for one process and for
the instance alike, so the two expositions cannot drift apart: one process exposes the same
families as an instance of N workers, with the same labels.

- Counters and histograms (``kitegreen_requests_total``, ...) are the instance's: summed over
  the workers, those that exited included.
- ``process_*`` and ``python_gc_*`` (prometheus-client's names) are the instance's too: memory,
  descriptors and CPU summed over the arbiter and its workers (CPU and collections of exited
  workers included, so counters never go backwards); ``process_max_fds`` and
  ``process_start_time_seconds`` are the arbiter's, the instance's start.
- Gauges of one worker (``kitegreen_connections_open``, ``kitegreen_greenlets``,
  ``kitegreen_hub_pending_callbacks``, ``kitegreen_worker_resident_memory_bytes``,
  ``kitegreen_worker_cpu_seconds_total``) have a ``worker`` label: the worker's number, 0 to
  N-1, which its replacement takes over (a reload, a crash), so a reload or TTIN/TTOU makes
  no new series. One process is worker ``"0"``. While a reload replaces the worker of a number,
  the figures of both processes are added.
- ``kitegreen_workers``, ``kitegreen_workers_wanted``, ``kitegreen_worker_restarts_total``: 1,
  1 and 0 in one process; ``kitegreen_build_info{version, python}`` is 1.
"""

from __future__ import annotations

import gc
import math
import platform
from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
)
from prometheus_client.exposition import generate_latest
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector

from kitegreen._version import VERSION

LATENCY_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
    2.5, 5.0, 10.0,
)  # fmt: skip
ERROR_KINDS = ("declared", "internal", "application", "overload", "protocol", "timeout")
"""``kind`` label values of ``kitegreen_request_errors_total``."""
OVERLOAD_LIMITS = ("connections", "qps", "endpoint_qps", "memory")
PROTOCOL_ERROR_KINDS = ("malformed", "message_type", "arguments", "memory")
"""``kind`` label values of ``kitegreen_protocol_errors_total``: a connection ended on input
that is not a message it can read (no known wire, a bad frame or header, past
``max_frame_size``); a message that is not a call; a known method's undecodable arguments
(also counted in ``kitegreen_request_errors_total{kind="protocol"}``); a message whose
decoded arguments would pass ``max_message_memory``. ``limit="memory"`` of the overload
counter is a request shed by ``max_inflight_memory``."""


class MethodStats:
    """The counters of one method."""

    __slots__ = ("buckets", "errors", "latency_sum")

    def __init__(self) -> None:
        self.latency_sum = 0.0
        # One slot per bucket bound plus +Inf; cumulated only when scraped.
        self.buckets = [0] * (len(LATENCY_BUCKETS) + 1)
        self.errors = dict.fromkeys(ERROR_KINDS, 0)

    @property
    def requests(self) -> int:
        """Requests finished: every one lands in one bucket (counted at scrape time, not per
        request)."""
        return sum(self.buckets)

    def observe(self, seconds: float, outcome: str) -> None:
        """Count one finished request."""
        self.latency_sum += seconds
        self.buckets[bisect_left(LATENCY_BUCKETS, seconds)] += 1
        if outcome != "ok":
            self.errors[outcome] += 1


class Metrics:
    """Every metric of one server.

    Args:
        runtime: returns gauges read at scrape time: ``connections_open``, ``greenlets``,
            ``pending_callbacks``.
    """

    def __init__(self, runtime: Callable[[], Mapping[str, float]]) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.methods: dict[str, MethodStats] = {}
        self.connections = 0
        self.overloads = dict.fromkeys(OVERLOAD_LIMITS, 0)
        self.panics = 0
        self.hub_blocks = 0
        self.unknown_methods = 0
        self.protocol_errors = dict.fromkeys(PROTOCOL_ERROR_KINDS, 0)
        self._runtime = runtime
        # python_info; process_* and python_gc_* are built by families(), as for workers.
        PlatformCollector(registry=self.registry)
        self.registry.register(self)

    def method(self, name: str) -> MethodStats:
        """The counters of method ``name``, created on first use."""
        stats = self.methods.get(name)
        if stats is None:
            stats = self.methods[name] = MethodStats()
        return stats

    def connection_accepted(self) -> None:
        """Count one client connection accepted."""
        self.connections += 1

    def panicked(self) -> None:
        """Count one handler panic."""
        self.panics += 1

    def hub_blocked(self) -> None:
        """Count one time the gevent hub was blocked past the threshold."""
        self.hub_blocks += 1

    def overload(self, limit: str) -> None:
        """Count one connection or request refused by ``limit``."""
        self.overloads[limit] = self.overloads.get(limit, 0) + 1

    def unknown_method(self) -> None:
        """Count one call of a method the service does not have (its name is not a label: a
        client may send any)."""
        self.unknown_methods += 1

    def protocol_error(self, kind: str) -> None:
        """Count one protocol error of ``kind``, one of :data:`PROTOCOL_ERROR_KINDS`."""
        self.protocol_errors[kind] = self.protocol_errors.get(kind, 0) + 1

    def exposition(self) -> bytes:
        """The registry in Prometheus text format."""
        return generate_latest(self.registry)

    def snapshot(self) -> dict[str, Any]:
        """Every counter, histogram and gauge of this server as plain JSON-able numbers.

        What a worker sends its arbiter, which sums the workers' with :func:`merge_snapshots`.
        Counters only grow for the life of the server, so a sum that keeps a stopped worker's
        last snapshot never goes backwards.
        """
        return {
            "methods": {
                name: {
                    "requests": stats.requests,
                    "latency_sum": stats.latency_sum,
                    "buckets": list(stats.buckets),
                    "errors": dict(stats.errors),
                }
                for name, stats in self.methods.items()
            },
            "connections": self.connections,
            "overloads": dict(self.overloads),
            "panics": self.panics,
            "hub_blocks": self.hub_blocks,
            "unknown_methods": self.unknown_methods,
            "protocol_errors": dict(self.protocol_errors),
            "gauges": {name: float(value) for name, value in self._runtime().items()},
        }

    def describe(self) -> Iterable[Any]:
        """Nothing to pre-describe: families are built at collection."""
        return []

    def collect(self) -> Iterable[Any]:
        """Build the kitegreen_* families from the counters (called by the registry)."""
        snapshot = self.snapshot()
        figures = process_figures()
        yield from families(
            snapshot,
            {"0": {**snapshot["gauges"], **figures}},
            figures,
            ONE_PROCESS,
        )


ONE_PROCESS: Mapping[str, float] = {"workers": 1, "workers_wanted": 1, "worker_restarts": 0}
"""The instance figures of one process: the worker it is, no restart."""


def empty_snapshot() -> dict[str, Any]:
    """A snapshot with nothing counted: the sum of no workers."""
    return {
        "methods": {},
        "connections": 0,
        "overloads": dict.fromkeys(OVERLOAD_LIMITS, 0),
        "panics": 0,
        "hub_blocks": 0,
        "unknown_methods": 0,
        "protocol_errors": dict.fromkeys(PROTOCOL_ERROR_KINDS, 0),
        "gauges": {},
    }


def merge_snapshots(snapshots: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """The sum of :meth:`Metrics.snapshot` values: counters, buckets and gauges added up.

    Args:
        snapshots: snapshots of servers running the same service.

    Returns:
        One snapshot; a method counted by any of them is in it.
    """
    total = empty_snapshot()
    methods: dict[str, Any] = total["methods"]
    for snap in snapshots:
        for name, stats in snap.get("methods", {}).items():
            into = methods.setdefault(
                name,
                {
                    "requests": 0,
                    "latency_sum": 0.0,
                    "buckets": [0] * (len(LATENCY_BUCKETS) + 1),
                    "errors": dict.fromkeys(ERROR_KINDS, 0),
                },
            )
            into["requests"] += stats["requests"]
            into["latency_sum"] += stats["latency_sum"]
            buckets = zip(into["buckets"], stats["buckets"], strict=True)
            into["buckets"] = [a + b for a, b in buckets]
            for kind, count in stats["errors"].items():
                into["errors"][kind] = into["errors"].get(kind, 0) + count
        for key in ("connections", "panics", "hub_blocks", "unknown_methods"):
            total[key] += snap.get(key, 0)
        for key in ("overloads", "protocol_errors"):
            for kind, count in snap.get(key, {}).items():
                total[key][kind] = total[key].get(kind, 0) + count
        for name, value in snap.get("gauges", {}).items():
            total["gauges"][name] = total["gauges"].get(name, 0.0) + value
    return total


_PROCESS_GAUGES = (
    ("process_virtual_memory_bytes", "Virtual memory size in bytes."),
    ("process_resident_memory_bytes", "Resident memory size in bytes."),
    ("process_open_fds", "Number of open file descriptors."),
)
"""Gauges of a process that add up over an instance's processes."""
_PROCESS_OWN = (
    ("process_start_time_seconds", "Start time of the process since unix epoch in seconds."),
    ("process_max_fds", "Maximum number of open file descriptors."),
)
"""Gauges of a process that an instance takes from its arbiter."""
CPU = "process_cpu_seconds_total"
_GC_COUNTERS = (
    ("python_gc_objects_collected", "collected", "Objects collected during gc"),
    ("python_gc_objects_uncollectable", "uncollectable", "Uncollectable objects found during GC"),
    ("python_gc_collections", "collections", "Number of times this generation was collected"),
)
"""prometheus-client's GC families: name, key of ``gc.get_stats()``, help."""


def process_figures() -> dict[str, float]:
    """This process's ``process_*`` samples (memory, CPU, descriptors), as prometheus-client's
    process collector reads them (none where it cannot: no ``/proc``), and its garbage
    collector's counts, as ``python_gc_collections_total/0`` and so on."""
    figures: dict[str, float] = {}
    for family in ProcessCollector(registry=None).collect():
        for sample in family.samples:
            figures[sample.name] = float(sample.value)
    for generation, stats in enumerate(gc.get_stats()):
        for name, key, _ in _GC_COUNTERS:
            figures[f"{name}_total/{generation}"] = float(stats[key])
    return figures


def is_counter_figure(name: str) -> bool:
    """Whether a figure of :func:`process_figures` is a counter (kept once its process is
    gone, so that the instance's sum never goes backwards)."""
    return name == CPU or name.startswith("python_gc_")


def instance_figures(
    arbiter: Mapping[str, float],
    workers: Iterable[Mapping[str, float]],
    retired: Mapping[str, float],
) -> dict[str, float]:
    """The :func:`process_figures` of an instance: the arbiter's start time and descriptor
    limit; everything else added up over the arbiter and its workers, with the counters of
    exited workers (``retired``)."""
    total = dict(arbiter)
    for figures in workers:
        for name, value in figures.items():
            if not name.startswith(tuple(own for own, _ in _PROCESS_OWN)):
                total[name] = total.get(name, 0.0) + value
    for name, value in retired.items():
        total[name] = total.get(name, 0.0) + value
    return total


def families(
    snapshot: Mapping[str, Any],
    workers: Mapping[str, Mapping[str, float]],
    process: Mapping[str, float],
    instance: Mapping[str, float],
) -> Iterator[Any]:
    """Every family of an exposition but ``python_info``, for one process or an instance.

    Args:
        snapshot: counters and histograms, of one server or summed over workers.
        workers: per worker number (``"0"`` for one process): its runtime gauges and its
            :func:`process_figures`.
        process: the :func:`process_figures` of the process, or the instance's
            (:func:`instance_figures`).
        instance: ``workers`` (serving), ``workers_wanted``, ``worker_restarts``.
    """
    requests = CounterMetricFamily(
        "kitegreen_requests", "Requests handled, by method.", labels=["method"]
    )
    errors = CounterMetricFamily(
        "kitegreen_request_errors",
        "Requests that did not succeed, by method and kind (declared exception, internal "
        "error, application exception, overload, protocol, timeout: cut off at the "
        "caller's RPC timeout).",
        labels=["method", "kind"],
    )
    latency = HistogramMetricFamily(
        "kitegreen_request_duration_seconds",
        "Time from a request's first byte read to its reply written to the socket, by method.",
        labels=["method"],
    )
    for name, stats in snapshot["methods"].items():
        requests.add_metric([name], stats["requests"])
        for kind, count in stats["errors"].items():
            errors.add_metric([name, kind], count)
        cumulative, running = [], 0
        for bound, count in zip((*LATENCY_BUCKETS, math.inf), stats["buckets"], strict=True):
            running += count
            cumulative.append((_bound(bound), running))
        latency.add_metric([name], cumulative, stats["latency_sum"])
    yield from (requests, errors, latency)

    overloads = CounterMetricFamily(
        "kitegreen_overload_rejections",
        "Connections and requests refused by a limit, by limit.",
        labels=["limit"],
    )
    for limit, count in snapshot["overloads"].items():
        overloads.add_metric([limit], count)
    yield overloads
    yield CounterMetricFamily(
        "kitegreen_connections", "Client connections accepted.", value=snapshot["connections"]
    )
    yield CounterMetricFamily(
        "kitegreen_panics",
        "Handlers that raised an exception their IDL does not declare.",
        value=snapshot["panics"],
    )
    yield CounterMetricFamily(
        "kitegreen_hub_blocked",
        "Times the gevent hub was blocked past the threshold.",
        value=snapshot["hub_blocks"],
    )
    yield CounterMetricFamily(
        "kitegreen_unknown_method",
        "Calls of a method the service does not have (answered UNKNOWN_METHOD).",
        value=snapshot.get("unknown_methods", 0),
    )
    protocol = CounterMetricFamily(
        "kitegreen_protocol_errors",
        "Input refused by kind: malformed (a connection ended on bytes that are not a message "
        "it can read), message_type (not a call), arguments (a method's undecodable "
        "arguments).",
        labels=["kind"],
    )
    for kind in PROTOCOL_ERROR_KINDS:
        protocol.add_metric([kind], snapshot.get("protocol_errors", {}).get(kind, 0))
    yield protocol
    for name, key, text in _GAUGES:
        family = GaugeMetricFamily(name, text, labels=["worker"])
        for worker, figures in _by_number(workers):
            family.add_metric([worker], figures.get(key, 0.0))
        yield family
    cpu = CounterMetricFamily(
        "kitegreen_worker_cpu_seconds",
        "User and system CPU time of a worker's process, by worker number.",
        labels=["worker"],
    )
    for worker, figures in _by_number(workers):
        cpu.add_metric([worker], figures.get(CPU, 0.0))
    yield cpu
    yield from _process_families(process)
    yield GaugeMetricFamily(
        "kitegreen_workers", "Worker processes serving now.", value=instance["workers"]
    )
    yield GaugeMetricFamily(
        "kitegreen_workers_wanted",
        "Worker processes the arbiter keeps up (--workers, changed by TTIN and TTOU).",
        value=instance["workers_wanted"],
    )
    yield CounterMetricFamily(
        "kitegreen_worker_restarts",
        "Workers that exited unasked (crashed, killed, timed out) and were replaced.",
        value=instance["worker_restarts"],
    )
    build = GaugeMetricFamily(
        "kitegreen_build_info",
        "kitegreen's version and the Python version it runs on; always 1.",
        labels=["version", "python"],
    )
    build.add_metric([VERSION, platform.python_version()], 1)
    yield build


_GAUGES = (
    ("kitegreen_connections_open", "connections_open", "Client connections open now."),
    (
        "kitegreen_greenlets",
        "greenlets",
        "Greenlets owned by the server (connections and background).",
    ),
    (
        "kitegreen_hub_pending_callbacks",
        "pending_callbacks",
        "Callbacks queued on the gevent hub's loop.",
    ),
    (
        "kitegreen_worker_resident_memory_bytes",
        "process_resident_memory_bytes",
        "Resident memory of a worker's process in bytes.",
    ),
)


def _by_number(workers: Mapping[str, Mapping[str, float]]) -> list[tuple[str, Any]]:
    return sorted(workers.items(), key=lambda item: int(item[0]))


def _process_families(figures: Mapping[str, float]) -> Iterator[Any]:
    """prometheus-client's process and GC families, from :func:`process_figures` (none of a
    kind the platform does not give)."""
    for name, text in (*_PROCESS_GAUGES, *_PROCESS_OWN):
        if name in figures:
            yield GaugeMetricFamily(name, text, value=figures[name])
    if CPU in figures:
        yield CounterMetricFamily(
            CPU.removesuffix("_total"),
            "Total user and system CPU time spent in seconds.",
            value=figures[CPU],
        )
    for name, _, text in _GC_COUNTERS:
        family = CounterMetricFamily(name, text, labels=["generation"])
        prefix = f"{name}_total/"
        for key, value in sorted(figures.items()):
            if key.startswith(prefix):
                family.add_metric([key.removeprefix(prefix)], value)
        if family.samples:
            yield family


class InstanceMetrics:
    """The metrics of an instance of several worker processes, served by the arbiter.

    Args:
        source: returns the arguments of :func:`families` at each scrape: ``(summed snapshot,
            figures per worker number, the instance's process figures, instance figures)``.
    """

    def __init__(
        self,
        source: Callable[
            [],
            tuple[
                Mapping[str, Any],
                Mapping[str, Mapping[str, float]],
                Mapping[str, float],
                Mapping[str, float],
            ],
        ],
    ) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._source = source
        PlatformCollector(registry=self.registry)
        self.registry.register(self)

    def exposition(self) -> bytes:
        """The instance's metrics in Prometheus text format."""
        return generate_latest(self.registry)

    def describe(self) -> Iterable[Any]:
        """Nothing to pre-describe: families are built at collection."""
        return []

    def collect(self) -> Iterable[Any]:
        """The instance's families (see the module's docstring)."""
        yield from families(*self._source())


def _bound(value: float) -> str:
    return "+Inf" if value == math.inf else repr(value)
