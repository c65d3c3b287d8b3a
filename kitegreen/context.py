"""What a handler can know about the request it serves: the caller's real IP, and the metadata a
header protocol carried (TTHeader from Kitex and kite, THeader from Apache Thrift and fbthrift).

kite smuggled the peer address to handlers through a map keyed by goroutine id. Each
connection has its own ``contextvars`` context, and the worker greenlet serving one of its
requests runs in it, so a context variable set for the connection is seen by the handler it
calls and by nothing else.

A new greenlet starts with an empty context (greenlet's documented behaviour, unlike an asyncio
task), so a greenlet the handler spawns would see none of it. :func:`inherit_on_spawn`, which
every server calls, makes ``gevent.spawn`` and ``gevent.spawn_later`` give the new greenlet a
copy of the spawner's context (greenlet's documented way: set ``gr_context`` before it starts),
as ``asyncio.create_task`` does.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from contextvars import Context, ContextVar, copy_context
from dataclasses import dataclass, field
from typing import Any

_real_ip: ContextVar[str | None] = ContextVar("kitegreen_real_ip", default=None)
# The request loop sets a callable that builds the request's info when first asked (the
# metadata of a header frame is split into its parts only for handlers that read it).
_request_info: ContextVar[Callable[[], RequestInfo] | None] = ContextVar(
    "kitegreen_request_info", default=None
)


def real_ip() -> str | None:
    """The IP address of the client whose request is being handled.

    It is the TCP peer's address, or the address a trusted proxy saw: the ``rip`` header of a
    TTHeader request counts only in service-mesh mode or when the TCP peer is in
    ``Config.trusted_proxies``; from anyone else it is ignored, so a client cannot claim another
    address.

    Returns:
        The address as text, or None on a Unix socket (without a trusted ``rip``), outside a
        request, or when ``Config.get_real_ip`` is off. Greenlets the handler spawns start with
        an empty context and see None; pass the value along explicitly.
    """
    return _real_ip.get()


def set_real_ip(ip: str | None) -> None:
    """Record the IP that :func:`real_ip` reports in this greenlet (the request loop's job)."""
    _real_ip.set(ip)


@dataclass(slots=True)
class RequestInfo:
    """The request being handled, as its header protocol described it, and what the handler
    sends back in the reply's header.

    On a plain Thrift connection (no header protocol) every field is empty and response headers
    go nowhere: plain Thrift has no place for them.

    Attributes:
        header: ``"ttheader"``, ``"theader"``, or None for plain Thrift.
        caller_service: the calling service (TTHeader ``FROM_SERVICE``).
        caller_method: the calling service's method that made the call (``FROM_METHOD``).
        log_id: the request's log id (TTHeader ``LOG_ID``); also bound into the handler's
            structlog context and written in the access log.
        deadline: when the caller gives up, on the ``time.monotonic()`` clock: the arrival of
            the request's first byte plus the caller's RPC timeout (TTHeader ``RPC_TIMEOUT``,
            THeader ``client_timeout`` or baseplate's ``Deadline-Budget``); None without one.
        transit: Kitex metainfo for this hop only (``RPC_TRANSIT_<key>``, prefix removed).
        persistent: Kitex metainfo to pass on to every later hop (``RPC_PERSIST_<key>``).
        headers: every string header as received (TTHeader's string key-values, or THeader's
            headers).
        int_headers: TTHeader's integer key-values, by key number.
        response_headers: string headers for the reply; set them with the methods below.
    """

    header: str | None = None
    caller_service: str | None = None
    caller_method: str | None = None
    log_id: str | None = None
    deadline: float | None = None
    transit: Mapping[str, str] = field(default_factory=dict)
    persistent: Mapping[str, str] = field(default_factory=dict)
    headers: Mapping[str, str] = field(default_factory=dict)
    int_headers: Mapping[int, str] = field(default_factory=dict)
    response_headers: dict[str, str] = field(default_factory=dict)

    def remaining(self) -> float | None:
        """Seconds left before the caller's deadline (negative once past), or None."""
        return None if self.deadline is None else self.deadline - time.monotonic()

    def set_response_header(self, key: str, value: str) -> None:
        """Send ``key: value`` back in the reply's header (a THeader header, or a TTHeader
        string key-value, which a Kitex client reads as backward metainfo)."""
        self.response_headers[key] = value

    set_backward = set_response_header
    """Kitex's name for :meth:`set_response_header`: backward metainfo travels as a TTHeader
    string key-value under its bare key."""

    def set_biz_status(
        self, status: int, message: str = "", extra: Mapping[str, str] | None = None
    ) -> None:
        """Report a business error the Kitex way, without a Thrift exception: the reply
        carries ``biz-status`` (non-zero is an error), ``biz-message`` and ``biz-extra`` (a
        JSON object), which a Kitex client turns into a ``BizStatusError``."""
        import json

        self.response_headers["biz-status"] = str(int(status))
        if message:
            self.response_headers["biz-message"] = message
        if extra:
            self.response_headers["biz-extra"] = json.dumps(dict(extra), separators=(",", ":"))


def request_info() -> RequestInfo:
    """The metadata of the request being handled (see :class:`RequestInfo`).

    Returns:
        The request's info; an empty one on a plain Thrift connection or outside a request.
    """
    source = _request_info.get()
    return source() if source is not None else RequestInfo()


def set_request_info(source: Callable[[], RequestInfo] | None) -> None:
    """Make ``source()`` what :func:`request_info` returns in this greenlet (the request loop's
    job); ``source`` returns the same info each time it is called."""
    _request_info.set(source)


def inherit_on_spawn() -> None:
    """Make ``gevent.spawn`` and ``gevent.spawn_later`` start the new greenlet in a copy of
    the spawner's ``contextvars`` context; idempotent.

    A handler's greenlets then see :func:`real_ip`, :func:`request_info`, the current
    OpenTelemetry span and the log context of the request that spawned them, even after that
    request ended. The copy is the context's, not its values': a variable the new greenlet
    sets is its own. Cost: one ``copy_context()`` per spawn (about 0.1 us), none per request.
    Only the module attributes are replaced (gevent's ``Greenlet`` is a compiled type):
    ``from gevent import spawn`` done before the server is built, a ``Pool`` or a bare
    ``Greenlet(...).start()`` keep gevent's empty context; for those, set ``g.gr_context =
    contextvars.copy_context()`` before starting ``g``.
    """
    import gevent

    if getattr(gevent.spawn, "_kitegreen_inherits", False):
        return
    greenlet_cls = gevent.Greenlet

    def spawn(function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        greenlet = greenlet_cls(function, *args, **kwargs)
        greenlet.gr_context = _spawned_context()
        greenlet.start()
        return greenlet

    def spawn_later(seconds: float, function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        greenlet = greenlet_cls(function, *args, **kwargs)
        greenlet.gr_context = _spawned_context()
        greenlet.start_later(seconds)
        return greenlet

    for wrapper, original in ((spawn, gevent.spawn), (spawn_later, gevent.spawn_later)):
        wrapper.__doc__ = original.__doc__
        setattr(wrapper, "_kitegreen_inherits", True)  # noqa: B010 - a function attribute
    gevent.spawn = spawn
    gevent.spawn_later = spawn_later


def _spawned_context() -> Context:
    """A copy of this greenlet's context for a greenlet it spawns, the request's info fixed.

    The request loop sets a *source* of the info once per connection (it builds the info only
    when asked), and that source answers for whatever request the connection handles now: a
    spawned greenlet that asks after its request ended must get its own request's info, so the
    info is taken now, in the spawner, and the copy holds it as it is.
    """
    context = copy_context()
    source = _request_info.get()
    if source is not None:
        info = source()
        context.run(_request_info.set, lambda: info)
    return context
