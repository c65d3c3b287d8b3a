"""gevent's accept loop, handing out plain non-blocking sockets, with admission before a
connection is served and a way to take in the backlog before the listener closes."""

from __future__ import annotations

import _socket
from collections.abc import Callable
from typing import Any

from gevent.server import StreamServer

from kitegreen.exceptions import ConfigError


class Acceptor(StreamServer):  # type: ignore[misc]
    """Accepts connections and runs ``handle(sock, address)`` for each, in the accept loop.

    Args:
        listener: a bound, listening socket.
        handle: serves one connection; runs in the hub, so it must not wait (the engine's
            connections hold no greenlet until their bytes arrive).
        admit: called first; returns False to refuse the connection (the callee closes it).
        max_accept: connections accepted per wake-up of the loop; gevent's default when None.
        gate: called before each accept; a positive result is a number of seconds to leave
            the listener alone instead (processes sharing a listener use it to share
            connections out evenly).

    Raises:
        ConfigError: ``max_accept`` is below 1.
    """

    def __init__(
        self,
        listener: Any,
        handle: Callable[[Any, Any], None],
        admit: Callable[[Any, Any], bool],
        *,
        max_accept: int | None = None,
        gate: Callable[[], float] | None = None,
    ) -> None:
        super().__init__(listener, handle=handle, spawn=None)
        self._admit = admit
        self._gate = gate
        self._deferral: Any = None
        if max_accept is not None:
            if max_accept < 1:
                raise ConfigError(f"max_accept must be >= 1, got {max_accept}")
            self.max_accept = max_accept

    def do_read(self) -> tuple[Any, Any] | None:
        if self._gate is not None:
            delay = self._gate()
            if delay > 0:
                super().stop_accepting()
                self._deferral = self.loop.timer(delay)
                self._deferral.start(self._resume)
                return None
        return self._accept_one()

    def _accept_one(self) -> tuple[Any, Any] | None:
        return accept_one(self.socket)

    def stop_accepting(self) -> None:
        """Stop accepting, a deferral by the gate included."""
        self._cancel_deferral()
        super().stop_accepting()

    def _resume(self) -> None:
        self._cancel_deferral()
        self.start_accepting()

    def _cancel_deferral(self) -> None:
        deferral, self._deferral = self._deferral, None
        if deferral is not None:
            deferral.stop()
            deferral.close()

    def do_handle(self, *args: Any) -> None:
        client_socket, address = args
        if not self._admit(client_socket, address):
            return
        # Not gevent's inline handling, which closes the socket when ``handle`` returns: this
        # one lives on.
        try:
            self._handle(client_socket, address)
        except BaseException:
            self.do_close(client_socket, address)
            raise

    def drain_backlog(self, handle: Callable[[Any, Any], None]) -> int:
        """Accept every connection the kernel has completed, and pass each to ``handle``.

        Closing a listening socket resets the connections still in its backlog: clients that
        connected, and may have sent a request, would see a reset instead of a reply. Taking
        them in first lets them be served or closed cleanly.

        Returns:
            How many connections were taken in.
        """
        return take_backlog(self.socket, handle)


def accept_one(listener: Any) -> tuple[Any, Any] | None:
    """Accept a connection from the non-blocking ``listener`` if one is waiting.

    Returns:
        A plain non-blocking socket (``TCP_NODELAY`` on TCP) and the peer's address; None if
        no connection was waiting.

    Raises:
        OSError: accept() failed otherwise (no descriptor left, the connection aborted).
    """
    # A plain non-blocking socket rather than gevent's cooperative one: the connection drives
    # it with io watchers directly (transport.stream), which takes the per-request cost of
    # gevent's socket methods off the hot path.
    try:
        fd, address = listener._accept()
    except BlockingIOError:
        return None
    raw = _socket.socket(listener.family, listener.type, listener.proto, fd)
    raw.setblocking(False)
    if listener.family in (_socket.AF_INET, _socket.AF_INET6):
        # One write per reply: Nagle could only hold it back behind a delayed ACK.
        raw.setsockopt(_socket.IPPROTO_TCP, _socket.TCP_NODELAY, 1)
    return raw, address


def take_backlog(
    listener: Any, handle: Callable[[Any, Any], None], limit: int | None = None
) -> int:
    """Accept the connections the kernel has completed on ``listener`` (at most ``limit``), and
    pass each to ``handle``; stop early if accept() fails (no descriptor left).

    Returns:
        How many connections were taken in.
    """
    taken = 0
    while limit is None or taken < limit:
        try:
            accepted = accept_one(listener)
        except OSError:
            break
        if accepted is None:
            break
        taken += 1
        handle(*accepted)
    return taken
