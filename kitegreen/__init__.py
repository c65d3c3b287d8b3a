"""kitegreen: a Thrift RPC server for gevent with kite's limits, events, debug endpoints and Consul.

The public API is what this module exports; everything else is internal.
"""

from __future__ import annotations

import sys as _sys

if _sys.argv[:1] == ["-m"]:
    # ``python -m kitegreen`` imports this package before kitegreen.__main__ runs, and what we
    # import below pulls in ssl and socket. gevent must patch them first (Python documents
    # that argv[0] is "-m" while the -m target is being located).
    from kitegreen.cli import patch as _patch

    _patch()

from kitegreen._version import VERSION as __version__  # noqa: N811
from kitegreen.config import Config
from kitegreen.context import real_ip
from kitegreen.events import Event
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
from kitegreen.registry import ConsulRegistry, NullRegistry, Registration, Registry
from kitegreen.reporter import NullReporter, Reporter
from kitegreen.server import RpcServer

__all__ = [
    "Config",
    "ConfigError",
    "ConsulRegistry",
    "Event",
    "FrameTooLarge",
    "HandlerError",
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
    "RpcServer",
    "__version__",
    "real_ip",
]
