"""A server span per call through the OpenTelemetry API, with the caller's context.

OpenTelemetry is optional (``pip install kitegreen[otel]``) and is imported only when
``Config.tracing`` is on and the engine is built: with tracing off, or without the package,
this module imports nothing of it and the request loop pays one ``is None`` test per call.

The application brings the SDK and its exporter, as with every OpenTelemetry instrumentation:
spans go to the *global* tracer provider. Until the application sets one, no span is started
and no header is read (the API's proxy provider is recognised on each call, so a provider set
after the server started, by each worker of ``--workers N`` for instance, is used from then on).

Names and attributes follow OpenTelemetry's RPC semantic conventions: the span is
``{rpc.service}/{rpc.method}``, kind SERVER, started at the request's first byte, with
``rpc.system`` ``apache_thrift``, ``rpc.service`` (the IDL service), ``rpc.method``,
``server.address``/``server.port`` (the accepting socket), ``client.address`` (what
:func:`~kitegreen.real_ip` reports) and ``network.peer.address``/``network.peer.port`` (the TCP
peer). A refused call (a QPS limit, the caller's deadline, an unknown method, undecodable
arguments) is a span too, with status ERROR and ``kitegreen.refused`` saying why.

The caller's context, first found wins:

1. the global propagator (``opentelemetry.propagate``; W3C trace context and baggage unless
   the application configured another) over every string header, keys lowercased;
2. W3C ``traceparent``/``tracestate``/``baggage``, whatever the global propagator is;
3. baseplate's THeader headers ``Trace``, ``Span``, ``Sampled``, ``Flags`` (decimal ids).

The string headers are THeader's headers or TTHeader's string key-values. Kitex's
obs-opentelemetry writes the W3C fields as metainfo (kitex-contrib/obs-opentelemetry
``tracing/middleware.go``: the propagator injects into a map that becomes transient metainfo,
``RPC_TRANSIT_traceparent`` on the wire); its server reads them back through
``metainfo.CGIVariableToHTTPHeader`` (lowercase, ``_`` to ``-``), and so does this module, for
transient and persistent metainfo alike.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Mapping
from typing import Any

_current_span: Callable[[], Any] | None = None
"""``opentelemetry.trace.get_current_span`` once a :class:`CallTracer` is made; None before,
so that :func:`add_trace_ids` costs one test while tracing is off."""

OTHER_METHOD = "_OTHER"
"""``rpc.method`` of a call to a method the IDL does not have (semantic conventions): a name
chosen by the client must not become a span name, or span names would be unbounded."""


def add_trace_ids(logger: Any, method: str, event: dict[str, Any]) -> dict[str, Any]:
    """structlog processor: ``trace_id`` and ``span_id`` (hex) of the current span, if any.

    Reads the current span only once tracing is on and OpenTelemetry imported, so a process
    without it pays a global lookup per line.
    """
    get = _current_span
    if get is None:
        return event
    span_context = get().get_span_context()
    if span_context.is_valid:
        event["trace_id"] = format(span_context.trace_id, "032x")
        event["span_id"] = format(span_context.span_id, "016x")
    return event


def load(rpc_service: str) -> CallTracer | None:
    """A :class:`CallTracer` for ``rpc_service``, or None when OpenTelemetry is not installed."""
    try:
        return CallTracer(rpc_service)
    except ImportError:
        return None


class CallTracer:
    """Starts each call's SERVER span on the global tracer provider (see the module doc)."""

    __slots__ = (
        "_baggage",
        "_context",
        "_extract",
        "_provider",
        "_proxy",
        "_service",
        "_trace",
        "_tracecontext",
        "_tracer",
        "_w3c_baggage",
        "provider",
    )

    def __init__(self, rpc_service: str) -> None:
        global _current_span
        from opentelemetry import baggage, context, propagate, trace
        from opentelemetry.baggage.propagation import W3CBaggagePropagator
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        self._service = rpc_service
        self._trace = trace
        self._context = context
        self._baggage = baggage
        self._extract = propagate.extract
        self._tracecontext = TraceContextTextMapPropagator()
        self._w3c_baggage = W3CBaggagePropagator()
        self._proxy = trace.ProxyTracerProvider
        self._provider: Any = None
        self._tracer: Any = None
        state = vars(trace)
        self.provider: Callable[[], Any] = (
            functools.partial(state.get, "_TRACER_PROVIDER")
            if "_TRACER_PROVIDER" in state
            else self._set_provider
        )
        """The tracer provider the application set, or None: no span is made and no header
        read until it sets one (:meth:`active`).

        ``get_tracer_provider()`` answers "none yet" only after looking the
        ``OTEL_PYTHON_TRACER_PROVIDER`` variable up in ``os.environ``, a raised and caught
        ``KeyError`` per request; the API module's global, which ``set_tracer_provider()``
        sets, says the same for one dictionary read, made here without a Python frame (the
        request loop calls this once per request: ~600 instructions less than a method doing
        ``getattr(module, name, default)``, under cachegrind). The provider is set once and
        never unset, so the answer is read, not cached. Where the API lacks that global (it is
        private), the public call and a type check answer."""
        # A provider named by OTEL_PYTHON_TRACER_PROVIDER is loaded by the first
        # get_tracer_provider(); after that active() sees it.
        trace.get_tracer_provider()
        _current_span = trace.get_current_span

    def active(self) -> bool:
        """Whether the application has set a tracer provider (see :attr:`provider`)."""
        return self.provider() is not None

    def _set_provider(self) -> Any:
        """:attr:`provider` through the public API."""
        provider = self._trace.get_tracer_provider()
        return None if isinstance(provider, self._proxy) else provider

    def begin(
        self,
        method: str | None,
        raw_name: str,
        begun: float,
        *,
        headers: Mapping[str, str] | None,
        metainfo: tuple[Mapping[str, str], ...],
        addresses: dict[str, Any],
    ) -> CallSpan:
        """Start the span of one call and make it current (once :meth:`active`).

        Args:
            method: the IDL method called, or None for a method the IDL does not have.
            raw_name: the name the message carried (recorded for an unknown method).
            begun: the request's first byte, on the ``time.monotonic()`` clock.
            headers: the request's string headers; None on plain Thrift.
            metainfo: Kitex metainfo maps (transient, persistent), prefixes removed.
            addresses: the ``server.*``, ``client.*`` and ``network.*`` attributes.
        """
        provider = self._trace.get_tracer_provider()
        if provider is not self._provider:
            from kitegreen._version import VERSION

            self._tracer = provider.get_tracer("kitegreen", VERSION)
            self._provider = provider
        parent = self._parent(headers, metainfo) if headers else None
        attributes = {
            "rpc.system": "apache_thrift",
            "rpc.service": self._service,
            "rpc.method": method or OTHER_METHOD,
            **addresses,
        }
        if method is None:
            attributes["rpc.method_original"] = raw_name
        now = time.monotonic()
        span = self._tracer.start_span(
            f"{self._service}/{method or OTHER_METHOD}",
            context=parent,
            kind=self._trace.SpanKind.SERVER,
            attributes=attributes,
            start_time=time.time_ns() - int((now - begun) * 1e9),
        )
        token = self._context.attach(self._trace.set_span_in_context(span, parent))
        return CallSpan(span, token, self)

    def _parent(self, headers: Mapping[str, str], metainfo: tuple[Mapping[str, str], ...]) -> Any:
        """The caller's context from the headers (see the module doc), or None."""
        carrier = {key.lower(): value for key, value in headers.items()}
        for values in metainfo:
            for key, value in values.items():
                carrier.setdefault(key.lower().replace("_", "-"), value)
        trace = self._trace
        ctx = self._extract(carrier)
        if not trace.get_current_span(ctx).get_span_context().is_valid:
            ctx = self._tracecontext.extract(carrier, ctx)
        if "baggage" in carrier and not self._baggage.get_all(ctx):
            ctx = self._w3c_baggage.extract(carrier, ctx)
        if not trace.get_current_span(ctx).get_span_context().is_valid:
            remote = baseplate_span_context(carrier, trace)
            if remote is not None:
                ctx = trace.set_span_in_context(trace.NonRecordingSpan(remote), ctx)
        return ctx


class CallSpan:
    """The span of one call in progress: what the request loop tells it, then its end."""

    __slots__ = ("_owner", "_token", "span")

    def __init__(self, span: Any, token: Any, owner: CallTracer) -> None:
        self.span = span
        self._token = token
        self._owner = owner

    def declared(self, exc: BaseException) -> None:
        """The handler raised an exception its IDL declares: an event, not an error."""
        self.span.record_exception(exc)

    def failed(self, exc: BaseException, description: str) -> None:
        """The call failed (an undeclared exception, an application error): status ERROR."""
        self.span.record_exception(exc)
        self.span.set_attribute("error.type", type(exc).__qualname__)
        self._error(description)

    def refused(self, reason: str, description: str) -> None:
        """The call was refused before or instead of its handler (``reason``: a short code)."""
        self.span.set_attribute("kitegreen.refused", reason)
        self.span.set_attribute("error.type", reason)
        self._error(description)

    def _error(self, description: str) -> None:
        trace = self._owner._trace
        self.span.set_status(trace.Status(trace.StatusCode.ERROR, description))

    def end(self) -> None:
        """Detach the span from this greenlet's context and end it."""
        self._owner._context.detach(self._token)
        self.span.end()


_U64 = 1 << 64


def baseplate_span_context(carrier: Mapping[str, str], trace: Any) -> Any:
    """A remote span context from baseplate's ``Trace``/``Span``/``Sampled``/``Flags``
    headers (keys lowercased), or None without a valid trace and span id.

    baseplate.py writes the ids as decimal 64-bit integers (``Parent`` is the caller's parent,
    not needed to continue the trace); ``Sampled`` is ``1`` when sampled, and bit 0 of
    ``Flags`` (Zipkin's debug flag) means sampled too.
    """
    trace_id = _decimal(carrier.get("trace"), 1 << 128)
    span_id = _decimal(carrier.get("span"), _U64)
    if not trace_id or not span_id:
        return None
    flags = _decimal(carrier.get("flags"), _U64) or 0
    sampled = carrier.get("sampled") == "1" or bool(flags & 1)
    return trace.SpanContext(
        trace_id=trace_id,
        span_id=span_id,
        is_remote=True,
        trace_flags=trace.TraceFlags(trace.TraceFlags.SAMPLED if sampled else 0),
    )


def _decimal(text: str | None, bound: int) -> int | None:
    """A decimal integer in [0, bound), or None for anything else."""
    if not text or len(text) > 40 or not text.isascii() or not text.isdigit():
        return None
    value = int(text)
    return value if value < bound else None
