"""kitegreen: a Thrift RPC server for gevent with kite's limits, events, debug endpoints and Consul.

The public API is what this module exports; everything else is internal.

The names are imported on first use (PEP 562), all at once: importing the package itself
imports neither the server nor thriftpy2, which import ssl and socket. The launcher
(``kitegreen`` and ``python -m kitegreen``) imports this package before it can monkey-patch,
and gevent must patch ssl before anything imports it.
"""

from __future__ import annotations

import importlib as _importlib
import typing as _typing

from kitegreen._version import VERSION as __version__  # noqa: N811

if _typing.TYPE_CHECKING:
    from kitegreen.config import Config, load_config
    from kitegreen.context import RequestInfo, real_ip, request_info
    from kitegreen.discovery.registry import ConsulRegistry, NullRegistry, Registration, Registry
    from kitegreen.exceptions import (
        ConfigError,
        FrameTooLarge,
        HandlerError,
        KitegreenError,
        LaunchError,
        ListenError,
        ProtocolError,
        RegistryError,
    )
    from kitegreen.hooks import HookContext
    from kitegreen.observability.events import Event
    from kitegreen.observability.reporter import NullReporter, Reporter
    from kitegreen.server import RpcServer
    from kitegreen.signals import SignalStop, stop_on_signals

__all__ = [
    "Config",
    "ConfigError",
    "ConsulRegistry",
    "Event",
    "FrameTooLarge",
    "HandlerError",
    "HookContext",
    "KitegreenError",
    "LaunchError",
    "ListenError",
    "NullRegistry",
    "NullReporter",
    "ProtocolError",
    "Registration",
    "Registry",
    "RegistryError",
    "Reporter",
    "RequestInfo",
    "RpcServer",
    "SignalStop",
    "__version__",
    "load_config",
    "real_ip",
    "request_info",
    "stop_on_signals",
]

_SOURCES = {
    "Config": "kitegreen.config",
    "ConfigError": "kitegreen.exceptions",
    "ConsulRegistry": "kitegreen.discovery.registry",
    "Event": "kitegreen.observability.events",
    "FrameTooLarge": "kitegreen.exceptions",
    "HandlerError": "kitegreen.exceptions",
    "HookContext": "kitegreen.hooks",
    "KitegreenError": "kitegreen.exceptions",
    "LaunchError": "kitegreen.exceptions",
    "ListenError": "kitegreen.exceptions",
    "NullRegistry": "kitegreen.discovery.registry",
    "NullReporter": "kitegreen.observability.reporter",
    "ProtocolError": "kitegreen.exceptions",
    "Registration": "kitegreen.discovery.registry",
    "Registry": "kitegreen.discovery.registry",
    "RegistryError": "kitegreen.exceptions",
    "Reporter": "kitegreen.observability.reporter",
    "RequestInfo": "kitegreen.context",
    "RpcServer": "kitegreen.server",
    "SignalStop": "kitegreen.signals",
    "load_config": "kitegreen.config",
    "real_ip": "kitegreen.context",
    "request_info": "kitegreen.context",
    "stop_on_signals": "kitegreen.signals",
}


def __getattr__(name: str) -> object:
    if name not in _SOURCES:
        raise AttributeError(f"module 'kitegreen' has no attribute {name!r}")
    # The whole API at once, so that the module never shows half of it: by the time anyone
    # uses one name, what the package exports is what vars(kitegreen) holds.
    namespace = globals()
    for export, module in _SOURCES.items():
        namespace[export] = getattr(_importlib.import_module(module), export)
    return namespace[name]


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
