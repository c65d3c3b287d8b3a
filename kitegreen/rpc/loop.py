"""One client connection's request loop: kite's ``processRequests`` and ``onPanic``.

Between messages a connection holds no greenlet, only its socket, its read watcher and its
state. When bytes arrive, the connection is queued, and a warm worker greenlet of the
:class:`~kitegreen.rpc.dispatch.Dispatcher` takes it with the others that became readable in
the same iteration of the loop, serves every whole message that arrived, one at a time and in
order, and lets it wait again. The worker runs in the connection's own ``contextvars`` context, so
``real_ip()``, ``request_info()`` and the log context are this connection's. A request is: one
whole message from the :class:`~kitegreen.transport.stream.MessageStream`, decoded from memory
by the compiled codec, the limits, the handler, the reply encoded in one piece and sent with
(usually) one ``send``. Everything the loop needs is resolved once in :class:`ServeContext`.
"""

from __future__ import annotations

import contextlib
import struct
import time
import zlib
from collections.abc import Callable
from contextvars import Context, ContextVar
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import gevent
import structlog
from gevent import GreenletExit, getcurrent
from thriftpy2.thrift import TApplicationException, TMessageType

from kitegreen import context
from kitegreen.codec import _thrift
from kitegreen.codec._headers import parse as _parse_frame
from kitegreen.codec.headers import HeaderFrame, StrKey, inflated
from kitegreen.codec.wire import Wire
from kitegreen.context import RequestInfo
from kitegreen.exceptions import MemoryBudgetExceeded, ProtocolError, describe
from kitegreen.limiter import Limiter
from kitegreen.observability.metrics import Metrics
from kitegreen.observability.panics import PanicLog
from kitegreen.observability.reporter import PANIC, QPS_OVERLOAD, ReportGate
from kitegreen.observability.tracing import CallSpan, CallTracer
from kitegreen.rpc import metadata
from kitegreen.rpc.budget import (
    ENCODE_ON_HUB,
    OFFLOAD_SIZE,
    RELEASE_COST,
    DecodeLane,
    EncodeBudgetExceeded,
    MemoryBudget,
    encode_off_hub,
    release,
)
from kitegreen.rpc.dispatch import Dispatcher
from kitegreen.rpc.methods import Method
from kitegreen.transport.connections import StreamSet
from kitegreen.transport.stream import (
    CLOSE_LINGER,
    HAND_OVER_RETRY,
    HandOver,
    IdleTimeout,
    MessageStream,
    PeerClosed,
    StopServing,
)

LOADSHEDDING = 11
"""``TApplicationException`` type for a request refused by a QPS limit: fbthrift's
``LOADSHEDDING``, so clients can tell an overload from a crash (``INTERNAL_ERROR``, 6)."""
TIMEOUT = 12
"""``TApplicationException`` type for a call cut off at the caller's deadline (fbthrift's
``TIMEOUT``), with ``enforce_rpc_timeout`` on."""

_CALL = TMessageType.CALL
_ONEWAY = TMessageType.ONEWAY
_REPLY = TMessageType.REPLY
_EXCEPTION = TMessageType.EXCEPTION
_CALLS = frozenset((_CALL, _ONEWAY))
_APP_EXC_SPEC = _thrift.compile(TApplicationException)
_read_message_begin = _thrift.read_message_begin
_read_args_within = _thrift.read_args_within
_write_message = _thrift.write_message
_write_result = _thrift.write_result
_U32 = struct.Struct(">I")
_PEEK_SIZE = 1024
"""Bytes of a refused zlib payload inflated to read its message header (name and seqid)."""


def _structlog_var(key: str) -> ContextVar[Any]:
    """The context variable structlog keeps ``key`` in, which ``merge_contextvars`` reads.

    The request path sets it directly: ``bind_contextvars`` and ``reset_contextvars`` cost
    8 times as much per call (4.8 µs against 0.6 µs a pair, measured with timeit on the
    shared build machine).
    """
    tokens = structlog.contextvars.bind_contextvars(**{key: ...})  # Ellipsis: not bound
    var: ContextVar[Any] = tokens[key].var
    var.reset(tokens[key])
    return var


_PEER = _structlog_var("peer")
_METHOD = _structlog_var("method")
_LOG_ID = _structlog_var("log_id")


def _unbind_request() -> None:
    """Out of a request: the log context names no request's method or log id (the request
    path leaves them bound until the next request changes them)."""
    if _METHOD.get() is not ...:
        _METHOD.set(...)
    if _LOG_ID.get() is not ...:
        _LOG_ID.set(...)


def _bind_log_id(log_id: str | None) -> None:
    """The log context's ``log_id`` from here on: a header request's (unbound without one)."""
    if log_id is None:
        if _LOG_ID.get() is not ...:
            _LOG_ID.set(...)
    elif _LOG_ID.get() != log_id:
        _LOG_ID.set(log_id)


def _ignore_wake(interrupted: BaseException | None) -> None:
    """A closed connection's wake-up: nothing to do."""


def _forget(connection: Connection) -> None:
    """No owner to tell that a connection closed."""


class _DeadlinePassed(Exception):
    """The caller's deadline passed while its handler ran (``enforce_rpc_timeout``)."""


class CloseConnection(Exception):
    """End the request loop; ``reason`` goes to the debug log."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(slots=True)
class ServeContext:
    """What every connection of one server shares, resolved at start."""

    methods: dict[str, Method]
    limiter: Limiter
    reports: ReportGate
    metrics: Metrics | None
    log: Any
    panics: PanicLog
    read_write_timeout: float
    max_frame_size: int
    get_real_ip: bool
    access_log: bool
    trusted_proxies: tuple[metadata.IpNetwork, ...] = ()
    mesh_mode: bool = False
    """The service-mesh sidecar is the only peer: its ``rip`` header is trusted."""
    enforce_rpc_timeout: bool = False
    close_linger: float = CLOSE_LINGER
    """Seconds a closing connection reads what its client still sends (see
    :meth:`~kitegreen.transport.stream.MessageStream.close`)."""
    memory: MemoryBudget = field(default_factory=lambda: MemoryBudget(2**62, 2**62))
    """``max_message_memory`` and ``max_inflight_memory``, and what requests hold now."""
    decode_lane: DecodeLane = field(default_factory=DecodeLane)
    tracer: CallTracer | None = None
    """Starts each call's span (``Config.tracing`` on and OpenTelemetry installed)."""
    streams: StreamSet = field(default_factory=StreamSet)
    dispatcher: Dispatcher = field(default_factory=Dispatcher)
    """The warm greenlets that serve connections whose bytes arrived."""
    connection_closed: Callable[[Connection], object] = _forget
    """Called once a connection's socket is closed (a lingering close finished)."""
    stop_announced: bool = field(default=False, init=False)
    """Whether a stop has begun (:meth:`announce_stop`); read-only outside this class."""
    finishing: bool = field(default=False, init=False)
    """Whether the listener is closed (:meth:`finish_requests`); read-only outside."""
    request_budget: int = field(default=0, init=False)
    """Requests left before :attr:`on_budget_spent` is called; 0: not counted."""
    on_budget_spent: Callable[[], object] | None = field(default=None, init=False)
    hand_off: Callable[[Connection], bool] | None = field(default=None, init=False)
    """Set for a recycled worker's stop: once the listener is closed, each connection is
    handed to another worker at its next message boundary (True: it was) instead of ending."""
    handing_off: int = field(default=0, init=False)
    """Hand-offs in progress (:attr:`hand_off` running): the stop's deadline waits for them."""

    def spend_request(self) -> None:
        """One request answered: call :attr:`on_budget_spent` when the budget runs out."""
        self.request_budget -= 1
        if self.request_budget == 0 and self.on_budget_spent is not None:
            self.on_budget_spent()

    def announce_stop(self) -> None:
        """A stop has begun: TTHeader replies from now on carry ``crrst=1``, so Kitex clients
        stop reusing their connections; requests are still served as usual."""
        self.stop_announced = True

    def finish_requests(self) -> None:
        """The listener is closed: each connection finishes the requests that reached it,
        then closes."""
        self.stop_announced = True
        self.finishing = True


def peer_ip(address: Any) -> str | None:
    """The client IP from an accept() address; None on a Unix socket."""
    if not isinstance(address, tuple) or not address:
        return None
    ip = str(address[0])
    # A dual-stack listener reports IPv4 clients as ::ffff:a.b.c.d; users want a.b.c.d.
    return ip[7:] if ip.startswith("::ffff:") and "." in ip else ip


class Connection:
    """Serve Thrift requests on one accepted socket until it closes or the server stops."""

    __slots__ = (
        "_context",
        "_frame",
        "_handed",
        "_info",
        "_job",
        "_ready",
        "_reply_bytes",
        "_request_bytes",
        "_shown_ip",
        "_span",
        "_span_addresses",
        "_wake",
        "address",
        "ctx",
        "peer",
        "stream",
        "trusted",
    )

    def __init__(
        self,
        sock: Any,
        address: Any,
        ctx: ServeContext,
        adopted: tuple[Wire | None, bytes] | None = None,
    ) -> None:
        self.ctx = ctx
        self.address = address
        self.peer = peer_ip(address)
        self.stream = MessageStream(
            sock, rw_timeout=ctx.read_write_timeout, max_frame_size=ctx.max_frame_size
        )
        if adopted is not None:
            # Handed over by a worker that retired: its detected wire and unread bytes.
            self.stream.preload(adopted[1], adopted[0])
        self._handed = False
        """Handed to another worker: closed here without a FIN (the other holds it)."""
        self.trusted = ctx.mesh_mode or metadata.is_trusted(self.peer, ctx.trusted_proxies)
        """Whether this peer may tell the client's address in a ``rip`` header."""
        self._shown_ip = self.peer
        self._frame: HeaderFrame | None = None
        """The header frame of the request being handled, if it came in one."""
        self._info: RequestInfo | None = None
        """The request's info, once the handler asked for it (see :meth:`_request_info`)."""
        self._request_bytes = 0
        """The request's size on the wire, framing included, for the access log."""
        self._reply_bytes = 0
        """The size of what was sent in answer to it (0: nothing, a oneway call)."""
        self._span: CallSpan | None = None
        """The span of the call being handled, while tracing."""
        self._span_addresses: dict[str, Any] | None = None
        self._context: Context | None = None
        """Where the connection's requests run: its peer, ``real_ip()``, ``request_info()``."""
        # When bytes arrive the read watcher calls ready(job) in the hub, which queues the
        # job for the dispatcher's next batch; when a stop or the idle sweeper ends the wait,
        # wake(exc) runs it at once. Made once: no frame per request.
        self._ready: Callable[[Any], object] = ctx.dispatcher.ready
        self._job: tuple[Callable[[BaseException | None], None], None] | None = (self._run, None)
        self._wake: Callable[[BaseException], None] = partial(ctx.dispatcher.dispatch, self._run)

    def start(self) -> None:
        """Start serving; never blocks. The connection is read when its bytes arrive, on a
        worker of ``ctx.dispatcher``; ``ctx.connection_closed(self)`` is called once its socket
        is closed."""
        self._context = Context()
        self._context.run(self._bind_context)
        stream = self.stream
        self.ctx.streams.add(stream)
        if stream.buffered():
            # Adopted with a pipelined request's start: read on at once.
            self.ctx.dispatcher.submit(self._run, None)
        else:
            stream.wait_readable(self._ready, self._job, self._wake)

    def _bind_context(self) -> None:
        if self.ctx.get_real_ip:
            context.set_real_ip(self.peer)
        # Every line logged while serving the connection, the application's ``logging``
        # records included, names the peer.
        _PEER.set(self.peer)
        # Once per connection, not per request: the info is built only when a handler asks.
        context.set_request_info(self._request_info)

    def _run(self, interrupted: BaseException | None) -> None:
        """On a worker: serve what arrived, then wait again or close. Never raises Exception."""
        context = self._context
        if context is None:  # closed while its wake-up waited for the batch (a stop's cut-off)
            return
        getcurrent().gr_context = context
        ctx = self.ctx
        stream = self.stream
        try:
            if interrupted is None:
                # One message at a time, in order, until none is left whole: then wait again.
                received = stream.receive()
                if received is None:  # a spurious wake-up
                    stream.wait_readable(self._ready, self._job, self._wake)
                    return
                while received:
                    try:
                        buf, start, end = stream.read_message()
                    except ProtocolError as exc:
                        self._answer_refused(exc)
                        raise
                    # stream.buffered() as it is now, with no call: bytes behind the message
                    # (the handler does not read the stream).
                    more = end < len(buf)
                    # The request, handled here rather than in a method of its own (a Python
                    # call per request costs a few hundred instructions). Its size is without
                    # the 4-byte length of a framed message (added by _finish, for the access
                    # log only).
                    self._request_bytes = end - start
                    self._reply_bytes = 0
                    wire = stream.wire
                    assert wire is not None  # read_message detected it
                    if wire.header is None:  # an identity test: no truth test of a str
                        self._call(wire.protocol, buf, start, end)
                    else:
                        # A TTHeader or THeader request, here too: its metadata for the
                        # handler, then the call. (headers.parse_frame is this parser,
                        # wrapped.)
                        frame = _parse_frame(buf, start, end, ctx.max_frame_size)
                        if frame.transforms or self.trusted:
                            # zlib to undo, or a proxy's rip header to read: the long way.
                            self._serve_prepared(frame)
                        else:
                            self._frame = frame
                            # _bind_log_id(frame), inlined. Bound until a request changes it
                            # (see _unbind_request): a ContextVar set and reset per request
                            # cost ~2,000 instructions.
                            log_id = frame.log_id
                            if log_id is None:
                                if _LOG_ID.get() is not ...:
                                    _LOG_ID.set(...)
                            elif _LOG_ID.get() != log_id:
                                _LOG_ID.set(log_id)
                            try:
                                # The message in place, no memoryview of it made: it is in
                                # `buf` (frame.buffer) and ends where the frame does.
                                self._call(frame.codec_protocol, buf, frame.payload_start, end)
                            finally:
                                self._frame = self._info = None
                        del frame
                    # The request's bytes must not outlive it: an idle connection holds no
                    # buffer.
                    del buf
                    if ctx.request_budget:
                        ctx.spend_request()
                    if ctx.finishing:
                        if ctx.hand_off is not None:
                            if self._hand_off():
                                break
                            # No worker took it: served on here, offered again later.
                        elif not stream.has_input():
                            # Nothing more arrived: the FIN that follows tells the client a
                            # request it sends from now on was never seen.
                            break
                    if not more:
                        stream.wait_readable(self._ready, self._job, self._wake)
                        return
                # The peer closed the connection between messages, or the server stops.
            elif isinstance(interrupted, HandOver):
                # Idle with nothing unread: hand it over, or wait on to be offered again (the
                # stop does so until its deadline, which ends it if no worker takes it: the
                # replacement of a recycled worker may not be ready yet).
                if not self._hand_off():
                    stream.wait_readable(self._ready, self._job, self._wake)
                    return
            else:
                raise interrupted
        except GreenletExit:
            # Cut off at the end of a stop: nothing more to wait for.
            self._close(0.0)
            raise
        except Exception as exc:  # noqa: BLE001 - whatever a peer sends must not crash the server
            _unbind_request()  # what follows is about the connection, not its last request
            if isinstance(exc, CloseConnection):
                ctx.log.debug("connection closed", peer=self.peer, reason=exc.reason)
            elif isinstance(exc, ProtocolError):
                if ctx.metrics is not None:
                    ctx.metrics.protocol_error("malformed")
                ctx.log.debug(
                    "connection closed on bad input",
                    peer=self.peer,
                    wire=stream.wire.describe() if stream.wire else None,
                    error=describe(exc),
                )
            else:
                ctx.log.debug("connection closed", peer=self.peer, reason=_why_closed(exc))
        self._close(0.0 if self._handed else ctx.close_linger)

    def _close(self, linger: float) -> None:
        self.ctx.streams.discard(self.stream)
        # The context and the wake-up refer back to this connection: let go of them, so that
        # it is freed once closed rather than by the cyclic garbage collector.
        self._context = None
        self._job = None
        self._wake = _ignore_wake
        self.stream.close(linger, self._closed)

    def _closed(self) -> None:
        self.ctx.connection_closed(self)

    def cut_off(self) -> bool:
        """Close now if the connection waits (for a request, or for its peer's FIN after its
        own): the end of a stop's wait. One a worker serves is ended by ending the worker.

        Returns:
            Whether it was closed here.
        """
        stream = self.stream
        if stream.lingering:
            stream.cut_off()
            return True
        if stream.idle:
            self._close(0.0)
            return True
        return False

    def _request_info(self) -> RequestInfo:
        """What ``request_info()`` returns in this connection's greenlet: the info of the
        header frame being handled, built the first time it is asked for (a handler that never
        asks does not pay for splitting the metadata); an empty one otherwise."""
        info = self._info
        if info is None:
            frame = self._frame
            if frame is None:
                return RequestInfo()
            info = self._info = metadata.request_info(frame, self.stream.started_at)
        return info

    def _hand_off(self) -> bool:
        """At a message boundary: give the connection to another worker (True) or keep it;
        one no worker took (none live yet, or each refused) is offered again no sooner than
        :data:`HAND_OVER_RETRY` from now, until the stop's deadline ends it."""
        hand_off = self.ctx.hand_off
        if hand_off is None:
            return False
        _unbind_request()
        ctx = self.ctx
        ctx.handing_off += 1
        try:
            self._handed = hand_off(self)
        finally:
            ctx.handing_off -= 1
        if not self._handed:
            self.stream.offer_again_at = time.monotonic() + HAND_OVER_RETRY
        return self._handed

    def _serve_prepared(self, frame: HeaderFrame) -> None:
        """Serve a header request whose zlib payload must be inflated, or whose peer may tell
        the client's address (the request loop serves the others inline)."""
        prepared, inflated_size = self._prepare_frame(frame)
        if prepared is None:  # refused for memory, and answered
            return
        self._frame = prepared
        _bind_log_id(prepared.log_id)
        try:
            proto, buf = prepared.codec_protocol, prepared.buffer
            self._call(proto, buf, prepared.payload_start, prepared.payload_end, inflated_size)
        finally:
            if inflated_size:
                self.ctx.memory.release(inflated_size)
            self._frame = self._info = None

    def _prepare_frame(self, frame: HeaderFrame) -> tuple[HeaderFrame | None, int]:
        """A header frame's zlib payload inflated, and the client address a trusted proxy
        claims shown by ``real_ip()``; ``(None, 0)`` when the payload inflates past what the
        request may take (it was answered). Otherwise the frame to serve and the size of its
        inflated payload, held in the memory budget until the request is answered."""
        inflated_size = 0
        if frame.transforms:
            inflated_frame = self._inflate(frame)
            if inflated_frame is None:
                return None, 0
            frame = inflated_frame
            inflated_size = frame.payload_end - frame.payload_start
        if self.trusted and self.ctx.get_real_ip:
            # An untrusted peer is shown as itself, as _bind_context set it.
            shown = metadata.claimed_ip(frame) or self.peer
            if shown != self._shown_ip:
                context.set_real_ip(shown)
                self._shown_ip = shown
        return frame, inflated_size

    def _inflate(self, frame: HeaderFrame) -> HeaderFrame | None:
        """``frame`` with its zlib payload inflated, its size held in the memory budget; None
        when the payload inflates past what the message may take (the request is answered).

        What the payload may inflate to is reserved before inflating and the unused part given
        back after: a large payload inflates off the hub, and inflations in flight at once must
        not pass ``max_inflight_memory`` together.
        """
        ctx = self.ctx
        memory = ctx.memory
        reserved = memory.allowance()
        memory.hold(reserved)
        try:
            out = inflated(frame, ctx.max_frame_size, reserved)
        except MemoryBudgetExceeded as exc:
            memory.release(reserved)
            self._refuse_inflation(frame, exc)
            return None
        except BaseException:
            memory.release(reserved)
            raise
        memory.release(reserved - (out.payload_end - out.payload_start))
        return out

    def _refuse_inflation(self, frame: HeaderFrame, exc: MemoryBudgetExceeded) -> None:
        """Answer a request whose zlib payload inflates past what it may take, as one whose
        arguments would (PROTOCOL_ERROR naming max_message_memory, or LOADSHEDDING naming
        max_inflight_memory), reading its name and seqid from the payload's first bytes,
        inflated alone; re-raise ``exc`` (the connection closes) when they cannot be read."""
        try:
            head = zlib.decompressobj().decompress(frame.payload, _PEEK_SIZE)
            name, mtype, seqid, _ = _read_message_begin(frame.codec_protocol, head, 0, len(head))
        except (zlib.error, ProtocolError):
            raise exc from None
        method = self.ctx.methods.get(name)  # type: ignore[arg-type]
        if method is None or mtype not in _CALLS:
            raise exc
        self._frame = frame  # the answer goes back in the request's header frame
        try:
            self._too_costly(method, seqid, self.stream.started_at, 0, exc)
        finally:
            self._frame = None

    def _call(  # noqa: PLR0917 - per request: positional arguments cost least
        self,
        proto: int,
        buf: Any,
        start: int,
        end: int,
        inflated: int = 0,
        traced: bool = False,
    ) -> None:
        ctx = self.ctx
        name, mtype, seqid, pos = _read_message_begin(proto, buf, start, end)
        tracer = ctx.tracer
        if tracer is not None and not traced and tracer.provider() is not None:
            # Inside a span, this call again (``traced``): the untraced path pays one test
            # and no extra frame.
            self._traced_call(tracer, name, proto, buf, start, end, inflated)
            return
        # From the request's first byte: latency includes reading and decoding it.
        begun = self.stream.started_at
        method = ctx.methods.get(name)  # type: ignore[arg-type]
        if method is None or mtype not in _CALLS:
            self._refuse(name, mtype, seqid)
            return
        # The log context's method, from here on and until another request's: set only when it
        # changes (a set and a reset per request cost ~2,000 instructions, callgrind).
        if _METHOD.get() is not method.name:
            _METHOD.set(method.name)
        memory = ctx.memory
        lane = None
        try:
            if end - pos <= OFFLOAD_SIZE:
                # memory.allowance(inflated), inlined as hold and release are below: per
                # request, the three method calls cost ~1,200 instructions (cachegrind).
                allowance = memory.per_message - inflated
                left = memory.total - memory.held
                if left < allowance:  # noqa: PLR1730 - min() parses keywords: ~850 instructions
                    allowance = left
                args, cost = _read_args_within(
                    proto,
                    buf,
                    pos,
                    end,
                    method.args_spec,
                    allowance if allowance > 0 else 0,
                    0,
                )
            else:
                wait, until_deadline = self._wait_limit()
                decoded = ctx.decode_lane.read_args(
                    memory, inflated, wait, (proto, buf, pos, end, method.args_spec)
                )
                if decoded is None:
                    if until_deadline:
                        # The caller gave up while this request waited: its deadline, not
                        # the server's load, is why it is not served.
                        self._timed_out(method, seqid, begun)
                    else:
                        self._busy(method, seqid, begun, "its turn to decode did not come in time")
                    return
                args, cost = decoded
                del decoded  # the arguments' only holder must be `args` (see release below)
                lane = ctx.decode_lane
        except MemoryBudgetExceeded as exc:
            self._too_costly(method, seqid, begun, inflated, exc)
            return
        except Exception as exc:  # noqa: BLE001 - malformed arguments, in any way
            if ctx.metrics is not None:
                ctx.metrics.protocol_error("arguments")
            if self._span is not None:
                self._span.refused("bad_arguments", describe(exc))
            self._send_error(
                method.name,
                seqid,
                TApplicationException.PROTOCOL_ERROR,
                f"cannot decode {method.name} arguments: {exc}",
            )
            self._finish(method, begun, "protocol")
            raise CloseConnection(f"undecodable {method.name} arguments: {describe(exc)}") from None

        memory.held += cost  # memory.hold(cost); no yield until the try below
        try:
            limiter = ctx.limiter
            if limiter.limits_requests:
                refused = limiter.admit_request(method.name, begun)
                if refused is not None:
                    self._overloaded(method, seqid, refused, begun)
                    return

            # The handler, inlined (a Python call costs a few hundred instructions per
            # request); the rare outcomes are methods of their own: a deadline
            # (_call_within), an exception (_raised). The reply is _send_result's.
            # Read before the handler's try: what the caller's header says is no panic. The
            # setting first: off (the default), no request reads its frame here.
            deadline = None
            if ctx.enforce_rpc_timeout and (frame := self._frame) is not None:
                deadline = metadata.deadline(frame, begun)
            try:
                if deadline is None:
                    value = method.func(*args)
                else:
                    value = self._call_within(method, args, deadline)
            except Exception as exc:  # noqa: BLE001 - kite's onPanic: report, answer, serve on
                self._raised(method, seqid, begun, exc, proto)
                return
            if method.oneway or self._send_result(method, seqid, 0, value, proto):
                outcome = "ok"
            else:
                outcome = "internal"  # answered INTERNAL_ERROR: the result did not encode
            if ctx.access_log:
                self._finish(method, begun, outcome)
            elif method.stats is not None:  # _finish without an access log, inlined
                method.stats.observe(time.monotonic() - begun, outcome)
        finally:
            # The reply may hold the arguments (an echo does): it must not keep them alive
            # past their release.
            value = None
            # The arguments go first: what they held is free once the account says so.
            try:
                if cost > RELEASE_COST:
                    holder = [args]
                    del args
                    release(holder)  # yields between slices: may be interrupted
                else:
                    del args
            finally:
                memory.held -= cost  # memory.release(cost)
                if lane is not None:
                    lane.thaw()

    def _wait_limit(self) -> tuple[float, bool]:
        """How long a request may wait for its turn to decode: until the caller's deadline
        (True), or ``read_write_timeout`` (False)."""
        frame = self._frame
        deadline = metadata.deadline(frame, self.stream.started_at) if frame is not None else None
        if deadline is not None:
            return max(0.0, deadline - time.monotonic()), True
        return self.ctx.read_write_timeout, False

    def _too_costly(
        self, method: Method, seqid: int, begun: float, inflated: int, exc: MemoryBudgetExceeded
    ) -> None:
        """A request whose decoded arguments would take more memory than allowed: refused
        whole (its bytes were read; the connection stays usable)."""
        memory = self.ctx.memory
        if memory.limited_by_process(inflated):
            self._busy(method, seqid, begun, f"the requests in flight hold {memory.held} bytes")
            return
        self.ctx.log.debug(
            "request refused by max_message_memory", method=method.name, peer=self.peer
        )
        if self.ctx.metrics is not None:
            self.ctx.metrics.protocol_error("memory")
        if self._span is not None:
            self._span.refused("max_message_memory", str(exc))
        if not method.oneway:
            self._send_error(
                method.name,
                seqid,
                TApplicationException.PROTOCOL_ERROR,
                f"{method.name} arguments refused: {exc}; max_message_memory is "
                f"{memory.per_message} bytes",
            )
        self._finish(method, begun, "protocol")

    def _busy(self, method: Method, seqid: int, begun: float, why: str) -> None:
        """Refused for lack of memory or decode time in this process: an overload, retryable."""
        memory = self.ctx.memory
        self.ctx.log.debug("request refused by max_inflight_memory", method=method.name, why=why)
        if self.ctx.metrics is not None:
            self.ctx.metrics.overload("memory")
        if self._span is not None:
            self._span.refused("max_inflight_memory", why)
        if not method.oneway:
            self._send_error(
                method.name,
                seqid,
                LOADSHEDDING,
                f"{method.name} refused: server busy, {why} (max_inflight_memory is "
                f"{memory.total} bytes)",
            )
        self._finish(method, begun, "overload")

    def _call_within(self, method: Method, args: tuple[Any, ...], deadline: float) -> Any:
        """The handler's value, or :class:`_DeadlinePassed` once ``deadline`` (the caller's,
        from its RPC timeout) passes.

        The deadline covers the handler only, never the sending of its reply (cutting a send
        short would leave half a message on the wire). gevent interrupts a handler only where
        it yields (I/O, sleeps, locks): one computing without yielding runs on past the
        deadline and is answered when it returns.
        """
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise _DeadlinePassed
        timer = gevent.Timeout(remaining)
        timer.start()
        try:
            return method.func(*args)
        except gevent.Timeout as exc:
            if exc is not timer:
                raise
            raise _DeadlinePassed from None
        finally:
            # Before any answer goes out, error answers included: a timer firing in a send
            # would leave half a message on the wire and kill the connection.
            timer.close()

    def _raised(self, method: Method, seqid: int, begun: float, exc: Exception, proto: int) -> None:
        """Answer a handler that raised: a declared exception as its result field, a
        ``TApplicationException`` as itself, the caller's deadline passed as TIMEOUT, anything
        else as kite's ``onPanic`` does (reported, INTERNAL_ERROR). ``proto`` is the request's
        protocol."""
        if isinstance(exc, _DeadlinePassed):
            self._timed_out(method, seqid, begun)
        elif isinstance(exc, method.declared_types):
            if self._span is not None:
                self._span.declared(exc)
            # Without its traceback: the traceback holds the request's frame, which holds the
            # exception, a cycle that would keep the request's bytes and arguments alive until
            # the cyclic GC runs.
            value = exc.with_traceback(None)
            answered = method.oneway or self._send_result(
                method, seqid, method.declared_fid(value), value, proto
            )
            self._finish(method, begun, "declared" if answered else "internal")
        elif isinstance(exc, TApplicationException):
            if self._span is not None:
                self._span.failed(exc, describe(exc))
            if not method.oneway:
                self._send(method.name, _EXCEPTION, seqid, exc, _APP_EXC_SPEC)
            self._finish(method, begun, "application")
        else:
            self._panic(method, exc)
            if not method.oneway:
                self._send_error(
                    method.name,
                    seqid,
                    TApplicationException.INTERNAL_ERROR,
                    f"internal error in {method.name}: {type(exc).__name__}",
                )
            self._finish(method, begun, "internal")

    def _timed_out(self, method: Method, seqid: int, begun: float) -> None:
        waited = round((time.monotonic() - begun) * 1000)
        if self._span is not None:
            self._span.refused("deadline", f"passed the caller's RPC timeout ({waited} ms)")
        if not method.oneway:
            self._send_error(
                method.name,
                seqid,
                TIMEOUT,
                f"{method.name} passed the caller's RPC timeout ({waited} ms into the call)",
            )
        self._finish(method, begun, "timeout")

    def _answer_refused(self, exc: ProtocolError) -> None:
        """Tell the client why its message was refused, if its header could be read: a clear
        PROTOCOL_ERROR beats a connection that just closes."""
        wire = self.stream.wire
        if wire is None:
            return
        buf, start, end = self.stream.unread()
        try:
            name, mtype, seqid, _ = _read_message_begin(wire.protocol, buf, start, end)
        except ProtocolError:
            return
        if mtype != _CALL:
            return
        if isinstance(name, bytes):
            name = name.decode("utf-8", "backslashreplace")
        with contextlib.suppress(Exception):
            self._send_error(
                name, seqid, TApplicationException.PROTOCOL_ERROR, f"request refused: {exc}"
            )

    def _encode(self, name: str, mtype: int, seqid: int, payload: Any, spec: Any) -> bytes:
        """One whole message of ``payload``, a struct (an exception's answer): framed if the
        wire is, in the request's header frame if it had one; a large one encoded off the hub
        (see :func:`~kitegreen.rpc.budget.encode`, inlined here). A handler's result goes
        through :meth:`_send_result`."""
        frame = self._frame
        wire = self.stream.wire
        assert wire is not None
        proto = wire.protocol if frame is None else frame.codec_protocol
        framed = wire.message_framed
        try:
            message = _write_message(
                proto, name, mtype, seqid, payload, spec, framed, ENCODE_ON_HUB, 0
            )
        except EncodeBudgetExceeded:
            args = (proto, name, mtype, seqid, payload, spec, framed)
            message = encode_off_hub(_write_message, args)
        if frame is None:
            return message
        return self._in_frame(frame, message, mtype)

    def _in_frame(self, frame: HeaderFrame, message: bytes, mtype: int) -> bytes:
        """``message`` in a header frame answering ``frame``: with the response headers the
        handler set, ``crrst`` once a stop began, inside a framed frame if the request was."""
        headers = self._info.response_headers if self._info is not None else None
        if self.ctx.stop_announced and self.ctx.hand_off is None and frame.kind == "ttheader":
            # A connection handed over lives on: a Kitex client must keep reusing it.
            headers = {**(headers or {}), StrKey.CONNECTION_READY_TO_RESET: "1"}
        # TTHeader's reply carries the message type (Kitex's server writes it); THeader's not.
        reply = frame.answer(message, mtype, headers)
        wire = self.stream.wire
        if wire is not None and wire.nested:
            # A THeader frame inside a framed frame came in: one goes back.
            return _U32.pack(len(reply)) + reply
        return reply

    def _send(self, name: str, mtype: int, seqid: int, payload: Any, spec: Any) -> None:
        data = self._encode(name, mtype, seqid, payload, spec)
        self._reply_bytes += len(data)
        self.stream.send(data)

    def _send_result(self, method: Method, seqid: int, fid: int, value: Any, proto: int) -> bool:
        """Send the handler's answer in ``proto``, the request's protocol; False if it could
        not be encoded (INTERNAL_ERROR was sent instead)."""
        try:
            # The reply on a plain wire, or in the request's header frame; ``fid`` is the
            # result field that carries ``value`` (0: success, else a declared exception's).
            wire = self.stream.wire
            assert wire is not None
            framed = wire.message_framed
            try:
                data = _write_result(
                    proto,
                    method.name,
                    _REPLY,
                    seqid,
                    fid,
                    value,
                    method.result_spec,
                    framed,
                    ENCODE_ON_HUB,
                    0,
                )
            except EncodeBudgetExceeded:
                # More than ENCODE_ON_HUB values: encoded again, off the hub.
                name, spec = method.name, method.result_spec
                args = (proto, name, _REPLY, seqid, fid, value, spec, framed)
                data = encode_off_hub(_write_result, args)
            frame = self._frame
            if frame is not None:
                if self._info is None and not wire.nested and not self.ctx.stop_announced:
                    # _in_frame's common case, inlined (per request): no headers to carry.
                    data = frame.answer(data, _REPLY, None)
                else:
                    data = self._in_frame(frame, data, _REPLY)
        except Exception as exc:  # noqa: BLE001 - any encoding failure is the handler's bug
            # The handler returned something the IDL cannot encode, or set a response header
            # its header protocol cannot carry. Nothing reached the wire: the reply is built in
            # memory. The error goes without the headers, which may be what failed.
            self._panic(method, exc, stage="encoding its result")
            if self._info is not None:
                self._info.response_headers = {}
            self._send_error(
                method.name,
                seqid,
                TApplicationException.INTERNAL_ERROR,
                f"internal error in {method.name}: result does not match the IDL",
            )
            return False
        self._reply_bytes += len(data)
        self.stream.send(data)
        return True

    def _send_error(self, name: str, seqid: int, kind: int, message: str) -> None:
        self._send(name, _EXCEPTION, seqid, TApplicationException(kind, message), _APP_EXC_SPEC)

    def _refuse(self, name: str | bytes, mtype: int, seqid: int) -> None:
        """Answer an unknown method or a message that is not a call (its body was read whole)."""
        if isinstance(name, bytes):
            # The codec hands over a name that is not UTF-8 as bytes; echoing them back would
            # give strict clients a reply they cannot decode.
            name = name.decode("utf-8", "backslashreplace")
        if self._span is not None:
            unknown = mtype in (_CALL, _ONEWAY)
            self._span.refused(
                "unknown_method" if unknown else "not_a_call",
                f"unknown method {name!r}" if unknown else f"message type {mtype}",
            )
        metrics = self.ctx.metrics
        if mtype not in (_CALL, _ONEWAY):
            if metrics is not None:
                metrics.protocol_error("message_type")
            self.ctx.log.debug("not a call", method=name, message_type=mtype, peer=self.peer)
            self._send_error(
                name,
                seqid,
                TApplicationException.INVALID_MESSAGE_TYPE,
                f"expected a call, got message type {mtype}",
            )
            return
        if metrics is not None:
            metrics.unknown_method()
        self.ctx.log.debug("unknown method", method=name, peer=self.peer)
        if mtype == _CALL:
            self._send_error(
                name, seqid, TApplicationException.UNKNOWN_METHOD, f"unknown method {name!r}"
            )

    def _overloaded(self, method: Method, seqid: int, limit: str, begun: float) -> None:
        ctx = self.ctx
        if ctx.metrics is not None:
            ctx.metrics.overload(limit)
        limits = ctx.limiter.limits
        qps = limits.qps if limit == "qps" else limits.endpoint_qps.get(method.name)
        if self._span is not None:
            self._span.refused(limit, f"refused by the {limit} limit ({qps} QPS)")
        ctx.reports.report(
            QPS_OVERLOAD,
            f"{method.name} refused by the {limit} limit ({qps} QPS), peer {self.peer}",
        )
        if not method.oneway:
            self._send_error(
                method.name,
                seqid,
                LOADSHEDDING,
                f"QPS Overload: {method.name} refused by the {limit} limit",
            )
        self._finish(method, begun, "overload")

    def _panic(self, method: Method, exc: BaseException, stage: str = "") -> None:
        ctx = self.ctx
        if self._span is not None:
            self._span.failed(exc, f"{stage or 'calling the handler'}: {describe(exc)}")
        ctx.panics.panic(method.name, exc, peer=self.peer, stage=stage or "calling the handler")
        if ctx.metrics is not None:
            ctx.metrics.panicked()
        ctx.reports.report(PANIC, f"{method.name}: {describe(exc)}")

    def _traced_call(  # noqa: PLR0917 - per request: positional arguments cost least
        self,
        tracer: CallTracer,
        name: str | bytes,
        proto: int,
        buf: Any,
        start: int,
        end: int,
        inflated: int,
    ) -> None:
        """:meth:`_call` inside the call's span, current while it runs."""
        method = self.ctx.methods.get(name)  # type: ignore[arg-type]
        span = self._span = self._begin_span(tracer, name, method)
        try:
            self._call(proto, buf, start, end, inflated, True)
        except CloseConnection:
            raise
        except Exception as exc:  # a reply that could not be sent: the caller got nothing
            span.failed(exc, describe(exc))
            raise
        finally:
            self._span = None
            span.end()

    def _begin_span(self, tracer: CallTracer, name: str | bytes, method: Method | None) -> CallSpan:
        """Start the call's span (once the application has set a tracer provider)."""
        addresses = self._span_addresses
        if addresses is None:
            addresses = self._span_addresses = self._fixed_addresses()
        if self._shown_ip is not None:
            addresses = {**addresses, "client.address": self._shown_ip}
            if self._shown_ip == self.peer and "network.peer.port" in addresses:
                addresses["client.port"] = addresses["network.peer.port"]
        if isinstance(name, bytes):
            name = name.decode("utf-8", "backslashreplace")
        frame = self._frame
        # The metainfo is split out only for a traced call (a Kitex caller's trace context
        # rides in its transient keys); an untraced one leaves it to the handler that asks.
        info = None if frame is None else self._request_info()
        return tracer.begin(
            None if method is None else method.name,
            name,
            self.stream.started_at,
            headers=None if frame is None else frame.str_info,
            metainfo=() if info is None else (info.transit, info.persistent),
            addresses=addresses,
        )

    def _fixed_addresses(self) -> dict[str, Any]:
        """The span attributes that hold for every call on this connection."""
        addresses: dict[str, Any] = {}
        try:
            local = self.stream.raw.getsockname()
        except OSError:
            local = None
        if isinstance(local, tuple) and len(local) >= 2:
            addresses["server.address"] = peer_ip(local)
            addresses["server.port"] = local[1]
        elif local:
            addresses["server.address"] = str(local)
        if self.peer is not None:
            addresses["network.transport"] = "tcp"
            addresses["network.peer.address"] = self.peer
            addresses["network.peer.port"] = self.address[1]
        else:
            addresses["network.transport"] = "unix"
        return addresses

    def _finish(self, method: Method, begun: float, outcome: str) -> None:
        elapsed = time.monotonic() - begun
        if method.stats is not None:
            method.stats.observe(elapsed, outcome)
        if self.ctx.access_log:
            frame = self._frame
            log_id = frame.log_id if frame is not None else None
            # A framed message comes without its 4-byte length, and so does a THeader frame
            # nested in a framed one; a header frame comes with its own.
            wire = self.stream.wire
            framing = wire.length_skipped if wire is not None else 0
            # Seconds, as the duration histogram's buckets are (Prometheus's convention): a
            # threshold read off a dashboard filters the access log unchanged.
            self.ctx.log.info(
                "access",
                method=method.name,
                peer=self.peer,
                duration_s=round(elapsed, 6),
                request_bytes=self._request_bytes + framing,
                reply_bytes=self._reply_bytes,
                outcome=outcome,
                **({"log_id": log_id} if log_id else {}),
            )


def _why_closed(exc: BaseException) -> str:
    if isinstance(exc, IdleTimeout):
        return "idle_timeout"
    if isinstance(exc, TimeoutError):
        return "read_write_timeout"
    if isinstance(exc, StopServing):
        return "server stopping"
    if isinstance(exc, PeerClosed):
        return "truncated request"
    return describe(exc)
