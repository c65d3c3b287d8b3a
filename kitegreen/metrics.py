"""Prometheus metrics (kite's ``GoStatMetrics`` and per-method stats), one registry per server.

Each server owns a ``CollectorRegistry`` so that two servers in one process (tests, a
monolith serving two IDLs) do not collide. Per-method children are resolved once at start:
``labels()`` on the request path would hash and lock on every call.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import generate_latest
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector

LATENCY_BUCKETS = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)


class MethodStats:
    """The instruments of one method, bound to its label values."""

    __slots__ = ("errors", "latency", "requests")

    def __init__(self, metrics: Metrics, method: str) -> None:
        self.requests = metrics.requests.labels(method=method)
        self.latency = metrics.latency.labels(method=method)
        self.errors = {
            kind: metrics.errors.labels(method=method, kind=kind) for kind in metrics.ERROR_KINDS
        }

    def observe(self, seconds: float, outcome: str) -> None:
        """Count one finished request."""
        self.requests.inc()
        self.latency.observe(seconds)
        if outcome != "ok":
            self.errors[outcome].inc()


class Metrics:
    """Every metric of one server.

    Args:
        runtime: a callable returning runtime figures (greenlets, hub blocks) for the gauges.
    """

    ERROR_KINDS = ("declared", "internal", "application", "overload", "protocol")
    """``kind`` label values of ``kitegreen_request_errors_total``."""

    def __init__(self, runtime: Callable[[], dict[str, float]]) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        reg = self.registry
        self.requests = Counter(
            "kitegreen_requests", "Requests handled, by method.", ["method"], registry=reg
        )
        self.errors = Counter(
            "kitegreen_request_errors",
            "Requests that did not succeed, by method and kind "
            "(declared exception, internal error, application exception, overload, protocol).",
            ["method", "kind"],
            registry=reg,
        )
        self.latency = Histogram(
            "kitegreen_request_duration_seconds",
            "Time from a request's decoded header to its reply being sent, by method.",
            ["method"],
            buckets=LATENCY_BUCKETS,
            registry=reg,
        )
        self.connections_open = Gauge(
            "kitegreen_connections_open", "Client connections open now.", registry=reg
        )
        self.connections = Counter(
            "kitegreen_connections", "Client connections accepted.", registry=reg
        )
        self.overloads = Counter(
            "kitegreen_overload_rejections",
            "Connections and requests refused by a limit, by limit.",
            ["limit"],
            registry=reg,
        )
        self.panics = Counter(
            "kitegreen_panics",
            "Handlers that raised an exception their IDL does not declare.",
            registry=reg,
        )
        self.hub_blocks = Counter(
            "kitegreen_hub_blocked",
            "Times the gevent hub was blocked past the threshold.",
            registry=reg,
        )
        ProcessCollector(registry=reg)
        PlatformCollector(registry=reg)
        GCCollector(registry=reg)
        reg.register(_RuntimeCollector(runtime))

    def method(self, name: str) -> MethodStats:
        """Instruments for method ``name``."""
        return MethodStats(self, name)

    def exposition(self) -> bytes:
        """The registry in Prometheus text format."""
        return generate_latest(self.registry)


class _RuntimeCollector:
    """gevent's counterpart of Go's runtime stats (GC comes from ``python_gc_*``)."""

    def __init__(self, runtime: Callable[[], dict[str, float]]) -> None:
        self._runtime = runtime

    def collect(self) -> Iterable[Any]:
        figures = self._runtime()
        yield GaugeMetricFamily(
            "kitegreen_greenlets",
            "Greenlets owned by the server (connections and background).",
            value=figures.get("greenlets", 0),
        )
        yield GaugeMetricFamily(
            "kitegreen_hub_pending_callbacks",
            "Callbacks queued on the gevent hub's loop.",
            value=figures.get("pending_callbacks", 0),
        )

    def describe(self) -> Iterable[Any]:
        return []
