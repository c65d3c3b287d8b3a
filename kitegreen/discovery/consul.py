"""Making a py-consul client from kitegreen settings.

py-consul (the maintained fork of python-consul) is imported here and only here, lazily: it
pulls in ``requests`` and ``ssl``, which a server without Consul should not pay for, and which
must be imported after gevent has patched the standard library.
"""

from __future__ import annotations

from typing import Any

from kitegreen.config import DEFAULT_CONSUL_ADDR
from kitegreen.exceptions import ConfigError

CONSUL_TIMEOUT = 5.0
"""Seconds a Consul call may take before it counts as failed (blocking queries add their wait)."""


def make_consul(addr: str, token: str) -> Any:
    """A ``consul.Consul`` client for ``addr`` (``host:port``, optionally with a scheme).

    Raises:
        ConfigError: ``addr`` is not host:port.
    """
    import consul

    addr = addr or DEFAULT_CONSUL_ADDR
    scheme = "http"
    if "://" in addr:
        scheme, addr = addr.split("://", 1)
    host, sep, port = addr.rstrip("/").rpartition(":")
    if not sep or not port.isdigit():
        raise ConfigError(
            f"consul_addr must be host:port or scheme://host:port, got {addr!r}",
            field="consul_addr",
        )
    return consul.Consul(
        host=host.strip("[]"),
        port=int(port),
        token=token or None,
        scheme=scheme,
        connections_timeout=CONSUL_TIMEOUT,
    )


class ConsulConnection:
    """The Consul client of a server or an instance: made on first use, closed once.

    Args:
        addr: ``consul_addr``.
        token: ``consul_token``.
    """

    def __init__(self, addr: str, token: str) -> None:
        self._addr = addr
        self._token = token
        self._client: Any = None

    def client(self) -> Any:
        """The ``consul.Consul`` client, made now if it was not yet.

        Raises:
            ConfigError: ``addr`` is not host:port.
        """
        if self._client is None:
            self._client = make_consul(self._addr, self._token)
        return self._client

    def close(self) -> None:
        """Close the client's connections, if it was made; idempotent."""
        client, self._client = self._client, None
        if client is not None:
            close_client(client)


class StopConsulCall(ConnectionAbortedError):
    """Thrown into a greenlet that may be inside a Consul call, to stop it.

    An ``OSError``, so that urllib3 closes the connection the call was using; a plain
    ``GreenletExit`` passes through urllib3 untouched and leaks the socket.
    """


def close_client(client: Any) -> None:
    """Close the pooled HTTP connections of a ``consul.Consul`` (py-consul's close() does not)."""
    session = getattr(getattr(client, "http", None), "session", None)
    if session is not None:
        session.close()
