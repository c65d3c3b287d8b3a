"""Per-connection context visible to handlers: the caller's real IP.

kite smuggled the peer address to handlers through a map keyed by goroutine id. Each gevent
greenlet runs in its own ``contextvars`` context, so a context variable set by the connection's
greenlet is seen by the handler it calls and by nothing else.
"""

from __future__ import annotations

from contextvars import ContextVar

_real_ip: ContextVar[str | None] = ContextVar("kitegreen_real_ip", default=None)


def real_ip() -> str | None:
    """The IP address of the client whose request is being handled.

    Returns:
        The peer's IPv4 or IPv6 address as text, or None on a Unix socket, outside a request,
        or when ``Config.get_real_ip`` is off. Greenlets the handler spawns start with an empty
        context and see None; pass the value along explicitly.
    """
    return _real_ip.get()


def set_real_ip(ip: str | None) -> None:
    """Record the current connection's peer IP (called once per connection)."""
    _real_ip.set(ip)
