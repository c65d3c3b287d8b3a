"""Server configuration: one frozen, validated dataclass and the loader that layers its sources.

Precedence, highest first: launcher flags, environment variables, the config file, the values
given in code (``RpcServer(config=...)``), the defaults below. Every value read from outside is
parsed knowing where it came from, so an error names the field, the source and what was expected::

    ConfigError: limit_qps must be an integer >= 0, got -5 (from KITE_LIMIT_QPS)
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import sys
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kitegreen.exceptions import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

DEFAULT_PORT = 8888
DEFAULT_CLUSTER = "default"
DEFAULT_READ_WRITE_TIMEOUT = 3.0
DEFAULT_IDLE_TIMEOUT = 300.0
DEFAULT_EXIT_WAIT_TIME = 5.0
DEFAULT_DRAIN_TIME_REGISTERED = 3.0
DEFAULT_LIMIT_CONNECTIONS = 10_000
DEFAULT_LIMIT_QPS = 50_000
DEFAULT_QPS_FILL_INTERVAL = 0.1
DEFAULT_MAX_FRAME_SIZE = 16 * 1024 * 1024
DEFAULT_BACKLOG = 1024
DEFAULT_REPORT_INTERVAL = 10.0
DEFAULT_EVENT_CAPACITY = 200
DEFAULT_HUB_BLOCK_THRESHOLD = 0.1
DEFAULT_REGISTER_DELAY = 0.5
DEFAULT_REGISTER_INTERVAL = 10.0
DEFAULT_CONSUL_ADDR = "127.0.0.1:8500"

ENV_PREFIX = "KITE_"
LOG_FORMATS = ("json", "console")
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
LISTEN_TYPES = ("auto", "tcp", "unix")
HEALTH_CHECKS = ("tcp", "ttl", "none")

# Environment variables kite (and Consul's own tooling) use, mapped to our fields. The
# canonical KITE_<FIELD> spelling is read after these, so it wins when both are set.
ENV_ALIASES: Mapping[str, str] = types.MappingProxyType(
    {
        "KITE_SERVICE_PORT": "port",
        "KITE_SERVICE_ADDR": "host",
        "SERVICE_CLUSTER": "cluster",
        "SERVICE_MESH_INGRESS_ADDR": "service_mesh_ingress_addr",
        "CONSUL_HTTP_ADDR": "consul_addr",
        "CONSUL_HTTP_TOKEN": "consul_token",
    }
)
CONFIG_FILE_ENV = "KITE_CONFIG_FILE"

# kite's kite.yml spelled settings in CamelCase; file keys are matched case- and
# underscore-insensitively, and these names from kite map onto ours.
_FILE_ALIASES: Mapping[str, str] = types.MappingProxyType(
    {
        "serviceport": "port",
        "serviceaddr": "host",
        "servicecluster": "cluster",
        "limitconn": "limit_connections",
        "limitconns": "limit_connections",
        "connlimit": "limit_connections",
        "qpslimit": "limit_qps",
        "realip": "get_real_ip",
        "enabledebug": "enable_debug_server",
    }
)


@dataclass(frozen=True, slots=True)
class Config:
    """Everything an :class:`~kitegreen.RpcServer` can be told, validated on construction.

    Durations are seconds (floats); the loader also accepts Go-style strings such as ``"3s"``
    or ``"500ms"`` as kite's YAML did. A limit of 0 switches that limit off.

    Raises:
        ConfigError: a value is out of range or inconsistent with another.
    """

    service_name: str = ""
    """Service name for logs, metrics, Consul and remote config; empty: the Thrift service's."""
    cluster: str = DEFAULT_CLUSTER
    version: str = ""
    """The service's own version, shown on /runtime/kite and as a Consul tag."""
    host: str = "0.0.0.0"
    port: int = DEFAULT_PORT
    """TCP port; 0 binds an ephemeral port, read it back from ``RpcServer.address``."""
    listen_type: str = "auto"
    """``tcp``, ``unix`` or ``auto`` (unix when ``unix_socket`` is set)."""
    unix_socket: str = ""
    backlog: int = DEFAULT_BACKLOG
    service_mesh_mode: bool = False
    """Listen on ``service_mesh_ingress_addr`` and leave limits to the sidecar, as kite does."""
    service_mesh_ingress_addr: str = ""
    read_write_timeout: float = DEFAULT_READ_WRITE_TIMEOUT
    """Bound on reading one whole request from its first byte, and on writing its reply."""
    idle_timeout: float = DEFAULT_IDLE_TIMEOUT
    """Bound on the wait for the next request on a kept-alive connection; 0 waits forever."""
    exit_wait_time: float = DEFAULT_EXIT_WAIT_TIME
    """How long ``stop()`` lets requests in flight finish before it gives up on them."""
    drain_time: float | None = None
    """Seconds the server keeps serving after deregistering, before its listener closes;
    None: 3 when it registers in Consul, 0 otherwise."""
    limit_connections: int = DEFAULT_LIMIT_CONNECTIONS
    limit_qps: int = DEFAULT_LIMIT_QPS
    qps_fill_interval: float = DEFAULT_QPS_FILL_INTERVAL
    endpoint_qps_limits: Mapping[str, int] = field(
        default_factory=lambda: types.MappingProxyType({})
    )
    """Per-method QPS limits, ``{"method": qps}``, checked after the server-wide limit."""
    get_real_ip: bool = True
    max_frame_size: int = DEFAULT_MAX_FRAME_SIZE
    """Largest frame, string, binary or container accepted from a peer, in bytes."""
    enable_metrics: bool = True
    enable_debug_server: bool = True
    debug_host: str = "127.0.0.1"
    debug_port: int | None = None
    """Debug HTTP port; unset: "1" followed by the service port (8888 -> 18888), see
    :meth:`effective_debug_port`."""
    report_interval: float = DEFAULT_REPORT_INTERVAL
    event_capacity: int = DEFAULT_EVENT_CAPACITY
    hub_block_threshold: float = DEFAULT_HUB_BLOCK_THRESHOLD
    """Report a handler that keeps the gevent hub from running this long; 0 switches it off."""
    register: bool = False
    consul_addr: str = ""
    consul_token: str = ""
    register_delay: float = DEFAULT_REGISTER_DELAY
    register_interval: float = DEFAULT_REGISTER_INTERVAL
    """Seconds between checks that the agent still knows this instance (and TTL heartbeats,
    at most a third of the TTL)."""
    health_check: str = "tcp"
    """Consul health check: ``tcp`` on the service port, ``ttl`` kept alive by a heartbeat,
    or ``none``."""
    remote_config: bool = False
    """Watch kite's limit keys in Consul KV and apply them live."""
    log_format: str = "json"
    log_level: str = "info"
    access_log: bool = False

    def __post_init__(self) -> None:
        _check_choice("listen_type", self.listen_type, LISTEN_TYPES)
        _check_choice("log_format", self.log_format, LOG_FORMATS)
        _check_choice("log_level", self.log_level, LOG_LEVELS)
        _check_choice("health_check", self.health_check, HEALTH_CHECKS)
        _check_range("port", self.port, 0, 65535)
        if self.debug_port is not None:
            _check_range("debug_port", self.debug_port, 0, 65535)
        if self.drain_time is not None:
            _check_range("drain_time", self.drain_time, 0, None)
        _check_range("backlog", self.backlog, 1, 65535)
        _check_range("limit_connections", self.limit_connections, 0, None)
        _check_range("limit_qps", self.limit_qps, 0, None)
        _check_range("event_capacity", self.event_capacity, 1, 1_000_000)
        _check_range("max_frame_size", self.max_frame_size, 1024, 2**31 - 1)
        _check_positive("read_write_timeout", self.read_write_timeout)
        _check_positive("qps_fill_interval", self.qps_fill_interval)
        _check_positive("report_interval", self.report_interval)
        _check_positive("register_interval", self.register_interval)
        for name in ("idle_timeout", "exit_wait_time", "hub_block_threshold", "register_delay"):
            _check_range(name, getattr(self, name), 0, None)
        for method, qps in self.endpoint_qps_limits.items():
            if not isinstance(qps, int) or isinstance(qps, bool) or qps < 0:
                raise ConfigError(
                    f"endpoint_qps_limits[{method!r}] must be an integer >= 0, got {qps!r}",
                    field="endpoint_qps_limits",
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
        if not isinstance(self.endpoint_qps_limits, types.MappingProxyType):
            # Frozen means frozen: a caller's dict must not change the limits behind our back.
            object.__setattr__(
                self, "endpoint_qps_limits", types.MappingProxyType(dict(self.endpoint_qps_limits))
            )

    @property
    def effective_listen_type(self) -> str:
        """``tcp`` or ``unix``: what the server listens on, ``auto`` resolved."""
        if self.listen_type != "auto":
            return self.listen_type
        return "unix" if self.unix_socket else "tcp"

    def effective_debug_port(self, service_port: int) -> int:
        """The debug server's port: ``debug_port`` if set, else kite's rule.

        kite puts the debug server on "1" followed by the service port (8888 -> 18888). When
        that is not a valid port (service port above 9999, or 0) the debug server takes an
        ephemeral port instead, which the server logs and reports on ``debug_address``: a
        guessed neighbouring port could belong to another service.
        """
        if self.debug_port is not None:
            return self.debug_port
        derived = int(f"1{service_port}") if service_port else 0
        return derived if 0 < derived <= 65535 else 0

    def effective_drain_time(self, registered: bool) -> float:
        """``drain_time``, or its default: 3 s for a server registered in Consul, else 0."""
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
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        sources: dict[str, str] = {}

        path = file if file is not None else env.get(CONFIG_FILE_ENV) or None
        if path is not None:
            for name, raw in _read_file(Path(path)).items():
                _set(values, sources, name, raw, f"config file {path}")
        for var, name in ENV_ALIASES.items():
            if env.get(var):
                _set(values, sources, name, env[var], var)
        for f in _FIELDS:
            var = ENV_PREFIX + f.upper()
            if var in env and env[var] != "":
                _set(values, sources, f, env[var], var)
        for name, raw in (flags or {}).items():
            if raw is not None:
                _set(values, sources, name, raw, f"--{name.replace('_', '-')}")

        try:
            return dataclasses.replace(base or cls(), **values)
        except ConfigError as exc:
            source = sources.get(exc.field or "")
            raise (exc.with_source(source) if source else exc) from None

    @staticmethod
    def env_variables() -> dict[str, str]:
        """Every environment variable the loader reads, mapped to the field it sets."""
        names = {ENV_PREFIX + f.upper(): f for f in _FIELDS}
        names.update(ENV_ALIASES)
        names[CONFIG_FILE_ENV] = "(the config file to read)"
        return names


_FIELDS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(Config))
_TYPES: dict[str, Any] = typing.get_type_hints(Config)
_NORMALISED = {f.replace("_", ""): f for f in _FIELDS}
_DURATION = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*(ns|us|µs|ms|s|m|h)?\s*$")
_DURATION_UNITS = {
    None: 1.0,
    "s": 1.0,
    "ms": 1e-3,
    "us": 1e-6,
    "µs": 1e-6,
    "ns": 1e-9,
    "m": 60.0,
    "h": 3600.0,
}
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(choices)}, got {value!r}", field=name)


def _check_range(name: str, value: float, low: float, high: float | None) -> None:
    kind = "an integer" if isinstance(value, int) else "a number"
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{name} must be a finite number, got {value!r}", field=name)
    if value < low or (high is not None and value > high):
        bounds = f">= {low}" if high is None else f"between {low} and {high}"
        raise ConfigError(f"{name} must be {kind} {bounds}, got {value!r}", field=name)


def _check_positive(name: str, value: float) -> None:
    if not (math.isfinite(value) and value > 0):
        raise ConfigError(f"{name} must be a number of seconds > 0, got {value!r}", field=name)


def _set(values: dict[str, Any], sources: dict[str, str], name: str, raw: Any, source: str) -> None:
    if name not in _TYPES:
        raise ConfigError(f"unknown setting {name!r}", field=name, source=source)
    try:
        values[name] = _parse(name, raw)
    except ConfigError as exc:
        raise exc.with_source(source) from None
    sources[name] = source


def _parse(name: str, raw: Any) -> Any:
    """Turn a raw value (a string from the environment, or YAML/TOML data) into the field's type."""
    hint = _TYPES[name]
    if hint in (int | None, float | None) and (
        raw is None or (isinstance(raw, str) and raw.strip() == "")
    ):
        return None
    if hint is bool or hint == "bool":
        if isinstance(raw, bool):
            return raw
        text = str(raw).strip().lower()
        if text in _TRUE:
            return True
        if text in _FALSE:
            return False
        raise ConfigError(f"{name} must be true or false, got {raw!r}", field=name)
    if hint is int or hint == (int | None):
        if isinstance(raw, int) and not isinstance(raw, bool):
            return raw
        try:
            return int(str(raw).strip())
        except ValueError:
            raise ConfigError(f"{name} must be an integer, got {raw!r}", field=name) from None
    if hint is float or hint == (float | None):
        if isinstance(raw, (int, float)) and not isinstance(raw, bool):
            return float(raw)
        match = _DURATION.match(str(raw))
        if not match:
            raise ConfigError(
                f"{name} must be a duration in seconds (3, 0.5) or with a unit (500ms, 3s, 1m), "
                f"got {raw!r}",
                field=name,
            )
        return float(match.group(1)) * _DURATION_UNITS[match.group(2)]
    if hint is str:
        if isinstance(raw, (dict, list)):
            raise ConfigError(f"{name} must be a string, got {raw!r}", field=name)
        return str(raw)
    # endpoint_qps_limits: a mapping, or "method=qps,method=qps" from the environment.
    if isinstance(raw, Mapping):
        return dict(raw)
    pairs: dict[str, int] = {}
    for item in filter(None, (p.strip() for p in str(raw).split(","))):
        method, sep, qps = item.partition("=")
        if not sep or not qps.strip().isdigit():
            raise ConfigError(
                f"{name} must be method=qps pairs separated by commas, got {raw!r}", field=name
            )
        pairs[method.strip()] = int(qps)
    return pairs


def _read_file(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror or exc}") from None
    suffix = path.suffix.lower()
    try:
        if suffix == ".toml":
            data: Any = tomllib.loads(text)
        elif suffix in (".yml", ".yaml"):
            import yaml

            data = yaml.safe_load(text) or {}
        else:
            got = suffix or "no suffix"
            raise ConfigError(f"config file {path} must end in .yml, .yaml or .toml, got {got!r}")
    except ConfigError:
        raise
    except Exception as exc:  # noqa: BLE001 - both parsers raise their own error families
        raise ConfigError(f"config file {path} is not valid {suffix[1:].upper()}: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(
            f"config file {path} must hold a mapping of settings, got {type(data).__name__}"
        )
    out: dict[str, Any] = {}
    for key, value in data.items():
        norm = str(key).replace("_", "").replace("-", "").lower()
        name = _NORMALISED.get(norm) or _FILE_ALIASES.get(norm)
        if name is None:
            raise ConfigError(
                f"unknown setting {key!r} in config file {path}; known settings: "
                + ", ".join(_FIELDS)
            )
        out[name] = value
    return out


FIELD_HELP: Mapping[str, str] = types.MappingProxyType(
    {
        "service_name": "service name for logs, metrics and Consul (default: the Thrift service's)",
        "cluster": f"cluster name (default {DEFAULT_CLUSTER})",
        "version": "the service's version, shown on /runtime/kite and as a Consul tag",
        "host": "TCP host to listen on (default 0.0.0.0)",
        "port": f"TCP port to listen on; 0 picks a free one (default {DEFAULT_PORT})",
        "listen_type": "tcp, unix, or auto: unix when unix_socket is set (default auto)",
        "unix_socket": "listen on this Unix socket path instead of TCP",
        "backlog": f"listen backlog (default {DEFAULT_BACKLOG})",
        "service_mesh_mode": "listen on the mesh ingress address; limits are the sidecar's",
        "service_mesh_ingress_addr": "service-mesh ingress: host:port or a socket path",
        "read_write_timeout": "seconds to read a whole request from its first byte, and to "
        f"write its reply (default {DEFAULT_READ_WRITE_TIMEOUT:g})",
        "idle_timeout": "seconds a kept-alive connection may wait between requests; 0: forever "
        f"(default {DEFAULT_IDLE_TIMEOUT:g})",
        "exit_wait_time": "seconds stop() lets requests in flight finish "
        f"(default {DEFAULT_EXIT_WAIT_TIME:g})",
        "drain_time": "seconds to keep serving after deregistering, before the listener closes "
        f"(default {DEFAULT_DRAIN_TIME_REGISTERED:g} when registered in Consul, else 0)",
        "limit_connections": f"most connections open at once; 0: no limit "
        f"(default {DEFAULT_LIMIT_CONNECTIONS})",
        "limit_qps": f"most requests per second; 0: no limit (default {DEFAULT_LIMIT_QPS})",
        "qps_fill_interval": "seconds between QPS token refills "
        f"(default {DEFAULT_QPS_FILL_INTERVAL:g})",
        "endpoint_qps_limits": "per-method QPS limits: method=qps,method=qps",
        "get_real_ip": "make the caller's IP available to handlers through real_ip() (default on)",
        "max_frame_size": "largest frame, string or container accepted, in bytes "
        f"(default {DEFAULT_MAX_FRAME_SIZE})",
        "enable_metrics": "collect Prometheus metrics, served on /metrics (default on)",
        "enable_debug_server": "serve /runtime/kite, /metrics, /debug/greenlets, /health "
        "(default on)",
        "debug_host": "host for the debug server (default 127.0.0.1)",
        "debug_port": "port for the debug server (default: 1 followed by the service port)",
        "report_interval": "seconds between two reports of the same kind "
        f"(default {DEFAULT_REPORT_INTERVAL:g})",
        "event_capacity": f"recent events kept (default {DEFAULT_EVENT_CAPACITY})",
        "hub_block_threshold": "report a handler blocking the gevent hub this long; 0: off "
        f"(default {DEFAULT_HUB_BLOCK_THRESHOLD:g})",
        "register": "register the service in Consul (default off)",
        "consul_addr": f"Consul agent host:port (default {DEFAULT_CONSUL_ADDR})",
        "consul_token": "Consul ACL token",
        "register_delay": "seconds between listening and registering "
        f"(default {DEFAULT_REGISTER_DELAY:g})",
        "register_interval": "seconds between checks that Consul still knows this instance "
        f"(default {DEFAULT_REGISTER_INTERVAL:g})",
        "health_check": "Consul health check: tcp, ttl or none (default tcp)",
        "remote_config": "watch kite's limit keys in Consul KV and apply them live (default off)",
        "log_format": "json or console (default json)",
        "log_level": "debug, info, warning, error or critical (default info)",
        "access_log": "log one line per request (default off)",
    }
)
