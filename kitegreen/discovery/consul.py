"""Making a py-consul client from kitegreen settings.

py-consul (the maintained fork of python-consul) is imported here and only here, lazily: it
pulls in ``requests`` and ``ssl``, which a server without Consul should not pay for, and which
must be imported after gevent has patched the standard library.
"""

from __future__ import annotations

import contextlib
import socket
import weakref
from typing import Any

from kitegreen.config import DEFAULT_CONSUL_ADDR
from kitegreen.exceptions import ConfigError

CONSUL_TIMEOUT = 5.0
"""Seconds a Consul call may take before it counts as failed (blocking queries add their wait)."""
STOP_WAIT = 1.0
"""Seconds a stop lets the greenlets making Consul calls end by themselves before it kills
them (the remote-config watches once their sockets are shut down; the registration greenlet
with its call in flight)."""


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
    """A Consul client of a server or an instance: made on first use, closed once, and able to
    end the calls it has in flight (:meth:`interrupt`).

    Ending a call in flight is done to its socket, not to the greenlet making it: a kill
    thrown into a greenlet inside ``requests``/``urllib3`` lands wherever that greenlet
    yields, and where it lands inside urllib3's ``_get_conn`` (its liveness poll of a pooled
    connection yields to the hub) the connection it had taken from the pool is lost, neither
    closed nor returned: a socket left to the garbage collector. Shutting the socket down
    instead makes the call fail the ordinary way (end of stream), inside the library, which
    closes its connection.

    Args:
        addr: ``consul_addr``.
        token: ``consul_token``.
    """

    def __init__(self, addr: str, token: str) -> None:
        self._addr = addr
        self._token = token
        self._client: Any = None
        self._calls: _Calls | None = None

    def client(self) -> Any:
        """The ``consul.Consul`` client, made now if it was not yet.

        Raises:
            ConfigError: ``addr`` is not host:port.
        """
        if self._client is None:
            client = make_consul(self._addr, self._token)
            self._calls = _Calls(client)
            self._client = client
        return self._client

    def interrupt(self) -> None:
        """End every call in flight now (each fails with a connection error) and refuse new
        connections from this client; idempotent."""
        if self._calls is not None:
            self._calls.interrupt()

    def close(self) -> None:
        """End the calls in flight and close the client's connections, if it was made;
        idempotent. The client stays refusing (a greenlet still holding it opens nothing); a
        later :meth:`client` makes a new one."""
        self.interrupt()
        client, self._client = self._client, None
        self._calls = None
        if client is not None:
            close_client(client)


class _Calls:
    """The HTTP connections one client opened, and whether it may open more: every pool of the
    client's session makes its connections through here."""

    def __init__(self, client: Any) -> None:
        from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

        self.connections: weakref.WeakSet[Any] = weakref.WeakSet()
        self.interrupted = False
        calls = self

        def tracking(base: type) -> type:
            class Tracking(base):  # type: ignore[misc]
                def _new_conn(self) -> Any:
                    if calls.interrupted:
                        raise StopConsulCall("the Consul client is stopping")
                    connection = super()._new_conn()
                    calls.connections.add(connection)
                    return connection

            return Tracking

        pools = {"http": tracking(HTTPConnectionPool), "https": tracking(HTTPSConnectionPool)}
        session = getattr(getattr(client, "http", None), "session", None)
        for adapter in getattr(session, "adapters", {}).values():
            manager = getattr(adapter, "poolmanager", None)
            if manager is not None:
                manager.pool_classes_by_scheme = pools

    def interrupt(self) -> None:
        self.interrupted = True
        for connection in list(self.connections):
            sock = getattr(connection, "sock", None)
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)


class StopConsulCall(ConnectionAbortedError):
    """Ends a Consul call because its owner stops: raised when a stopping client would open a
    connection, and thrown into a greenlet that did not end once its calls were interrupted.

    An ``OSError``, so that urllib3 treats it as a connection failure and closes the
    connection it was using; a plain ``GreenletExit`` passes through urllib3 untouched.
    """


def close_client(client: Any) -> None:
    """Close the pooled HTTP connections of a ``consul.Consul`` (py-consul's close() does not)."""
    session = getattr(getattr(client, "http", None), "session", None)
    if session is not None:
        session.close()
