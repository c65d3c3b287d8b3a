"""The exceptions kitegreen raises.

Every exception derives from :class:`KitegreenError`, and from the standard exception a
caller would catch anyway where there is one::

    KitegreenError
    ├── ConfigError (ValueError)       a setting is missing, malformed or out of range
    ├── HandlerError (TypeError)       the handler object does not fit the Thrift service
    ├── ListenError (OSError)          the listening socket could not be created
    ├── LaunchError (RuntimeError)     ``python -m kitegreen MODULE:ATTR`` could not load the target
    ├── ProtocolError (ValueError)     a peer sent bytes that are not a Thrift message we accept
    │   ├── FrameTooLarge              a frame or length field exceeds ``max_frame_size``
    │   └── MemoryBudgetExceeded       decoding a message would take more memory than allowed
    └── RegistryError (RuntimeError)   the service registry (Consul) refused or failed a call
"""

from __future__ import annotations


class KitegreenError(Exception):
    """Root of every exception raised by kitegreen."""


class ConfigError(KitegreenError, ValueError):
    """A configuration value is missing, malformed or out of range.

    Args:
        message: what was wrong and what was expected.
        field: the :class:`~kitegreen.Config` field concerned, if any.
        source: where the value came from (a file, an environment variable, a flag).
    """

    def __init__(self, message: str, *, field: str | None = None, source: str | None = None):
        self.field = field
        self.source = source
        self.reason = message
        super().__init__(f"{message} (from {source})" if source else message)

    def with_source(self, source: str) -> ConfigError:
        """Return the same error, naming where the offending value came from."""
        return ConfigError(self.reason, field=self.field, source=source)


class HandlerError(KitegreenError, TypeError):
    """The handler object does not fit the Thrift service (raised at construction)."""


class ListenError(KitegreenError, OSError):
    """The server could not create its listening socket (address in use, bad address, ...)."""


class LaunchError(KitegreenError, RuntimeError):
    """The launcher could not import or build the server named on its command line."""


class ProtocolError(KitegreenError, ValueError):
    """A peer sent bytes that are not a Thrift message this server accepts."""


class FrameTooLarge(ProtocolError):
    """A frame, string or container would exceed ``max_frame_size``; refused before any memory
    is set aside for it."""


class MemoryBudgetExceeded(ProtocolError):
    """Decoding a message would build Python objects whose estimated size passes the memory
    allowed to it (``max_message_memory``, or what ``max_inflight_memory`` has left); refused
    as soon as the estimate passes, not after building it all."""


class RegistryError(KitegreenError, RuntimeError):
    """The service registry refused or failed a registration call."""


def describe(exc: BaseException) -> str:
    """``"TypeName: message"``, the form every log line and report gives an exception in."""
    return f"{type(exc).__name__}: {exc}"
