"""One client connection: protocol detection, the request loop, timeouts and panics.

kite's ``processRequests`` and ``onPanic``. The loop runs in the connection's own pooled
greenlet; the handler is called in that greenlet, so ``real_ip()`` sees this connection's peer.
Everything the loop needs is resolved once in :class:`ConnectionContext`, so a request costs a
dict lookup, a decode, the handler, an encode and (usually) one ``send``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import gevent
from thriftpy2.thrift import TApplicationException, TMessageType, TType
from thriftpy2.transport import TTransportException

from kitegreen import context
from kitegreen.exceptions import ProtocolError
from kitegreen.limiter import Limiter
from kitegreen.metrics import Metrics
from kitegreen.processor import Method
from kitegreen.protocol import (
    BUFFER_SIZE,
    IdleTimeout,
    ReplyEncoder,
    SocketReader,
    Wire,
    detect,
    is_disconnect,
    make_input_protocol,
)
from kitegreen.reporter import PANIC, QPS_OVERLOAD, ReportGate

LOADSHEDDING = 11
"""``TApplicationException`` type for a request refused by a QPS limit: fbthrift's
``LOADSHEDDING``, so clients can tell an overload from a crash (``INTERNAL_ERROR``, 6)."""

_CALL = TMessageType.CALL
_ONEWAY = TMessageType.ONEWAY
_REPLY = TMessageType.REPLY
_EXCEPTION = TMessageType.EXCEPTION


class CloseConnection(Exception):
    """End the request loop; ``reason`` goes to the debug log."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(slots=True)
class ConnectionContext:
    """What every connection of one server shares, resolved at start."""

    methods: dict[str, Method]
    limiter: Limiter
    reports: ReportGate
    metrics: Metrics | None
    log: Any
    read_write_timeout: float
    max_frame_size: int
    get_real_ip: bool
    access_log: bool
    encoder: ReplyEncoder = field(default_factory=ReplyEncoder)
    """Encodes every reply of the server (see ReplyEncoder)."""
    stopping: bool = False
    """Set by ``RpcServer.stop()``: finish the request at hand, then close."""
    active: set[Connection] = field(default_factory=set)


def peer_ip(address: Any) -> str | None:
    """The client IP from an accept() address; None on a Unix socket."""
    if not isinstance(address, tuple) or not address:
        return None
    ip = str(address[0])
    # A dual-stack listener reports IPv4 clients as ::ffff:a.b.c.d; users want a.b.c.d.
    return ip[7:] if ip.startswith("::ffff:") and "." in ip else ip


class Connection:
    """Serve Thrift requests on one accepted socket until it closes or the server stops."""

    __slots__ = ("ctx", "greenlet", "iprot", "peer", "reader", "wire")

    def __init__(self, sock: Any, address: Any, ctx: ConnectionContext, greenlet: Any) -> None:
        self.ctx = ctx
        self.peer = peer_ip(address)
        self.greenlet = greenlet
        self.wire: Wire | None = None
        self.iprot: Any = None
        self.reader = SocketReader(
            sock,
            rw_timeout=ctx.read_write_timeout,
            max_frame_size=ctx.max_frame_size,
        )

    @property
    def idle(self) -> bool:
        """Waiting for a request to start: safe to close without losing work."""
        return self.reader.idle

    def serve(self) -> None:
        """Run the request loop; return when the connection is done. Never raises Exception."""
        ctx = self.ctx
        if ctx.get_real_ip:
            context.set_real_ip(self.peer)
        try:
            self._detect()
            self._loop()
        except Exception as exc:  # noqa: BLE001 - whatever a peer sends must not crash the server
            if isinstance(exc, CloseConnection):
                ctx.log.debug("connection closed", peer=self.peer, reason=exc.reason)
            elif isinstance(exc, TTransportException) or is_disconnect(exc):
                reason = _why_closed(exc, self.reader)
                ctx.log.debug("connection closed", peer=self.peer, reason=reason)
            else:
                ctx.log.debug(
                    "connection closed on bad input",
                    peer=self.peer,
                    wire=self.wire.describe() if self.wire else None,
                    error=f"{type(exc).__name__}: {exc}",
                )
        finally:
            self.reader.close()

    def _detect(self) -> None:
        reader = self.reader
        reader.start_request()
        head = b""
        while True:
            # BUFFER_SIZE, not more: read() takes a larger request for a length field and checks
            # it against max_frame_size, which may be as small as 1 KiB.
            chunk = reader.read(BUFFER_SIZE)
            if not chunk:
                raise CloseConnection("closed by peer before sending a request")
            head += chunk
            wire = detect(head)
            if wire is not None:
                break
        reader.pending = head
        reader.framed = wire.framed
        self.wire = wire
        self.iprot = make_input_protocol(wire, reader)

    def _loop(self) -> None:
        ctx = self.ctx
        iprot = self.iprot
        reader = self.reader
        methods = ctx.methods
        limiter = ctx.limiter
        limits_on = limiter.enabled
        metrics_on = ctx.metrics is not None
        access_log = ctx.access_log
        clock = time.monotonic

        while not ctx.stopping:
            reader.start_request()
            name, mtype, seqid = iprot.read_message_begin()
            start = clock()
            method = methods.get(name)
            if method is None or mtype not in (_CALL, _ONEWAY):
                self._refuse(name, mtype, seqid)
                continue
            args = method.args_cls()
            try:
                iprot.read_struct(args)
            except Exception as exc:
                if is_disconnect(exc) or isinstance(exc, TTransportException):
                    raise
                self._send_error(
                    name,
                    seqid,
                    TApplicationException.PROTOCOL_ERROR,
                    f"cannot decode {name} arguments: {type(exc).__name__}",
                )
                self._finish(method, start, "protocol")
                raise CloseConnection(f"undecodable {name} arguments: {exc!r}") from None

            if limits_on:
                refused = limiter.admit_request(name, start)
                if refused is not None:
                    self._overloaded(method, seqid, refused, start)
                    continue

            result = method.result_cls()
            outcome = "ok"
            try:
                result.success = method.call(args)
            except method.declared_types as exc:
                setattr(result, method.declared_field(exc) or "success", exc)
                outcome = "declared"
            except TApplicationException as exc:
                if not method.oneway:
                    self._send(name, _EXCEPTION, seqid, exc)
                self._finish(method, start, "application")
                continue
            except Exception as exc:  # noqa: BLE001 - kite's onPanic: report, answer, keep serving
                self._panic(method, exc)
                if not method.oneway:
                    self._send_error(
                        name,
                        seqid,
                        TApplicationException.INTERNAL_ERROR,
                        f"internal error in {name}: {type(exc).__name__}",
                    )
                self._finish(method, start, "internal")
                continue

            if not method.oneway:
                self._send_result(method, seqid, result)
            if metrics_on or access_log:
                self._finish(method, start, outcome)

    def _send(self, name: str, mtype: int, seqid: int, payload: Any) -> None:
        assert self.wire is not None
        self.reader.send(self.ctx.encoder.encode(self.wire, name, mtype, seqid, payload))

    def _send_result(self, method: Method, seqid: int, result: Any) -> None:
        assert self.wire is not None
        try:
            data = self.ctx.encoder.encode(self.wire, method.name, _REPLY, seqid, result)
        except Exception as exc:  # noqa: BLE001 - any encoding failure is the handler's bug
            # The handler returned something the IDL cannot encode. Nothing reached the wire:
            # the reply was being built in memory.
            self._panic(method, exc, stage="encoding its result")
            self._send_error(
                method.name,
                seqid,
                TApplicationException.INTERNAL_ERROR,
                f"internal error in {method.name}: result does not match the IDL",
            )
            return
        self.reader.send(data)

    def _send_error(self, name: str, seqid: int, kind: int, message: str) -> None:
        self._send(name, _EXCEPTION, seqid, TApplicationException(kind, message))

    def _refuse(self, name: str | bytes, mtype: int, seqid: int) -> None:
        """Answer an unknown method or a message that is not a call, and skip its body."""
        if isinstance(name, bytes):
            # thriftpy2 hands over a name that is not UTF-8 as bytes; echoing them back would
            # give strict clients a reply they cannot decode.
            name = name.decode("utf-8", "backslashreplace")
        self.iprot.skip(TType.STRUCT)
        if mtype not in (_CALL, _ONEWAY):
            self.ctx.log.debug("not a call", method=name, message_type=mtype, peer=self.peer)
            self._send_error(
                name,
                seqid,
                TApplicationException.INVALID_MESSAGE_TYPE,
                f"expected a call, got message type {mtype}",
            )
            return
        self.ctx.log.debug("unknown method", method=name, peer=self.peer)
        if mtype == _CALL:
            self._send_error(
                name, seqid, TApplicationException.UNKNOWN_METHOD, f"unknown method {name!r}"
            )

    def _overloaded(self, method: Method, seqid: int, limit: str, start: float) -> None:
        ctx = self.ctx
        if ctx.metrics is not None:
            ctx.metrics.overload(limit)
        limits = ctx.limiter.limits
        qps = limits.qps if limit == "qps" else limits.endpoint_qps.get(method.name)
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
        self._finish(method, start, "overload")

    def _panic(self, method: Method, exc: BaseException, stage: str = "") -> None:
        ctx = self.ctx
        ctx.log.error(
            "handler panic",
            method=method.name,
            peer=self.peer,
            stage=stage or "calling the handler",
            error=f"{type(exc).__name__}: {exc}",
            exc_info=exc,
        )
        if ctx.metrics is not None:
            ctx.metrics.panics += 1
        ctx.reports.report(PANIC, f"{method.name}: {type(exc).__name__}: {exc}")

    def _finish(self, method: Method, start: float, outcome: str) -> None:
        elapsed = time.monotonic() - start
        if method.stats is not None:
            method.stats.observe(elapsed, outcome)
        if self.ctx.access_log:
            self.ctx.log.info(
                "access",
                method=method.name,
                peer=self.peer,
                latency_ms=round(elapsed * 1000, 3),
                outcome=outcome,
            )


def _why_closed(exc: BaseException, reader: SocketReader) -> str:
    mid_request = reader.deadline is not None
    if isinstance(exc, TimeoutError):
        return "read_write_timeout" if mid_request else "idle_timeout"
    if isinstance(exc, TTransportException):
        return "truncated request" if mid_request else "closed by peer"
    if isinstance(exc, ProtocolError):
        return str(exc)
    return f"{type(exc).__name__}: {exc}"


class IdleSweeper:
    """Closes connections that have waited longer than ``idle_timeout`` for their next request.

    One greenlet checks every connection a few times per timeout, instead of a gevent timer
    armed and disarmed around every single wait on the request path.

    Args:
        ctx: the connections to watch.
        idle_timeout: seconds a connection may wait between requests (> 0).
        clock: monotonic clock, injectable for tests.
    """

    def __init__(
        self,
        ctx: ConnectionContext,
        idle_timeout: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._ctx = ctx
        self.idle_timeout = idle_timeout
        self.interval = min(max(idle_timeout / 4, 0.05), 1.0)
        self._clock = clock
        self._greenlet: gevent.Greenlet | None = None

    def start(self) -> None:
        """Start sweeping; idempotent."""
        if self._greenlet is None:
            self._greenlet = gevent.spawn(self._run)

    def stop(self) -> None:
        """Stop sweeping; idempotent."""
        greenlet, self._greenlet = self._greenlet, None
        if greenlet is not None:
            greenlet.kill(block=False)

    def _run(self) -> None:
        while True:
            gevent.sleep(self.interval)
            self.sweep()

    def sweep(self) -> int:
        """Close every connection idle past the timeout now; return how many."""
        now = self._clock()
        closed = 0
        for conn in list(self._ctx.active):
            reader = conn.reader
            if reader.idle and now - reader.idle_since > self.idle_timeout:
                conn.greenlet.kill(IdleTimeout("idle_timeout"), block=False)
                closed += 1
        return closed
