"""Live limits from Consul KV (kite's ``remoteConfiger`` / ``get_RPCConfig``).

kite's key layout, for service ``S`` in cluster ``C``:

===========================================  ==========================================
key                                          value
===========================================  ==========================================
``kite/limit/conn/S`` / ``.../S/C``          connection limit, an integer
``kite/limit/qps/S`` / ``.../S/C``           QPS limit, an integer
``kite/limit/endpoint_qps/S`` / ``.../S/C``  ``{"payload": [{"endpoint": "m", "qps_limit": N}]}``
===========================================  ==========================================

The cluster key wins over the service key; with neither, the local setting applies. Each kind
is watched with a Consul blocking query on the service's prefix, so a change arrives as soon
as Consul has it. A malformed value is rejected with a logged and reported reason and the last
good value stays in force; while Consul is unreachable the last good configuration stays in
force and the watch retries with backoff.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import gevent
from gevent.event import Event as GEvent

from kitegreen.config import check_int
from kitegreen.discovery.backoff import Backoff
from kitegreen.discovery.consul import STOP_WAIT, ConsulConnection, StopConsulCall
from kitegreen.exceptions import ConfigError, describe

KEY_PREFIX = "kite/limit"
WATCH_WAIT = "30s"
"""How long one blocking query may wait in Consul before it returns unchanged."""
MIN_QUERY_INTERVAL = 0.05
"""Floor between two queries of one watch, should Consul answer at once over and over."""

KINDS: Mapping[str, str] = {
    "conn": "limit_connections",
    "qps": "limit_qps",
    "endpoint_qps": "endpoint_qps_limits",
}
"""Key kind -> the limit it sets (the keyword of ``RpcServer.update_limits``)."""


class MalformedValue(ValueError):
    """A KV value that is not what its key needs."""


@dataclass(frozen=True, slots=True)
class RemoteValue:
    """One limit in force from Consul."""

    value: Any
    key: str
    index: int

    def as_dict(self) -> dict[str, Any]:
        """For /runtime/kite."""
        return {"value": self.value, "key": self.key, "index": self.index}


def keys_for(kind: str, service: str, cluster: str) -> tuple[str, str]:
    """The service key and the cluster key of ``kind``."""
    base = f"{KEY_PREFIX}/{kind}/{service}"
    return base, f"{base}/{cluster}"


def parse_value(kind: str, raw: bytes | None) -> Any:
    """Parse a KV value of ``kind``.

    Raises:
        MalformedValue: with the reason.
    """
    text = (raw or b"").decode("utf-8", "replace").strip()
    if kind in ("conn", "qps"):
        if not text.isdigit():
            raise MalformedValue(f"expected a non-negative integer, got {text[:80]!r}")
        return int(text)
    try:
        doc = json.loads(text)
        payload = doc["payload"]
        limits: dict[str, int] = {}
        for entry in payload:
            endpoint, qps = entry["endpoint"], entry["qps_limit"]
            if not isinstance(endpoint, str) or not endpoint:
                raise MalformedValue(f"endpoint must be a method name, got {endpoint!r}")
            try:
                check_int(f"qps_limit of {endpoint}", qps)
            except ConfigError as exc:
                raise MalformedValue(str(exc)) from None
            limits[endpoint] = qps
    except MalformedValue:
        raise
    except (ValueError, KeyError, TypeError) as exc:
        raise MalformedValue(
            'expected {"payload": [{"endpoint": "method", "qps_limit": N}]}, '
            f"got {text[:80]!r} ({describe(exc)})"
        ) from None
    return limits


class RemoteConfigWatcher:
    """Watches kite's limit keys for one service and applies what they say.

    Args:
        connection: the Consul connection the watches use, for them alone: :meth:`stop` ends
            its calls in flight and closes it.
        service: the service name in the keys.
        cluster: the cluster name in the keys.
        apply: called with ``{limit name: value or None}``; None means back to the local setting.
        on_event: called with ``(kind, detail)``: ``changed`` for applied values, ``rejected``
            for malformed ones, ``unreachable`` for Consul errors.
        log: a structlog logger.
        wait: the blocking query's wait (Consul duration).
    """

    def __init__(
        self,
        connection: ConsulConnection,
        service: str,
        cluster: str,
        *,
        apply: Callable[[dict[str, Any]], None],
        on_event: Callable[[str, str], None],
        log: Any,
        wait: str = WATCH_WAIT,
    ) -> None:
        self._connection = connection
        self._client = connection.client()
        self._service = service
        self._cluster = cluster
        self._apply = apply
        self._on_event = on_event
        self._log = log
        self._wait = wait
        self._stopping = GEvent()
        self._greenlets: list[gevent.Greenlet] = []
        self.in_force: dict[str, RemoteValue] = {}
        """Limit name -> the remote value in force."""
        self.rejected: dict[str, str] = {}
        """Key -> why its current value was rejected."""

    def start(self) -> None:
        """Start one watch greenlet per kind; idempotent."""
        if self._greenlets or self._stopping.is_set():
            return
        self._greenlets = [gevent.spawn(self._watch, kind) for kind in KINDS]

    def stop(self) -> None:
        """Stop the watches and close their connection; idempotent; never raises.

        An open blocking query is abandoned by shutting its socket down (see
        :class:`~kitegreen.discovery.consul.ConsulConnection`); a watch still running after
        :data:`~kitegreen.discovery.consul.STOP_WAIT` is killed.
        """
        self._stopping.set()
        greenlets, self._greenlets = self._greenlets, []
        self._connection.interrupt()
        # Not killall(block=True, timeout=...): that raises gevent.Timeout in the caller when
        # the greenlets are slow to run (a loaded machine), and a stop that raises leaves the
        # instance's other parts running.
        gevent.joinall(greenlets, timeout=STOP_WAIT)
        gevent.killall([g for g in greenlets if not g.dead], StopConsulCall, block=False)
        self._connection.close()

    def snapshot(self) -> dict[str, Any]:
        """What /runtime/kite shows: each remote value in force, and rejected keys."""
        doc: dict[str, Any] = {name: v.as_dict() for name, v in self.in_force.items()}
        if self.rejected:
            doc["rejected"] = dict(self.rejected)
        return doc

    def _watch(self, kind: str) -> None:
        try:
            self._watch_loop(kind)
        except StopConsulCall:
            return

    def _watch_loop(self, kind: str) -> None:
        service_key, cluster_key = keys_for(kind, self._service, self._cluster)
        index: int | None = None
        backoff = Backoff()
        failing = False
        while not self._stopping.is_set():
            try:
                new_index, items = self._client.kv.get(
                    service_key, recurse=True, index=index, wait=self._wait
                )
            except Exception as exc:  # noqa: BLE001 - keep the last good config, retry
                if self._stopping.is_set():
                    return  # the call was cut short by stop()
                delay = backoff.next()
                if not failing:
                    self._log.warning(
                        "remote config unreachable; keeping the last good values",
                        kind=kind,
                        error=describe(exc)[:300],
                        retry_in=round(delay, 2),
                    )
                    self._on_event("unreachable", f"{kind}: {describe(exc)}"[:300])
                failing = True
                self._stopping.wait(delay)
                continue
            if failing:
                self._log.info("remote config reachable again", kind=kind)
            failing = False
            backoff.reset()
            new_index = _as_index(new_index)
            # Consul's rules for blocking queries: an index that goes backwards means the
            # servers' state was reset; start over rather than wait for a past index forever.
            if index is not None and new_index < index:
                index = 0
            else:
                changed = new_index != index
                index = new_index
                if changed or index == 0:
                    self._update(kind, service_key, cluster_key, items or [], index)
            self._stopping.wait(MIN_QUERY_INTERVAL)

    def _update(
        self, kind: str, service_key: str, cluster_key: str, items: list[dict[str, Any]], index: int
    ) -> None:
        values = {item.get("Key"): item.get("Value") for item in items}
        limit = KINDS[kind]
        previous = self.in_force.get(limit)
        chosen: RemoteValue | None = None
        # The cluster key first; a malformed cluster key does not fall back to the service key:
        # the operator meant the cluster value, and the last good one stays.
        for key in (cluster_key, service_key):
            if key not in values:
                self.rejected.pop(key, None)
                continue
            try:
                chosen = RemoteValue(parse_value(kind, values[key]), key, index)
            except MalformedValue as exc:
                if self.rejected.get(key) != str(exc):
                    self._log.warning(
                        "remote config value rejected; keeping the last good one",
                        key=key,
                        reason=str(exc),
                    )
                    self._on_event("rejected", f"{key}: {exc}")
                self.rejected[key] = str(exc)
                return
            self.rejected.pop(key, None)
            break
        if chosen is None:
            if previous is None:
                return
            del self.in_force[limit]
            self._apply({limit: None})
            self._on_event("changed", f"{limit}: back to the local setting (keys removed)")
            return
        if previous is not None and previous.value == chosen.value and previous.key == chosen.key:
            self.in_force[limit] = chosen  # same value, newer index
            return
        self.in_force[limit] = chosen
        self._apply({limit: chosen.value})
        self._on_event("changed", f"{limit} = {chosen.value} from {chosen.key} (index {index})")


def _as_index(value: Any) -> int:
    try:
        index = int(value)
    except (TypeError, ValueError):
        return 0
    return max(index, 0)
