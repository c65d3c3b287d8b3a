"""Service registration (kite's ``Register``): a ``Registry`` protocol, a no-op and Consul.

The :class:`Registrar` owns the background greenlet: it registers once the server listens,
keeps a TTL check alive, notices when the agent has forgotten the service (an agent restarted
without its state) and registers again, retrying with backoff while the agent is down. None of
this is ever fatal: the server keeps serving whatever Consul does.
"""

from __future__ import annotations

import socket
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import gevent
from gevent.event import Event as GEvent

from kitegreen.discovery.backoff import Backoff
from kitegreen.discovery.consul import STOP_WAIT, StopConsulCall
from kitegreen.exceptions import RegistryError, describe

if TYPE_CHECKING:
    from kitegreen.config import Config
    from kitegreen.transport.listener import ListenSpec

WILDCARD_HOSTS = ("", "0.0.0.0", "::")
TCP_CHECK_INTERVAL = "10s"
TCP_CHECK_TIMEOUT = "2s"
DEREGISTER_CRITICAL_AFTER = "1m"
TTL = 15.0
"""TTL of the health check in ``ttl`` mode; the heartbeat passes it every TTL / 3."""


@dataclass(frozen=True, slots=True)
class Registration:
    """One service instance as the registry sees it.

    Attributes:
        service: the service name.
        instance_id: unique per process, stable across re-registrations.
        address: the address to advertise; empty lets the agent use its own.
        port: the bound TCP port.
        tags: ``cluster=...``, ``transport=...``, ``protocol=...``, ``version=...``.
        check: ``tcp``, ``ttl`` or ``none``.
        check_host: the host the agent's TCP check connects to.
    """

    service: str
    instance_id: str
    address: str
    port: int
    tags: tuple[str, ...]
    check: str
    check_host: str
    meta: dict[str, str] = field(default_factory=dict)

    @property
    def check_id(self) -> str:
        """The ID Consul gives the service's check."""
        return f"service:{self.instance_id}"


def make_registration(
    *, service: str, cluster: str, version: str, host: str, port: int, check: str
) -> Registration:
    """Describe this process's instance of ``service`` listening on ``host:port``."""
    advertise = "" if host in WILDCARD_HOSTS else host
    return Registration(
        service=service,
        instance_id=f"{service}-{socket.gethostname()}-{port}-{uuid.uuid4().hex[:8]}",
        address=advertise,
        port=port,
        tags=(
            f"cluster={cluster}",
            # The server detects both on every connection, so it advertises both.
            "transport=buffered,framed,ttheader,theader",
            "protocol=binary,compact",
            f"version={version or 'unknown'}",
        ),
        check=check,
        check_host=advertise or ("::1" if host == "::" else "127.0.0.1"),
        meta={"cluster": cluster, "framework": "kitegreen"},
    )


@runtime_checkable
class Registry(Protocol):
    """Where a server announces itself (Kitex's ``registry.Registry``)."""

    def register(self, reg: Registration) -> None:
        """Register (or re-register) ``reg``. Raises on failure."""

    def deregister(self, reg: Registration) -> None:
        """Remove ``reg``. Raises on failure."""

    def is_registered(self, reg: Registration) -> bool:
        """Whether the registry still knows ``reg``. Raises when it cannot tell."""

    def heartbeat(self, reg: Registration) -> None:
        """Keep a TTL check passing. Raises on failure (an unknown check included)."""


class NullRegistry:
    """The default :class:`Registry`: registers nothing, anywhere."""

    def register(self, reg: Registration) -> None:
        """Do nothing."""

    def deregister(self, reg: Registration) -> None:
        """Do nothing."""

    def is_registered(self, reg: Registration) -> bool:
        """Always True: there is nothing to re-register."""
        return True

    def heartbeat(self, reg: Registration) -> None:
        """Do nothing."""


class ConsulRegistry:
    """A :class:`Registry` on a Consul agent's HTTP API, through py-consul.

    Args:
        client: a ``consul.Consul`` (see :func:`kitegreen.discovery.consul.make_consul`).
    """

    def __init__(self, client: Any) -> None:
        self._client = client

    def register(self, reg: Registration) -> None:
        """PUT /v1/agent/service/register with the instance's tags and check."""
        check: dict[str, Any] | None = None
        if reg.check == "tcp":
            check = {
                "TCP": f"[{reg.check_host}]:{reg.port}"
                if ":" in reg.check_host
                else f"{reg.check_host}:{reg.port}",
                "Interval": TCP_CHECK_INTERVAL,
                "Timeout": TCP_CHECK_TIMEOUT,
                "DeregisterCriticalServiceAfter": DEREGISTER_CRITICAL_AFTER,
            }
        elif reg.check == "ttl":
            check = {
                "TTL": f"{TTL:g}s",
                "DeregisterCriticalServiceAfter": DEREGISTER_CRITICAL_AFTER,
            }
        ok = self._client.agent.service.register(
            reg.service,
            service_id=reg.instance_id,
            address=reg.address or None,
            port=reg.port,
            tags=list(reg.tags),
            check=check,
            meta=dict(reg.meta),
        )
        if ok is False:
            raise RegistryError(f"Consul refused to register {reg.instance_id}")
        if reg.check == "ttl":
            self.heartbeat(reg)

    def deregister(self, reg: Registration) -> None:
        """PUT /v1/agent/service/deregister/<id>."""
        self._client.agent.service.deregister(reg.instance_id)

    def is_registered(self, reg: Registration) -> bool:
        """GET /v1/agent/services, looking for our instance ID."""
        return reg.instance_id in self._client.agent.services()

    def heartbeat(self, reg: Registration) -> None:
        """PUT /v1/agent/check/pass/service:<id>.

        Raises:
            RegistryError: the agent does not know the check (it restarted): py-consul answers
                False for that rather than raising.
        """
        if self._client.agent.check.ttl_pass(reg.check_id, notes="kitegreen heartbeat") is False:
            raise RegistryError(f"the agent does not know check {reg.check_id}")


def make_registrar(
    config: Config,
    spec: ListenSpec,
    port: int,
    *,
    registry: Callable[[], Registry],
    on_change: Callable[[str, str], None],
    log: Any,
) -> Registrar | None:
    """The registrar of a server (or an instance of workers) that listens per ``spec`` on
    ``port``; None, logged, when it does not register.

    Args:
        config: the settings (``register``, the service, the check, the delays).
        spec: where it listens; only a TCP listener outside service-mesh mode registers.
        port: the bound port (the one asked for may be 0).
        registry: makes the registry, if one is needed.
        on_change: see :class:`Registrar`.
        log: a structlog logger.
    """
    if not config.register:
        return None
    if spec.kind != "tcp" or config.service_mesh_mode:
        log.info("not registering: only a TCP listener outside service-mesh mode is")
        return None
    registration = make_registration(
        service=config.service_name,
        cluster=config.cluster,
        version=config.version,
        host=spec.host,
        port=port,
        check=config.health_check,
    )
    return Registrar(
        registry(),
        registration,
        delay=config.register_delay,
        refresh=config.register_interval,
        on_change=on_change,
        log=log,
    )


class Registrar:
    """Owns registration for one server: register, keep alive, re-register, deregister.

    Args:
        registry: where to register.
        registration: what to register.
        delay: seconds between start() and the first registration (``register_delay``).
        refresh: seconds between checks that the agent still knows us.
        on_change: called with ``(kind, detail)`` for events and reports: ``registered``,
            ``deregistered``, ``failed``.
        log: a structlog logger.
    """

    def __init__(
        self,
        registry: Registry,
        registration: Registration,
        *,
        delay: float,
        refresh: float,
        on_change: Callable[[str, str], None],
        log: Any,
    ) -> None:
        self.registry = registry
        self.registration = registration
        self._delay = delay
        self._refresh = refresh if registration.check != "ttl" else min(refresh, TTL / 3)
        self._on_change = on_change
        self._log = log.bind(instance_id=registration.instance_id)
        self._greenlet: gevent.Greenlet | None = None
        self._stopping = GEvent()
        self.registered = False
        """Whether the last registration succeeded and no deregistration followed."""

    def start(self) -> None:
        """Start the registration greenlet; idempotent."""
        if self._greenlet is None and not self._stopping.is_set():
            self._greenlet = gevent.spawn(self._run)

    def deregister(self, timeout: float = 3.0) -> None:
        """Stop the greenlet and deregister; the first step of a graceful stop. Idempotent."""
        self._stopping.set()
        greenlet, self._greenlet = self._greenlet, None
        if greenlet is not None:
            # A call in flight is let finish (they are short: no blocking queries here) rather
            # than killed inside the HTTP library, which can lose its connection and, killed
            # mid-registration, leave a registration no deregistration follows.
            greenlet.join(timeout=STOP_WAIT)
            if not greenlet.dead:
                greenlet.kill(StopConsulCall, block=True, timeout=1.0)
        if not self.registered:
            return
        self.registered = False
        try:
            with gevent.Timeout(timeout):
                self.registry.deregister(self.registration)
        except (Exception, gevent.Timeout) as exc:  # noqa: BLE001 - stopping goes on regardless
            self._log.warning("deregistration failed", error=_describe(exc))
            self._on_change("failed", f"deregistration failed: {_describe(exc)}")
            return
        self._log.info("deregistered")
        self._on_change("deregistered", self.registration.instance_id)

    def stop(self) -> None:
        """Same as :meth:`deregister` (for the server's list of background parts)."""
        self.deregister()

    def _run(self) -> None:
        try:
            self._keep_registered()
        except StopConsulCall:
            return

    def _keep_registered(self) -> None:
        if self._stopping.wait(self._delay):
            return
        backoff = Backoff()
        reg = self.registration
        while not self._stopping.is_set():
            try:
                if not self.registered:
                    self.registry.register(reg)
                    self.registered = True
                    self._log.info(
                        "registered",
                        service=reg.service,
                        port=reg.port,
                        tags=list(reg.tags),
                        check=reg.check,
                    )
                    self._on_change("registered", f"{reg.instance_id} port {reg.port}")
                elif reg.check == "ttl":
                    self.registry.heartbeat(reg)
                elif not self.registry.is_registered(reg):
                    self.registered = False
                    self._log.warning("the agent forgot this instance; registering again")
                    continue
                backoff.reset()
                delay = self._refresh
            except Exception as exc:  # noqa: BLE001 - a registry outage is never fatal
                if self._stopping.is_set():
                    return  # the call was cut short by deregister()
                # A failed TTL pass usually means the agent lost the check: register again.
                self.registered = False
                delay = backoff.next()
                self._log.warning(
                    "registration failed; retrying", error=_describe(exc), retry_in=round(delay, 2)
                )
                self._on_change("failed", f"registration failed: {_describe(exc)}")
            self._stopping.wait(delay)


def _describe(exc: BaseException) -> str:
    return describe(exc)[:300]
