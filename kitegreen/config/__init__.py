"""Server configuration: :class:`Config` and the constants other modules use.

Three modules, one concern each: :mod:`~kitegreen.config.settings` (the dataclass, its
defaults and its validation), :mod:`~kitegreen.config.loader` (file, environment and flags,
layered) and :mod:`~kitegreen.config.help` (the launcher's flags and ``--help``, generated
from the fields' metadata; imported by the launcher only).
"""

from __future__ import annotations

from kitegreen.config.loader import load_config
from kitegreen.config.names import CONFIG_FILE_ENV, ENV_ALIASES, ENV_PREFIX
from kitegreen.config.settings import (
    DEFAULT_BACKLOG,
    DEFAULT_CLUSTER,
    DEFAULT_CONSUL_ADDR,
    DEFAULT_DEBUG_HOST,
    DEFAULT_DEBUG_IDLE_TIMEOUT,
    DEFAULT_DEBUG_MAX_CONNECTIONS,
    DEFAULT_DRAIN_TIME_REGISTERED,
    DEFAULT_EVENT_CAPACITY,
    DEFAULT_EXIT_WAIT_TIME,
    DEFAULT_HOST,
    DEFAULT_HUB_BLOCK_THRESHOLD,
    DEFAULT_IDLE_TIMEOUT,
    DEFAULT_LIMIT_CONNECTIONS,
    DEFAULT_LIMIT_QPS,
    DEFAULT_MAX_FRAME_SIZE,
    DEFAULT_PORT,
    DEFAULT_QPS_FILL_INTERVAL,
    DEFAULT_READ_WRITE_TIMEOUT,
    DEFAULT_REGISTER_DELAY,
    DEFAULT_REGISTER_INTERVAL,
    DEFAULT_REPORT_INTERVAL,
    DEFAULT_WORKER_TIMEOUT,
    DEFAULT_WORKERS,
    HEALTH_CHECKS,
    LISTEN_TYPES,
    LOG_FORMATS,
    LOG_LEVELS,
    MAX_WORKERS,
    Config,
    check_endpoint_qps_limits,
    check_int,
)

__all__ = [
    "CONFIG_FILE_ENV",
    "DEFAULT_BACKLOG",
    "DEFAULT_CLUSTER",
    "DEFAULT_CONSUL_ADDR",
    "DEFAULT_DEBUG_HOST",
    "DEFAULT_DEBUG_IDLE_TIMEOUT",
    "DEFAULT_DEBUG_MAX_CONNECTIONS",
    "DEFAULT_DRAIN_TIME_REGISTERED",
    "DEFAULT_EVENT_CAPACITY",
    "DEFAULT_EXIT_WAIT_TIME",
    "DEFAULT_HOST",
    "DEFAULT_HUB_BLOCK_THRESHOLD",
    "DEFAULT_IDLE_TIMEOUT",
    "DEFAULT_LIMIT_CONNECTIONS",
    "DEFAULT_LIMIT_QPS",
    "DEFAULT_MAX_FRAME_SIZE",
    "DEFAULT_PORT",
    "DEFAULT_QPS_FILL_INTERVAL",
    "DEFAULT_READ_WRITE_TIMEOUT",
    "DEFAULT_REGISTER_DELAY",
    "DEFAULT_REGISTER_INTERVAL",
    "DEFAULT_REPORT_INTERVAL",
    "DEFAULT_WORKERS",
    "DEFAULT_WORKER_TIMEOUT",
    "ENV_ALIASES",
    "ENV_PREFIX",
    "HEALTH_CHECKS",
    "LISTEN_TYPES",
    "LOG_FORMATS",
    "LOG_LEVELS",
    "MAX_WORKERS",
    "Config",
    "check_endpoint_qps_limits",
    "check_int",
    "load_config",
]
