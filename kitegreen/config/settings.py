"""``Config``: every setting of a server, one frozen dataclass validated on construction.

Each field carries its own documentation in its metadata (:class:`Doc`: the help line, the
``--help`` group, the placeholder), so the loader, ``--help`` and ``--check-config`` all read
one description and no default is written twice. Validation lives here and only here;
:func:`check_int` and :func:`check_endpoint_qps_limits` are shared with
``RpcServer.update_limits`` so that a limit changed at run time is held to the same rules as one
given at start-up.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import math
import os
import types
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from kitegreen.config.hook_settings import HOOK_NAMES, check_hook
from kitegreen.exceptions import ConfigError

DEFAULT_PORT = 8888
DEFAULT_CLUSTER = "default"
DEFAULT_HOST = "0.0.0.0"
DEFAULT_DEBUG_HOST = "127.0.0.1"
DEFAULT_READ_WRITE_TIMEOUT = 3.0
DEFAULT_IDLE_TIMEOUT = 300.0
DEFAULT_EXIT_WAIT_TIME = 5.0
DEFAULT_DRAIN_TIME_REGISTERED = 3.0
DEFAULT_WORKERS = 1
MAX_WORKERS = 1024
DEFAULT_WORKER_TIMEOUT = 30.0
DEFAULT_LIMIT_CONNECTIONS = 10_000
DEFAULT_LIMIT_QPS = 50_000
DEFAULT_QPS_FILL_INTERVAL = 0.1
DEFAULT_MAX_FRAME_SIZE = 16 * 1024 * 1024
MIN_MAX_FRAME_SIZE = 1024
DEFAULT_MAX_MESSAGE_MEMORY = 96 * 1024 * 1024
"""Room for the densest valid message of the default max_frame_size: 2M random i64s in a list
(16 MB on the wire) are estimated at 94 MB of Python objects; 1 MB of empty structs at 88 MB."""
DEFAULT_MAX_INFLIGHT_MEMORY = 128 * 1024 * 1024
MIN_MESSAGE_MEMORY = 64 * 1024
DEFAULT_BACKLOG = 4096
"""What a Go listener (kite, Kitex) asks for on Linux: ``somaxconn``, 4096 since Linux 5.4 (the
kernel caps a larger request at it). With 1024, a burst of connections opened faster than the
server accepts them (~50,000 a second) lost SYNs past the 1024th, each retried a second later."""
DEFAULT_REPORT_INTERVAL = 10.0
DEFAULT_EVENT_CAPACITY = 200
DEFAULT_HUB_BLOCK_THRESHOLD = 0.1
DEFAULT_REGISTER_DELAY = 0.5
DEFAULT_REGISTER_INTERVAL = 10.0
DEFAULT_CONSUL_ADDR = "127.0.0.1:8500"
DEFAULT_DEBUG_MAX_CONNECTIONS = 32
DEFAULT_DEBUG_IDLE_TIMEOUT = 10.0
DEFAULT_DEBUG_MAX_CONNECTIONS_PER_PEER = 16
DEFAULT_DEBUG_REQUEST_TIMEOUT = 5.0
DEBUG_PORT_OFFSET = 10_000
"""The derived debug port's distance from the service port (see ``effective_debug_port``)."""

LOG_FORMATS = ("auto", "json", "console")
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
LISTEN_TYPES = ("auto", "tcp", "unix")
HEALTH_CHECKS = ("tcp", "ttl", "none")
LOG_CONFIG_SUFFIXES = (".yml", ".yaml", ".toml", ".json")

GROUPS: Mapping[str, str] = types.MappingProxyType(
    {
        "service": "who the service is",
        "listen": "where it listens",
        "workers": "worker processes",
        "limits": "overload limits (0 switches a limit off)",
        "timeouts": "timeouts and stopping (seconds, or 500ms, 3s, 1m)",
        "callers": "callers' addresses",
        "consul": "Consul registration and remote configuration",
        "debug": "debug HTTP server",
        "reports": "metrics, reports and events",
        "logging": "",
        "hooks": "the application's code at fixed points of the lifecycle (docs/workers.md)",
    }
)
"""The ``--help`` groups, in the order they are shown, with a line saying what each holds."""


@dataclass(frozen=True, slots=True)
class Doc:
    """What a :class:`Config` field means, kept in the field's ``metadata["doc"]``.

    Attributes:
        help: one line for ``--help``, without the default (that is read from the field).
        group: the ``--help`` group, a key of :data:`GROUPS`.
        placeholder: the flag's value placeholder; empty: derived from the field's type
            (``INT``, ``SECONDS``, ``{a,b}`` for choices).
        default_text: shown instead of the default when the default value alone would
            mislead (empty strings and None that mean "derived from something else").
        choices: the values a text setting accepts; ``Config`` checks them.
        flags: the launcher's option strings; empty: ``--field-name``.
        secret: hidden from ``--check-config`` output.
        restart: held by the arbiter of ``--workers`` (where to listen, Consul, the debug
            server, logging): a reload keeps it, only a restart changes it.
    """

    help: str
    group: str
    placeholder: str = ""
    default_text: str = ""
    choices: tuple[str, ...] = ()
    flags: tuple[str, ...] = ()
    secret: bool = False
    restart: bool = False


def doc(
    text: str,
    group: str,
    *,
    placeholder: str = "",
    default_text: str = "",
    choices: tuple[str, ...] = (),
    flags: tuple[str, ...] = (),
    secret: bool = False,
    restart: bool = False,
) -> Mapping[str, Any]:
    """Field metadata holding a :class:`Doc`: ``text`` is its help line, the rest as there."""
    if group not in GROUPS:
        raise ValueError(f"unknown --help group {group!r}")
    return types.MappingProxyType(
        {"doc": Doc(text, group, placeholder, default_text, choices, flags, secret, restart)}
    )


HookSetting = str | Callable[..., object] | None
"""A hook: ``module:function``, a callable taking a ``HookContext``, or None."""


def _empty_limits() -> Mapping[str, int]:
    return types.MappingProxyType({})


@dataclass(frozen=True, slots=True)
class Config:
    """Everything an :class:`~kitegreen.RpcServer` can be told, validated on construction.

    Durations are seconds (floats); the loader also accepts Go-style strings such as ``"3s"``
    or ``"500ms"`` as kite's YAML did. A limit of 0 switches that limit off. Each field's
    meaning is in its metadata (``dataclasses.fields(Config)[i].metadata["doc"]``), which is
    what ``python -m kitegreen --help`` prints.

    Raises:
        ConfigError: a value is out of range or inconsistent with another.
    """

    service_name: str = field(
        default="",
        metadata=doc(
            "service name for logs, metrics, Consul and remote config keys",
            "service",
            placeholder="NAME",
            default_text="the Thrift service's name",
            restart=True,
        ),
    )
    cluster: str = field(
        default=DEFAULT_CLUSTER,
        metadata=doc(
            "cluster: a Consul tag and part of the remote config keys",
            "service",
            placeholder="NAME",
            restart=True,
        ),
    )
    version: str = field(
        default="",
        metadata=doc(
            "the service's own version, shown on /runtime/kite and as a Consul tag",
            "service",
            placeholder="VERSION",
            # --version conventionally prints the program's version; this is the service's.
            flags=("--service-version",),
            restart=True,
        ),
    )
    host: str = field(
        default=DEFAULT_HOST,
        metadata=doc("TCP host to listen on", "listen", placeholder="HOST", restart=True),
    )
    port: int = field(
        default=DEFAULT_PORT,
        metadata=doc(
            "TCP port to listen on; 0 binds a free one (logged as the listening address)",
            "listen",
            placeholder="PORT",
            restart=True,
        ),
    )
    listen_type: str = field(
        default="auto",
        metadata=doc(
            "what to listen on; auto: unix when --unix names a path, else tcp",
            "listen",
            choices=LISTEN_TYPES,
            restart=True,
        ),
    )
    unix_socket: str = field(
        default="",
        metadata=doc(
            "listen on this Unix socket path instead of TCP",
            "listen",
            placeholder="PATH",
            flags=("--unix", "--unix-socket"),
            restart=True,
        ),
    )
    backlog: int = field(
        default=DEFAULT_BACKLOG,
        metadata=doc(
            "listen backlog: connections the kernel queues before accept", "listen", restart=True
        ),
    )
    service_mesh_mode: bool = field(
        default=False,
        metadata=doc(
            "listen on the service-mesh ingress address; limits are left to the sidecar",
            "listen",
            restart=True,
        ),
    )
    service_mesh_ingress_addr: str = field(
        default="",
        metadata=doc(
            "service-mesh ingress to listen on: host:port or a socket path",
            "listen",
            placeholder="HOST:PORT|PATH",
            restart=True,
        ),
    )
    workers: int = field(
        default=DEFAULT_WORKERS,
        metadata=doc(
            f"worker processes (1 to {MAX_WORKERS}); auto: one per CPU",
            "workers",
            placeholder="INT|auto",
            flags=("-w", "--workers"),
        ),
    )
    preload: bool = field(
        default=False,
        metadata=doc(
            "with workers: the arbiter imports the application once before forking, so the "
            "workers share its memory; SIGHUP then reloads the settings, not the code",
            "workers",
            restart=True,
        ),
    )
    worker_timeout: float = field(
        default=DEFAULT_WORKER_TIMEOUT,
        metadata=doc(
            "seconds a worker's gevent hub may stay blocked before the arbiter replaces it",
            "workers",
        ),
    )
    max_requests: int = field(
        default=0,
        metadata=doc(
            "recycle a worker after it has answered this many requests (plus a random "
            "0..max_requests_jitter): a new worker starts first and takes over its connections; "
            "0: never. Needs --workers 2 or more",
            "workers",
        ),
    )
    max_requests_jitter: int = field(
        default=0,
        metadata=doc(
            "a random 0..N added to max_requests for each worker, so that workers started "
            "together do not retire together",
            "workers",
        ),
    )
    max_worker_memory: int = field(
        default=0,
        metadata=doc(
            "recycle a worker whose resident memory passes this many MiB (checked every "
            "heartbeat) as max_requests does; 0: never. Needs --workers 2 or more",
            "workers",
            placeholder="MIB",
        ),
    )
    reload: bool = field(
        default=False,
        metadata=doc(
            "for development: reload the workers when a *.py or *.thrift file under the "
            "application's directory changes, as SIGHUP does (broken code is refused); runs "
            "an arbiter even for one worker; needs kitegreen[reload]",
            "workers",
            restart=True,
        ),
    )
    read_write_timeout: float = field(
        default=DEFAULT_READ_WRITE_TIMEOUT,
        metadata=doc(
            "bound on reading one whole request from its first byte, and on writing its reply",
            "timeouts",
        ),
    )
    idle_timeout: float = field(
        default=DEFAULT_IDLE_TIMEOUT,
        metadata=doc(
            "bound on the wait for the next request on a kept-alive connection; 0: forever",
            "timeouts",
        ),
    )
    enforce_rpc_timeout: bool = field(
        default=False,
        metadata=doc("interrupt a handler that runs past the caller's RPC timeout", "timeouts"),
    )
    exit_wait_time: float = field(
        default=DEFAULT_EXIT_WAIT_TIME,
        metadata=doc(
            "how long a stop lets requests in flight finish before cutting them off",
            "timeouts",
        ),
    )
    drain_time: float | None = field(
        default=None,
        metadata=doc(
            "how long the server keeps serving after deregistering from Consul, before its "
            "listener closes",
            "timeouts",
            default_text=f"{DEFAULT_DRAIN_TIME_REGISTERED:g} when registered in Consul, else 0",
        ),
    )
    limit_connections: int = field(
        default=DEFAULT_LIMIT_CONNECTIONS,
        metadata=doc("most connections open at once", "limits"),
    )
    limit_qps: int = field(
        default=DEFAULT_LIMIT_QPS,
        metadata=doc("most requests per second, server-wide", "limits"),
    )
    qps_fill_interval: float = field(
        default=DEFAULT_QPS_FILL_INTERVAL,
        metadata=doc("seconds between two refills of the QPS token bucket", "limits"),
    )
    endpoint_qps_limits: Mapping[str, int] = field(
        default_factory=_empty_limits,
        metadata=doc(
            "per-method QPS limits, checked after the server-wide one",
            "limits",
            placeholder="METHOD=QPS,...",
        ),
    )
    max_frame_size: int = field(
        default=DEFAULT_MAX_FRAME_SIZE,
        metadata=doc(
            "largest frame, string, binary or container accepted from a peer",
            "limits",
            placeholder="BYTES",
        ),
    )
    max_message_memory: int = field(
        default=DEFAULT_MAX_MESSAGE_MEMORY,
        metadata=doc(
            "most memory the decoded objects of one request may take (estimated while decoding; "
            "a zlib-inflated payload counts too); past it: PROTOCOL_ERROR",
            "limits",
            placeholder="BYTES",
        ),
    )
    max_inflight_memory: int = field(
        default=DEFAULT_MAX_INFLIGHT_MEMORY,
        metadata=doc(
            "most memory the requests in flight in one process may hold together; a request "
            "that would pass it is refused with LOADSHEDDING",
            "limits",
            placeholder="BYTES",
        ),
    )
    get_real_ip: bool = field(
        default=True,
        metadata=doc("make the caller's address available to handlers as real_ip()", "callers"),
    )
    trusted_proxies: tuple[str, ...] = field(
        default=(),
        metadata=doc(
            "networks whose connections may set the caller's real IP through a header "
            "(comma-separated, e.g. 10.0.0.0/8,fd00::/8)",
            "callers",
            placeholder="CIDRS",
            default_text="none",
        ),
    )
    enable_metrics: bool = field(
        default=True,
        metadata=doc(
            "collect Prometheus metrics, served on the debug server's /metrics",
            "reports",
            restart=True,
        ),
    )
    report_interval: float = field(
        default=DEFAULT_REPORT_INTERVAL,
        metadata=doc("seconds between two reports of the same kind", "reports", restart=True),
    )
    event_capacity: int = field(
        default=DEFAULT_EVENT_CAPACITY,
        metadata=doc("recent events kept for /runtime/kite", "reports", restart=True),
    )
    hub_block_threshold: float = field(
        default=DEFAULT_HUB_BLOCK_THRESHOLD,
        metadata=doc(
            "report a handler that keeps the gevent hub from running this long; 0: off",
            "reports",
        ),
    )
    enable_debug_server: bool = field(
        default=True,
        metadata=doc(
            "serve /runtime/kite, /metrics, /debug/greenlets and /health", "debug", restart=True
        ),
    )
    debug_host: str = field(
        default=DEFAULT_DEBUG_HOST,
        metadata=doc("host for the debug server", "debug", placeholder="HOST", restart=True),
    )
    debug_port: int | None = field(
        default=None,
        metadata=doc(
            "port for the debug server; 0: a free one",
            "debug",
            placeholder="PORT",
            default_text="the service port + 10000 (- 10000 above 55535); a free one when the "
            "service port is 0",
            restart=True,
        ),
    )
    debug_optional: bool = field(
        default=False,
        metadata=doc(
            "start without the debug server (a warning) when its port cannot be had; when off "
            "that fails the start as the RPC port does (exit status 3)",
            "debug",
            restart=True,
        ),
    )
    debug_max_connections: int = field(
        default=DEFAULT_DEBUG_MAX_CONNECTIONS,
        metadata=doc(
            "most debug connections open at once; more are accepted and closed at once",
            "debug",
            restart=True,
        ),
    )
    debug_idle_timeout: float = field(
        default=DEFAULT_DEBUG_IDLE_TIMEOUT,
        metadata=doc(
            "close a debug connection that sends nothing for this long", "debug", restart=True
        ),
    )
    debug_max_connections_per_peer: int = field(
        default=DEFAULT_DEBUG_MAX_CONNECTIONS_PER_PEER,
        metadata=doc(
            "most debug connections open at once from one address; past this or "
            "debug_max_connections only a health probe is answered",
            "debug",
            restart=True,
        ),
    )
    debug_request_timeout: float = field(
        default=DEFAULT_DEBUG_REQUEST_TIMEOUT,
        metadata=doc(
            "close a debug connection whose request, from its first byte to the end of its "
            "reply, takes longer than this",
            "debug",
            restart=True,
        ),
    )
    register: bool = field(
        default=False,
        metadata=doc("register the service in Consul", "consul", restart=True),
    )
    consul_addr: str = field(
        default="",
        metadata=doc(
            "Consul agent address",
            "consul",
            placeholder="HOST:PORT",
            default_text=DEFAULT_CONSUL_ADDR,
            restart=True,
        ),
    )
    consul_token: str = field(
        default="",
        metadata=doc("Consul ACL token", "consul", placeholder="TOKEN", secret=True, restart=True),
    )
    register_delay: float = field(
        default=DEFAULT_REGISTER_DELAY,
        metadata=doc("seconds between listening and registering", "consul", restart=True),
    )
    register_interval: float = field(
        default=DEFAULT_REGISTER_INTERVAL,
        metadata=doc(
            "seconds between checks that the agent still knows this instance (and TTL "
            "heartbeats, at most a third of the TTL)",
            "consul",
            restart=True,
        ),
    )
    health_check: str = field(
        default="tcp",
        metadata=doc(
            "Consul health check: tcp on the service port, ttl kept alive by a heartbeat, or none",
            "consul",
            choices=HEALTH_CHECKS,
            restart=True,
        ),
    )
    remote_config: bool = field(
        default=False,
        metadata=doc(
            "watch kite's limit keys in Consul KV and apply them live", "consul", restart=True
        ),
    )
    log_format: str = field(
        default="auto",
        metadata=doc(
            "auto: console when standard error is a terminal, else json (one object a line)",
            "logging",
            choices=LOG_FORMATS,
            restart=True,
        ),
    )
    log_level: str = field(
        default="info",
        metadata=doc(
            "lowest level logged, any case; the standard library's root logger's too",
            "logging",
            choices=LOG_LEVELS,
            restart=True,
        ),
    )
    access_log: bool = field(
        default=False,
        metadata=doc("log one line per request", "logging"),
    )
    tracing: bool = field(
        default=True,
        metadata=doc(
            "an OpenTelemetry server span per call, on the tracer provider the application "
            "sets (needs kitegreen[otel]); off: OpenTelemetry is not even imported",
            "logging",
            restart=True,
        ),
    )
    log_config: str = field(
        default="",
        metadata=doc(
            "a logging.config.dictConfig document (YAML, TOML or JSON) for the standard "
            "library's loggers; it may name kitegreen's handler and formatter, 'kitegreen'",
            "logging",
            placeholder="FILE",
            restart=True,
        ),
    )

    on_starting: HookSetting = field(
        default=None,
        metadata=doc(
            "arbiter or single process: settings loaded, before the listener is bound",
            "hooks",
            placeholder="MODULE:FUNC",
            restart=True,
        ),
    )
    post_fork: HookSetting = field(
        default=None,
        metadata=doc(
            "worker: just after the fork, before the application loads",
            "hooks",
            placeholder="MODULE:FUNC",
            restart=True,
        ),
    )
    post_worker_init: HookSetting = field(
        default=None,
        metadata=doc(
            "worker or single process: the application loaded, before it accepts",
            "hooks",
            placeholder="MODULE:FUNC",
            restart=True,
        ),
    )
    when_ready: HookSetting = field(
        default=None,
        metadata=doc(
            "arbiter or single process: serving (with workers: every first worker ready)",
            "hooks",
            placeholder="MODULE:FUNC",
            restart=True,
        ),
    )
    on_reload: HookSetting = field(
        default=None,
        metadata=doc(
            "arbiter: SIGHUP received, before the reload starts",
            "hooks",
            placeholder="MODULE:FUNC",
            restart=True,
        ),
    )
    worker_exit: HookSetting = field(
        default=None,
        metadata=doc(
            "worker or single process: serving stopped, before the process exits",
            "hooks",
            placeholder="MODULE:FUNC",
            restart=True,
        ),
    )
    on_exit: HookSetting = field(
        default=None,
        metadata=doc(
            "arbiter or single process: last thing before exiting",
            "hooks",
            placeholder="MODULE:FUNC",
            restart=True,
        ),
    )

    def __post_init__(self) -> None:
        for name, about in _DOCS.items():
            if about.choices:
                # Any case (--log-level DEBUG, as gunicorn's and Python's own names are
                # spelled), kept in the one spelling the rest of the code compares with.
                value = getattr(self, name)
                if isinstance(value, str) and value != value.lower():
                    value = value.lower()
                    object.__setattr__(self, name, value)
                _check_choice(name, value, about.choices)
        check_int("port", self.port, 0, 65535)
        if self.debug_port is not None:
            check_int("debug_port", self.debug_port, 0, 65535)
        check_int("backlog", self.backlog, 1, 65535)
        check_int("workers", self.workers, 1, MAX_WORKERS)
        check_int("limit_connections", self.limit_connections)
        check_int("limit_qps", self.limit_qps)
        check_int("event_capacity", self.event_capacity, 1, 1_000_000)
        check_int("max_frame_size", self.max_frame_size, MIN_MAX_FRAME_SIZE, 2**31 - 1)
        check_int("max_message_memory", self.max_message_memory, MIN_MESSAGE_MEMORY, 2**62)
        check_int("max_inflight_memory", self.max_inflight_memory, MIN_MESSAGE_MEMORY, 2**62)
        if self.max_inflight_memory < self.max_message_memory:
            raise ConfigError(
                f"max_inflight_memory ({self.max_inflight_memory}) must be >= "
                f"max_message_memory ({self.max_message_memory}): one request alone may take "
                "max_message_memory",
                field="max_inflight_memory",
            )
        check_int("debug_max_connections", self.debug_max_connections, 1, 65535)
        check_int("debug_max_connections_per_peer", self.debug_max_connections_per_peer, 1, 65535)
        for name in (
            "read_write_timeout",
            "qps_fill_interval",
            "report_interval",
            "register_interval",
            "worker_timeout",
            "debug_idle_timeout",
            "debug_request_timeout",
        ):
            _check_positive(name, getattr(self, name))
        for name in ("idle_timeout", "exit_wait_time", "hub_block_threshold", "register_delay"):
            _check_at_least_zero(name, getattr(self, name))
        if self.drain_time is not None:
            _check_at_least_zero("drain_time", self.drain_time)
        check_endpoint_qps_limits(self.endpoint_qps_limits)
        check_int("max_requests", self.max_requests, 0, 2**62)
        check_int("max_requests_jitter", self.max_requests_jitter, 0, 2**62)
        check_int("max_worker_memory", self.max_worker_memory, 0, 2**40)
        for name in HOOK_NAMES:
            check_hook(name, getattr(self, name))
        if self.log_config and not self.log_config.lower().endswith(LOG_CONFIG_SUFFIXES):
            raise ConfigError(
                "log_config must name a dictConfig document ending in "
                f"{', '.join(LOG_CONFIG_SUFFIXES)}, got {self.log_config!r} (ini files for "
                "logging.config.fileConfig, gunicorn's --log-config, are not read)",
                field="log_config",
            )
        if self.effective_listen_type == "unix" and not self.unix_socket:
            raise ConfigError(
                "listen_type 'unix' needs unix_socket to name a path", field="unix_socket"
            )
        if self.service_mesh_mode and not self.service_mesh_ingress_addr:
            raise ConfigError(
                "service_mesh_mode needs service_mesh_ingress_addr (host:port or a socket path)",
                field="service_mesh_ingress_addr",
            )
        # Frozen means frozen: a caller's dict or list must not change the config behind our
        # back, and networks are kept in one spelling so that equal configs compare equal.
        if not isinstance(self.endpoint_qps_limits, types.MappingProxyType):
            object.__setattr__(
                self, "endpoint_qps_limits", types.MappingProxyType(dict(self.endpoint_qps_limits))
            )
        object.__setattr__(self, "trusted_proxies", _normalise_networks(self.trusted_proxies))

    def recycling_problem(self) -> ConfigError | None:
        """Why the recycling settings do not fit the configuration as a whole, or None.

        Not checked on construction: the code, the config file, the environment and the flags
        each set a part (``max_requests`` in the code, ``--workers 4`` on the command line), so
        the launcher checks the final configuration, and one process refuses to start.
        """
        if self.max_requests_jitter and not self.max_requests:
            return ConfigError(
                "max_requests_jitter needs max_requests: it is added to it",
                field="max_requests_jitter",
            )
        if self.workers == 1 and (self.max_requests or self.max_worker_memory):
            # gunicorn always has an arbiter to replace a worker; one process has nobody to
            # take over its connections, and restarting it would drop every one of them.
            name = "max_requests" if self.max_requests else "max_worker_memory"
            return ConfigError(
                f"{name} recycles workers and needs --workers 2 or more (one process has no "
                "arbiter to start its replacement)",
                field=name,
            )
        return None

    @property
    def effective_listen_type(self) -> str:
        """``tcp`` or ``unix``: what the server listens on, ``auto`` resolved."""
        if self.listen_type != "auto":
            return self.listen_type
        return "unix" if self.unix_socket else "tcp"

    def effective_debug_port(self, service_port: int) -> int:
        """The debug server's port: ``debug_port`` if set, else derived from the service port.

        The service port + :data:`DEBUG_PORT_OFFSET` (kite's "1" followed by the port for the
        common 4-digit ports: 8888 -> 18888), or - :data:`DEBUG_PORT_OFFSET` where that is
        past 65535 (60000 -> 50000); 0, a free port, when the service port is 0. Never a port
        chosen at random for a fixed service port: probes and scrapes must know where to go,
        and ``--check-config`` shows it.
        """
        if self.debug_port is not None:
            return self.debug_port
        if not service_port:
            return 0
        up = service_port + DEBUG_PORT_OFFSET
        return up if up <= 65535 else service_port - DEBUG_PORT_OFFSET

    def effective_drain_time(self, registered: bool) -> float:
        """Seconds to keep serving between deregistering and closing the listener.

        ``drain_time`` if set. Otherwise :data:`DEFAULT_DRAIN_TIME_REGISTERED` for a server
        registered in Consul, whose clients learn of the deregistration only at their next
        catalogue refresh, and 0 for one that is not: nobody is being told to go elsewhere.
        """
        if self.drain_time is not None:
            return self.drain_time
        return DEFAULT_DRAIN_TIME_REGISTERED if registered else 0.0

    def replace(self, **changes: Any) -> Config:
        """Return a copy with ``changes`` applied and validated."""
        return dataclasses.replace(self, **changes)

    @classmethod
    def load(
        cls,
        *,
        base: Config | None = None,
        file: str | os.PathLike[str] | None = None,
        env: Mapping[str, str] | None = None,
        flags: Mapping[str, Any] | None = None,
    ) -> Config:
        """Layer the config file, the environment and flags on top of ``base``.

        Precedence, highest first: ``flags``, ``env``, the file, ``base``, the defaults.

        Args:
            base: the starting values (defaults when None).
            file: a YAML (``.yml``/``.yaml``) or TOML (``.toml``) file; when None,
                ``KITE_CONFIG_FILE`` from ``env`` names it, if set.
            env: the environment to read ``KITE_*`` variables from (``os.environ`` when None).
            flags: values from the launcher's command line, keyed by field name; None
                values are ignored.

        Returns:
            A new, validated Config.

        Raises:
            ConfigError: a value is malformed or out of range; the message names the source.
        """
        return _LOADER.load(base=base or cls(), file=file, env=env, flags=flags)

    @staticmethod
    def env_variables() -> dict[str, str]:
        """Every environment variable the loader reads, mapped to the field it sets."""
        return _LOADER.env_variables()


class _Loader:
    """Where :meth:`Config.load` and :meth:`Config.env_variables` find the loader.

    ``config/loader.py`` imports this module and installs itself here when it is imported
    (``kitegreen.config`` imports it before anyone can reach :class:`Config`), so that the
    imports go one way: the loader knows the settings, the settings do not import the loader.
    """

    def __init__(self) -> None:
        self._load: Any = None
        self._env_variables: Any = None

    def install(self, load: Any, env_variables: Any) -> None:
        """Called once by ``config/loader.py``."""
        self._load, self._env_variables = load, env_variables

    def load(self, **kwargs: Any) -> Config:
        config: Config = self._load(**kwargs)
        return config

    def env_variables(self) -> dict[str, str]:
        names: dict[str, str] = self._env_variables()
        return names


_LOADER = _Loader()
install_loader = _LOADER.install


_DOCS: Mapping[str, Doc] = types.MappingProxyType(
    {f.name: f.metadata["doc"] for f in dataclasses.fields(Config)}
)


def setting_doc(name: str) -> Doc:
    """The :class:`Doc` of the field ``name``.

    Raises:
        KeyError: no such field.
    """
    return _DOCS[name]


def flag_names(name: str) -> tuple[str, ...]:
    """The launcher's option strings for the field ``name``."""
    return setting_doc(name).flags or ("--" + name.replace("_", "-"),)


def flag_name(name: str) -> str:
    """The launcher's main option string for the field ``name``, as messages name it."""
    return next(flag for flag in flag_names(name) if flag.startswith("--"))


def check_int(
    name: str, value: object, low: int = 0, high: int | None = None, *, field: str | None = None
) -> None:
    """Check that ``value`` is an integer (not a bool) between ``low`` and ``high``.

    The one place that says what a count or a limit may be, for ``Config`` and for limits
    changed at run time alike.

    Args:
        name: what the value is, as the message should name it.
        value: the value to check.
        low: the smallest value allowed.
        high: the largest value allowed; None for no bound.
        field: the Config field for :attr:`ConfigError.field`; ``name`` when None.

    Raises:
        ConfigError: ``limit_qps must be an integer >= 0, got -5``.
    """
    if (
        isinstance(value, int)
        and not isinstance(value, bool)
        and low <= value
        and (high is None or value <= high)
    ):
        return
    bounds = f">= {low}" if high is None else f"between {low} and {high}"
    raise ConfigError(f"{name} must be an integer {bounds}, got {value!r}", field=field or name)


def check_endpoint_qps_limits(limits: Mapping[str, object]) -> None:
    """Check per-method QPS limits: each an integer >= 0.

    Raises:
        ConfigError: naming the method, ``endpoint_qps_limits['echo'] must be ...``.
    """
    if not isinstance(limits, Mapping):
        raise ConfigError(
            f"endpoint_qps_limits must be a mapping of method to QPS, got {limits!r}",
            field="endpoint_qps_limits",
        )
    for method, qps in limits.items():
        check_int(f"endpoint_qps_limits[{method!r}]", qps, field="endpoint_qps_limits")


def _check_choice(name: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(choices)}, got {value!r}", field=name)


def _check_at_least_zero(name: str, value: float) -> None:
    if not math.isfinite(value):
        raise ConfigError(f"{name} must be a finite number, got {value!r}", field=name)
    if value < 0:
        raise ConfigError(f"{name} must be a number >= 0, got {value!r}", field=name)


def _check_positive(name: str, value: float) -> None:
    if not (math.isfinite(value) and value > 0):
        raise ConfigError(f"{name} must be a number of seconds > 0, got {value!r}", field=name)


def _normalise_networks(entries: object) -> tuple[str, ...]:
    """``trusted_proxies`` as a tuple of networks in ipaddress's spelling (``10.0.0.0/8``)."""
    if isinstance(entries, str) or not isinstance(entries, Sequence):
        raise ConfigError(
            f"trusted_proxies must be a sequence of networks such as ('10.0.0.0/8',), "
            f"got {entries!r}",
            field="trusted_proxies",
        )
    out = []
    for entry in entries:
        try:
            if not isinstance(entry, str):
                raise TypeError(entry)
            network = ipaddress.ip_network(entry.strip(), strict=False)
        except (ValueError, TypeError):
            raise ConfigError(
                f"trusted_proxies entry {entry!r} is not a network such as 10.0.0.0/8, "
                "192.168.1.7 or fd00::/8",
                field="trusted_proxies",
            ) from None
        out.append(str(network))
    return tuple(out)


def restart_fields() -> tuple[str, ...]:
    """The settings a reload of ``--workers`` keeps (:attr:`Doc.restart`)."""
    return tuple(f.name for f in dataclasses.fields(Config) if f.metadata["doc"].restart)
