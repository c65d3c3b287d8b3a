"""Overload protection: the connection limit and token-bucket QPS limits (kite's overloader).

The QPS bucket is refilled every ``fill_interval`` with ``limit * fill_interval`` tokens and
holds at most one second's worth, as Kitex's ``qpsLimiter`` does. The refill is computed when a
request arrives rather than by a ticker greenlet: the same tokens, no wake-ups on an idle server.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass


class TokenBucket:
    """A QPS limit; ``limit == 0`` lets everything through."""

    __slots__ = ("fill_interval", "last_fill", "limit", "per_fill", "tokens")

    def __init__(self, limit: int, fill_interval: float, now: float) -> None:
        self.fill_interval = fill_interval
        self.limit = limit
        self.per_fill = limit * fill_interval
        self.tokens = float(limit)
        self.last_fill = now

    def ready(self, now: float) -> bool:
        """Refill for the time passed; whether a token is there to take."""
        if not self.limit:
            return True
        if now - self.last_fill >= self.fill_interval:
            fills = int((now - self.last_fill) / self.fill_interval)
            self.tokens = min(float(self.limit), self.tokens + fills * self.per_fill)
            self.last_fill += fills * self.fill_interval
        return self.tokens >= 1.0

    def spend(self) -> None:
        """Take the token :meth:`ready` found."""
        if self.limit:
            self.tokens -= 1.0

    def take(self, now: float) -> bool:
        """Spend one token if there is one."""
        if self.ready(now):
            self.spend()
            return True
        return False


@dataclass(frozen=True, slots=True)
class Limits:
    """The limits in force. 0 switches a limit off."""

    connections: int
    qps: int
    endpoint_qps: Mapping[str, int]


class Limiter:
    """Connection and QPS limits for one server, changeable at run time through :meth:`update`.

    Args:
        limits: the initial limits.
        fill_interval: seconds between QPS refills.
        enabled: False in service-mesh mode, where the sidecar owns the limits (as in kite).
        clock: a monotonic clock, injectable for tests.
    """

    def __init__(
        self,
        limits: Limits,
        fill_interval: float,
        *,
        enabled: bool = True,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._clock = clock
        self._fill_interval = fill_interval
        self.enabled = enabled
        self.limits = limits
        self.connections = 0
        """Connections open now (counted whether or not limits are enabled)."""
        self._qps = TokenBucket(limits.qps if enabled else 0, fill_interval, clock())
        self._endpoints = self._buckets(limits.endpoint_qps)
        self.limits_requests = bool(self._qps.limit or self._endpoints)
        """Whether a QPS limit may refuse a request: the request loop calls
        :meth:`admit_request` only then (four calls a request, ~900 instructions, for nothing
        with the QPS limits off)."""

    def _buckets(self, endpoint_qps: Mapping[str, int]) -> dict[str, TokenBucket]:
        if not self.enabled:
            return {}
        now = self._clock()
        return {m: TokenBucket(q, self._fill_interval, now) for m, q in endpoint_qps.items() if q}

    def update(
        self,
        *,
        connections: int | None = None,
        qps: int | None = None,
        endpoint_qps: Mapping[str, int] | None = None,
    ) -> Limits:
        """Change limits without a restart; None keeps a limit as it is.

        Returns:
            The limits now in force.
        """
        new = Limits(
            connections=self.limits.connections if connections is None else connections,
            qps=self.limits.qps if qps is None else qps,
            endpoint_qps=self.limits.endpoint_qps if endpoint_qps is None else dict(endpoint_qps),
        )
        if new.qps != self.limits.qps:
            self._qps = TokenBucket(
                new.qps if self.enabled else 0, self._fill_interval, self._clock()
            )
        if new.endpoint_qps != self.limits.endpoint_qps:
            self._endpoints = self._buckets(new.endpoint_qps)
        self.limits = new
        self.limits_requests = bool(self._qps.limit or self._endpoints)
        return new

    def admit_connection(self, *, force: bool = False) -> bool:
        """Count a new connection in, unless that would exceed the limit (or ``force``)."""
        limit = self.limits.connections
        if not force and self.enabled and limit and self.connections >= limit:
            return False
        self.connections += 1
        return True

    def release_connection(self) -> None:
        """Count a connection out."""
        self.connections -= 1

    def admit_request(self, method: str, now: float) -> str | None:
        """Take a token for one request.

        A request refused by one limit costs no token of the other: a flood of one limited
        method must not use up the server-wide tokens every other method needs.

        Returns:
            None when admitted, else which limit refused it: ``"qps"`` or ``"endpoint_qps"``.
        """
        bucket = self._endpoints.get(method)
        if bucket is None:
            return None if self._qps.take(now) else "qps"
        if not self._qps.ready(now):
            return "qps"
        if not bucket.take(now):
            return "endpoint_qps"
        self._qps.spend()
        return None
