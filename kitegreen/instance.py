"""The control plane of one kitegreen instance, built once whatever the number of processes.

An :class:`Instance` owns what belongs to the instance rather than to the code that serves
requests: the recent-event ring and the rate-limited reports, the limits (the local settings
with Consul's on top), the Consul registration, the remote-configuration watch, the debug
server, ``runtime_info`` and the metrics it exposes. (The watch of a hub belongs to the
process whose handlers run on it: the engine's.)

It governs a :class:`Serving`, the data plane seen from above:

- one process: :class:`~kitegreen.server.RpcServer` runs an
  :class:`~kitegreen.rpc.engine.Engine` and an instance governing it in the same process;
- ``--workers N``: the arbiter runs the instance, governing its
  :class:`~kitegreen.workers.fleet.Fleet`; each worker is an engine that takes its share of
  the limits over its control channel.

The rules for the limits are the same in both: each limit in force is Consul's value while
Consul sets one (the cluster key over the service key), else the local setting (the
configuration, as changed since by ``update_limits()`` or a reload); a key removed or
deleted brings the local setting back; while Consul is unreachable the last values stay.
Each change that alters the limits in force is one ``limits changed`` log line and one
``Config Change`` event.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Protocol

from kitegreen._version import VERSION
from kitegreen.config import Config, check_endpoint_qps_limits, check_int
from kitegreen.discovery.consul import ConsulConnection
from kitegreen.discovery.registry import ConsulRegistry, Registrar, Registry, make_registrar
from kitegreen.discovery.remote_config import RemoteConfigWatcher
from kitegreen.exceptions import describe
from kitegreen.limiter import Limits
from kitegreen.observability.debug import DebugServer
from kitegreen.observability.events import Event, EventQueue
from kitegreen.observability.reporter import ReportGate
from kitegreen.transport.listener import Binding, describe_address

CONFIG_CHANGE = "Config Change"
"""The event of a change to the limits in force."""
STOP_PHASE = "Stop Phase"
"""The event of each phase of a stop (see :data:`STOP_PHASES`)."""
STOP_PHASES = ("deregistered", "stopped accepting", "drained", "stopped")
"""The phases of a graceful stop, in order, in both modes: the instance has left the registry
(``drain_time`` then passes, serving as usual); no connection is accepted any more; the
requests in flight have finished (or were cut off); the background greenlets have stopped."""


class Serving(Protocol):
    """The data plane an :class:`Instance` governs."""

    def apply_limits(self, limits: Limits, source: str) -> dict[str, Any]:
        """Enforce the instance's ``limits`` (``source`` said who changed them).

        Returns:
            What to add to the ``limits changed`` log line (with workers: each one's share).
        """

    def load(self) -> dict[str, Any]:
        """``conn_now`` and ``conn_busy`` now, plus what ``overload`` shows in this mode."""

    def runtime(self) -> dict[str, Any]:
        """What ``/runtime/kite`` shows in this mode besides the instance's own keys."""

    def healthy(self) -> bool:
        """What ``/health`` says: serving, and not stopping."""

    def metrics_exposition(self) -> Callable[[], bytes] | None:
        """What ``/metrics`` serves; None with metrics off."""


class LimitLayers:
    """The limits in force: the local settings, with the ones Consul sets on top.

    Args:
        local: the limits of the configuration.
    """

    def __init__(self, local: Limits) -> None:
        self._local = local
        self._remote: dict[str, Any] = {}

    @property
    def in_force(self) -> Limits:
        """Consul's value where it sets one, the local setting elsewhere."""
        local, remote = self._local, self._remote
        return Limits(
            connections=remote.get("limit_connections", local.connections),
            qps=remote.get("limit_qps", local.qps),
            endpoint_qps=dict(remote.get("endpoint_qps_limits", local.endpoint_qps)),
        )

    def set_local(
        self,
        *,
        connections: int | None = None,
        qps: int | None = None,
        endpoint_qps: Mapping[str, int] | None = None,
    ) -> None:
        """Change local settings; None keeps one."""
        local = self._local
        self._local = Limits(
            local.connections if connections is None else connections,
            local.qps if qps is None else qps,
            dict(local.endpoint_qps if endpoint_qps is None else endpoint_qps),
        )

    def set_remote(self, changes: Mapping[str, Any]) -> None:
        """Apply a remote-config change: ``{limit name: value}``; None removes Consul's value,
        bringing back the local setting."""
        for name, value in changes.items():
            if value is None:
                self._remote.pop(name, None)
            else:
                self._remote[name] = value


def local_limits(config: Config) -> Limits:
    """The limits ``config`` sets."""
    return Limits(config.limit_connections, config.limit_qps, dict(config.endpoint_qps_limits))


class Instance:
    """Events, reports, limits, registration, remote config, debug server, hub watch.

    Args:
        config: the instance's settings.
        serving: the data plane it governs.
        events: the recent-event ring.
        reports: the rate-limited reports (recording to ``events``).
        log: a structlog logger.
        registry: where to register when ``config.register`` is on; Consul at
            ``config.consul_addr`` when None.
    """

    def __init__(
        self,
        config: Config,
        serving: Serving,
        *,
        events: EventQueue,
        reports: ReportGate,
        log: Any,
        registry: Registry | None = None,
    ) -> None:
        self.config = config
        self.serving = serving
        self.events = events
        self.reports = reports
        self.log = log
        self._registry = registry
        self._layers = LimitLayers(local_limits(config))
        self.limits = self._layers.in_force
        self._consul = ConsulConnection(config.consul_addr, config.consul_token)
        self.binding: Binding | None = None
        self.registrar: Registrar | None = None
        self.debug_server: DebugServer | None = None
        self.remote_config: RemoteConfigWatcher | None = None
        if config.remote_config:
            self.remote_config = RemoteConfigWatcher(
                ConsulConnection(config.consul_addr, config.consul_token),
                config.service_name,
                config.cluster,
                apply=self._apply_remote_limits,
                on_event=self.reports.remote_config_event,
                log=log,
            )
        self._running: list[Any] = []

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self, binding: Binding) -> None:
        """Register, start the debug server and the remote-config watch, for an instance
        listening at ``binding``. On failure what was started is stopped again, and
        ``start()`` may be called again.
        """
        config = self.config
        self.binding = binding
        self.registrar = make_registrar(
            config,
            binding.spec,
            binding.port,
            registry=lambda: self._registry or ConsulRegistry(self._consul.client()),
            on_change=self.reports.registry_change,
            log=self.log,
        )
        if config.enable_debug_server:
            self.debug_server = DebugServer(
                config.debug_host,
                # The setting, not the bound port: a service on a free port (0) gets its debug
                # server on a free port too, never one derived from a port chosen at random.
                config.effective_debug_port(config.port),
                max_connections=config.debug_max_connections,
                idle_timeout=config.debug_idle_timeout,
                max_per_peer=config.debug_max_connections_per_peer,
                request_timeout=config.debug_request_timeout,
                runtime=self.runtime_info,
                metrics=self.serving.metrics_exposition(),
                healthy=self.serving.healthy,
                log=self.log,
                optional=config.debug_optional,
            )
        try:
            for part in (self.registrar, self.debug_server, self.remote_config):
                if part is not None:
                    part.start()
                    self._running.append(part)
        except BaseException:
            self.stop()
            self.registrar = self.debug_server = None
            raise

    @property
    def registered(self) -> bool:
        """Whether the instance registers in Consul (it then keeps serving ``drain_time``)."""
        return self.registrar is not None

    @property
    def drain_time(self) -> float:
        """Seconds to keep serving after deregistering (``effective_drain_time``)."""
        return self.config.effective_drain_time(self.registered)

    def deregister(self) -> None:
        """Deregister from Consul: the first step of stopping. Idempotent."""
        if self.registrar is not None:
            self.registrar.deregister()
        self.stop_phase("deregistered")

    def stop_phase(self, phase: str) -> None:
        """Record that the stop reached ``phase`` (one of :data:`STOP_PHASES`): a log line
        and an event."""
        self.log.info("stop phase", phase=phase)
        self.events.push(STOP_PHASE, phase)

    def stop(self) -> None:
        """Stop every part, in the reverse order of their start; idempotent. A part whose stop
        fails is logged, and the parts after it are stopped all the same."""
        try:
            while self._running:
                part = self._running.pop()
                try:
                    part.stop()
                except Exception as exc:  # noqa: BLE001 - the other parts must still stop
                    self.log.error(
                        "a part failed to stop", part=type(part).__name__, error=describe(exc)
                    )
        finally:
            self._consul.close()

    # -- limits --------------------------------------------------------------------------------

    def update_limits(
        self,
        *,
        limit_connections: int | None = None,
        limit_qps: int | None = None,
        endpoint_qps_limits: Mapping[str, int] | None = None,
        source: str = "api",
    ) -> Limits:
        """Change the local limits; None keeps one. Consul's values, where it sets any, stay
        in force over them.

        Returns:
            The limits now in force.

        Raises:
            ConfigError: a limit is negative or not an integer.
        """
        for name, value in (("limit_connections", limit_connections), ("limit_qps", limit_qps)):
            if value is not None:
                check_int(name, value)
        if endpoint_qps_limits is not None:
            check_endpoint_qps_limits(endpoint_qps_limits)
        self._layers.set_local(
            connections=limit_connections, qps=limit_qps, endpoint_qps=endpoint_qps_limits
        )
        return self._enforce(source)

    def reconfigure(self, config: Config) -> None:
        """Take the settings of a reloaded configuration, its local limits among them, and
        hand the limits to the data plane again (the workers serving may have changed)."""
        self.config = config
        local = local_limits(config)
        self._layers.set_local(
            connections=local.connections, qps=local.qps, endpoint_qps=local.endpoint_qps
        )
        self._enforce("reload", always=True)

    def reapply_limits(self, source: str) -> None:
        """Hand the limits in force to the data plane again (with workers: the shares change
        when one becomes ready or exits)."""
        self.serving.apply_limits(self.limits, source)

    def _apply_remote_limits(self, changes: dict[str, Any]) -> None:
        self._layers.set_remote(changes)
        self._enforce("consul")

    def _enforce(self, source: str, *, always: bool = False) -> Limits:
        before, after = self.limits, self._layers.in_force
        self.limits = after
        if after == before:
            if always:
                self.serving.apply_limits(after, source)
            return after
        extra = self.serving.apply_limits(after, source)
        self.log.info(
            "limits changed",
            source=source,
            conn=after.connections,
            qps=after.qps,
            endpoint_qps=dict(after.endpoint_qps),
            **extra,
        )
        self.events.push(
            CONFIG_CHANGE,
            f"{source}: conn {before.connections}->{after.connections}, "
            f"qps {before.qps}->{after.qps}, endpoint_qps {dict(after.endpoint_qps)}",
        )
        return after

    # -- what it shows -------------------------------------------------------------------------

    def push_event(self, name: str, detail: str = "") -> Event:
        """Record an event in the recent-event ring."""
        return self.events.push(name, detail)

    def remote_configs(self) -> dict[str, Any]:
        """The remote configuration in force; empty without the remote-config watch."""
        return self.remote_config.snapshot() if self.remote_config else {}

    def overload(self) -> dict[str, Any]:
        """Connections open and busy, and the instance's limits."""
        return {
            **self.serving.load(),
            "conn_limit": self.limits.connections,
            "qps_limit": self.limits.qps,
            "endpoint_qps_limits": dict(self.limits.endpoint_qps),
            "limits_enabled": not self.config.service_mesh_mode,
        }

    def runtime_info(self) -> dict[str, Any]:
        """What ``GET /runtime/kite`` shows: the same keys in both modes, plus what the data
        plane adds (with workers: the arbiter, each worker, the totals)."""
        config = self.config
        extra = self.serving.runtime()  # first: with workers, it asks each for its figures
        return {
            "service": config.service_name,
            "cluster": config.cluster,
            "version": {"service": config.version, "kitegreen": VERSION},
            "address": describe_address(self.binding.address) if self.binding else None,
            "overload": self.overload(),
            "remote_configs": self.remote_configs(),
            "events": [e.as_dict() for e in self.events.recent()],
            **extra,
        }
