"""OpenTelemetry: a server span per call, the caller's context from the headers, the span and
the request's context in the handler's greenlets, trace ids in the logs.

Spans reach the SDK's in-memory exporter through the global tracer provider, which this module
sets once (OpenTelemetry allows one per process). Calls come from Apache Thrift's THeader
client, from TTHeader frames built by the tests' own codec (as Kitex's obs-opentelemetry sends
them), and from a plain-wire thriftpy2 client.
"""

from __future__ import annotations

import io
import json
import logging
import socket
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gevent
import gevent.event
import pytest
import structlog
import ttheader
import wire
from clients import thriftpy2_client
from conftest import Handler, testsvc_thrift, wait_until
from launching import json_lines, launcher_env
from opentelemetry import baggage, trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from test_header_protocols import apache_header_client, read_frame, reply_value, tt_call
from test_workers import arbiter
from thrift.Thrift import TApplicationException as ApacheAppError
from thriftpy2.thrift import TApplicationException

import kitegreen

pytestmark = pytest.mark.timeout(30)

TRACE_ID = 0x4BF92F3577B34DA6A3CE929D0E0E4736
PARENT_ID = 0x00F067AA0BA902B7
TRACEPARENT = f"00-{TRACE_ID:032x}-{PARENT_ID:016x}-01"
TESTS = Path(__file__).parent


@pytest.fixture(scope="module")
def exporter() -> Iterator[InMemorySpanExporter]:
    """The in-memory exporter behind the global tracer provider (set once per process)."""
    exporter = InMemorySpanExporter()
    provider = trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider):
        provider = TracerProvider()
        trace.set_tracer_provider(provider)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield exporter
    # The provider stays (it cannot be unset): a shut exporter keeps no more spans.
    exporter.shutdown()


@pytest.fixture
def spans(exporter: InMemorySpanExporter) -> InMemorySpanExporter:
    exporter.clear()
    return exporter


class TracingHandler(Handler):
    """``echo("?trace")`` answers what the handler and a greenlet it spawns see: the current
    span, a child span's parent, ``real_ip()`` and ``request_info()``."""

    def __init__(self) -> None:
        super().__init__()
        self.release = gevent.event.Event()
        self.later: dict[str, Any] = {}

    def echo(self, message: str) -> str:
        if message == "?later":
            return json.dumps(self._spawn_for_later())
        if message != "?trace":
            return message
        tracer = trace.get_tracer("test-handler")
        with tracer.start_as_current_span("handler-work") as child:
            child_ids = ids(child)

        def in_spawned() -> dict[str, Any]:
            info = kitegreen.request_info()
            return {
                "span": ids(trace.get_current_span()),
                "real_ip": kitegreen.real_ip(),
                "header": info.header,
                "headers": dict(info.headers),
            }

        spawned = gevent.spawn(in_spawned).get(timeout=5)
        logging.getLogger("app.stdlib").warning("stdlib line in the handler")
        structlog.get_logger("app").warning("structlog line in the handler")
        return json.dumps(
            {
                "span": ids(trace.get_current_span()),
                "child": child_ids,
                "spawned": spawned,
                "baggage": dict(baggage.get_all()),
            }
        )

    def _spawn_for_later(self) -> list[str]:
        """Spawn a greenlet that reads the request's context only after the request ended."""

        def after_the_call() -> None:
            self.release.wait(5)
            self.later = {
                "span": ids(trace.get_current_span()),
                "real_ip": kitegreen.real_ip(),
                "header": kitegreen.request_info().header,
            }

        gevent.spawn(after_the_call)
        return ids(trace.get_current_span())


def ids(span: Any) -> list[str]:
    sc = span.get_span_context()
    return [format(sc.trace_id, "032x"), format(sc.span_id, "016x")]


@pytest.fixture
def make(make_server: Any) -> Any:
    """``make(**config)``: a server with a TracingHandler of its own."""
    return lambda **overrides: make_server(handler=TracingHandler(), **overrides)


def server_spans(exporter: InMemorySpanExporter) -> list[Any]:
    return [s for s in exporter.get_finished_spans() if s.kind is SpanKind.SERVER]


def one_server_span(exporter: InMemorySpanExporter) -> Any:
    wait_until(lambda: len(server_spans(exporter)) == 1)
    [span] = server_spans(exporter)
    return span


def assert_follows_handler(span: Any, exporter: InMemorySpanExporter, seen: dict[str, Any]):
    """The handler's current span is the server span; its own span is a child of it; the
    greenlet it spawned sees the same span."""
    server_ids = [format(span.context.trace_id, "032x"), format(span.context.span_id, "016x")]
    assert seen["span"] == server_ids
    assert seen["spawned"]["span"] == server_ids
    [child] = [s for s in exporter.get_finished_spans() if s.name == "handler-work"]
    assert child.parent.span_id == span.context.span_id
    assert child.context.trace_id == span.context.trace_id


class TestTHeader:
    def test_traceparent_continues_the_callers_trace(self, make, spans):
        """Apache's THeader client sends traceparent: the server span continues that trace
        under that parent, named and attributed by the RPC conventions, started at the
        request's first byte; the handler's span is its child; a spawned greenlet sees the
        span, real_ip() and request_info()."""
        server = make()
        with apache_header_client(server.address, "binary", False) as (client, proto):
            proto.trans.set_header(b"traceparent", TRACEPARENT.encode())
            proto.trans.set_header(b"tracestate", b"vendor=1")
            seen = json.loads(client.echo("?trace"))
            local_port = proto.trans._transport.handle.getsockname()[1]
        span = one_server_span(spans)
        assert span.name == "TestService/echo"
        assert span.kind is SpanKind.SERVER
        assert span.context.trace_id == TRACE_ID
        assert span.parent.span_id == PARENT_ID
        assert span.parent.is_remote
        assert span.context.trace_state.get("vendor") == "1"
        attrs = dict(span.attributes)
        assert attrs["rpc.system"] == "apache_thrift"
        assert attrs["rpc.service"] == "TestService"
        assert attrs["rpc.method"] == "echo"
        assert (attrs["server.address"], attrs["server.port"]) == server.address
        assert attrs["client.address"] == "127.0.0.1"
        assert attrs["client.port"] == local_port
        assert attrs["network.peer.address"] == "127.0.0.1"
        assert span.status.status_code is StatusCode.UNSET
        assert span.start_time <= span.end_time
        assert_follows_handler(span, spans, seen)
        assert seen["spawned"]["real_ip"] == "127.0.0.1"
        assert seen["spawned"]["header"] == "theader"
        assert seen["spawned"]["headers"]["traceparent"] == TRACEPARENT

    def test_spawned_greenlet_keeps_its_requests_context(self, make, spans):
        """A greenlet spawned by the handler that runs on after the call was answered still
        sees that call's span, real_ip() and request_info(): the context is copied at spawn."""
        server = make()
        with apache_header_client(server.address, "binary", False) as (client, proto):
            proto.trans.set_header(b"traceparent", TRACEPARENT.encode())
            in_handler = json.loads(client.echo("?later"))
            assert client.echo("another call") == "another call"
        server.handler.release.set()
        wait_until(lambda: server.handler.later)
        assert server.handler.later == {
            "span": in_handler,
            "real_ip": "127.0.0.1",
            "header": "theader",
        }
        assert in_handler[0] == f"{TRACE_ID:032x}"

    def test_baseplate_trace_headers(self, make, spans):
        """baseplate.py's Trace/Span/Sampled headers (decimal ids) continue its trace."""
        server = make()
        with apache_header_client(server.address, "compact", False) as (client, proto):
            proto.trans.set_header(b"Trace", b"1234567890123456789")
            proto.trans.set_header(b"Span", b"987654321")
            proto.trans.set_header(b"Parent", b"42")
            proto.trans.set_header(b"Sampled", b"1")
            seen = json.loads(client.echo("?trace"))
        span = one_server_span(spans)
        assert span.context.trace_id == 1234567890123456789
        assert span.parent.span_id == 987654321
        assert span.parent.trace_flags.sampled
        assert_follows_handler(span, spans, seen)

    def test_undeclared_exception_is_an_error_and_declared_one_an_event(self, make, spans):
        """An undeclared exception sets status ERROR with the exception recorded; a declared
        one is an exception event on a span whose status is not an error."""
        server = make()
        with apache_header_client(server.address, "binary", False) as (client, _):
            with pytest.raises(ApacheAppError):
                client.raise_undeclared("boom")
            from testsvc.ttypes import Declared

            with pytest.raises(Declared):
                client.raise_declared("no", 7)
        wait_until(lambda: len(server_spans(spans)) == 2)
        failed, declared = sorted(server_spans(spans), key=lambda s: s.start_time)
        assert failed.name == "TestService/raise_undeclared"
        assert failed.status.status_code is StatusCode.ERROR
        [event] = failed.events
        assert event.name == "exception"
        assert event.attributes["exception.message"] == "boom"
        assert declared.status.status_code is StatusCode.UNSET
        assert [e.name for e in declared.events] == ["exception"]
        assert declared.events[0].attributes["exception.type"].endswith("Declared")


class TestTTHeader:
    def test_kitex_metainfo_traceparent(self, make, spans):
        """Kitex's obs-opentelemetry sends the W3C fields as transient metainfo
        (``RPC_TRANSIT_traceparent``): the span continues that trace; the spawned greenlet sees
        the request's TTHeader info."""
        server = make()
        request = tt_call(
            "binary",
            str_kv={
                "RPC_TRANSIT_traceparent": TRACEPARENT,
                "RPC_PERSIST_baggage": "user=7",
            },
            message="?trace",
        )
        with socket.create_connection(server.address, timeout=5) as sock:
            sock.sendall(request)
            _, seen_text = reply_value(ttheader.decode(read_frame(sock)))
        seen = json.loads(seen_text)
        span = one_server_span(spans)
        assert span.name == "TestService/echo"
        assert span.context.trace_id == TRACE_ID
        assert span.parent.span_id == PARENT_ID
        assert_follows_handler(span, spans, seen)
        assert seen["spawned"]["header"] == "ttheader"
        assert seen["spawned"]["real_ip"] == "127.0.0.1"
        assert seen["baggage"] == {"user": "7"}


class TestRootsAndRefusals:
    def test_plain_wire_call_is_a_root_span(self, make, spans):
        """A call without header protocol starts a new trace."""
        server = make()
        with thriftpy2_client(testsvc_thrift.TestService, server.address) as client:
            seen = json.loads(client.echo("?trace"))
        span = one_server_span(spans)
        assert span.parent is None
        assert_follows_handler(span, spans, seen)

    def test_span_starts_at_the_requests_first_byte(self, make, spans):
        """A request whose bytes arrive over 0.3 s makes a span at least 0.3 s long: it starts
        at the first byte, as the latency metric does, not when the handler is called."""
        server = make()
        request = wire.encode("binary", "echo", 1, message="slowly")
        with socket.create_connection(server.address, timeout=5) as sock:
            sock.sendall(request[:5])
            gevent.sleep(0.3)  # the behaviour under test: a request that arrives slowly
            sock.sendall(request[5:])
            assert b"slowly" in sock.recv(1000)
        span = one_server_span(spans)
        assert span.end_time - span.start_time >= 300_000_000

    def test_refused_calls_are_error_spans(self, make, spans):
        """A call refused by a QPS limit, and one to an unknown method, are spans with status
        ERROR and ``kitegreen.refused`` saying why."""
        server = make(limit_qps=1)
        with thriftpy2_client(testsvc_thrift.TestService, server.address) as client:
            client.ping()
            errors = []
            for _ in range(50):
                try:
                    client.ping()
                except TApplicationException as exc:
                    errors.append(exc.message)
            assert errors
            assert all("QPS Overload" in e for e in errors)
        echo = wire.encode("binary", "echo", 1, message="x")
        request = echo.replace(b"\x00\x00\x00\x04echo", b"\x00\x00\x00\x0eno_such_method")
        with socket.create_connection(server.address, timeout=5) as sock:
            sock.sendall(request)
            assert b"unknown method" in sock.recv(1000)
        refused = lambda: {  # noqa: E731
            s.attributes.get("kitegreen.refused")
            for s in server_spans(spans)
            if s.status.status_code is StatusCode.ERROR
        }
        wait_until(lambda: {"qps", "unknown_method"} <= refused())
        [unknown] = [s for s in server_spans(spans) if s.attributes["rpc.method"] == "_OTHER"]
        assert unknown.attributes["rpc.method_original"] == "no_such_method"

    def test_call_past_its_deadline_is_an_error_span(self, make, spans):
        """With enforce_rpc_timeout, a call cut off at the caller's deadline is an ERROR span
        with ``kitegreen.refused`` ``deadline``."""
        server = make(enforce_rpc_timeout=True)
        with apache_header_client(server.address, "binary", False) as (client, proto):
            proto.trans.set_header(b"client_timeout", b"50")
            with pytest.raises(ApacheAppError):
                client.slow(5.0, "late")
        span = one_server_span(spans)
        assert span.name == "TestService/slow"
        assert span.status.status_code is StatusCode.ERROR
        assert span.attributes["kitegreen.refused"] == "deadline"


class TestLogs:
    @pytest.fixture
    def stream(self, json_log_stream: io.StringIO) -> io.StringIO:
        return json_log_stream

    def test_access_log_and_handler_logs_carry_the_trace(self, make, spans, stream):
        """Lines logged while a traced call runs, the access log and the handler's stdlib
        ``logging`` records included, carry its trace_id and span_id (hex)."""
        server = make(access_log=True)
        with apache_header_client(server.address, "binary", False) as (client, proto):
            proto.trans.set_header(b"traceparent", TRACEPARENT.encode())
            json.loads(client.echo("?trace"))
        span = one_server_span(spans)
        wait_until(lambda: '"access"' in stream.getvalue())
        lines = {e["event"]: e for e in json_lines(stream.getvalue().splitlines())}
        for event in ("access", "stdlib line in the handler", "structlog line in the handler"):
            assert lines[event]["trace_id"] == f"{TRACE_ID:032x}", event
            assert lines[event]["span_id"] == format(span.context.span_id, "016x"), event
        assert "trace_id" not in lines["listening"]


@pytest.mark.slow
def test_workers_spans_reach_the_exporter(tmp_path):
    """With --workers 2, the application installs an SDK provider in each worker (at the
    import of its target, after the fork); the spans of both workers reach its exporter."""
    target = tmp_path / "traced_target.py"
    target.write_text(
        textwrap.dedent(
            f"""
            import json, os
            from opentelemetry import baggage, trace
            from opentelemetry.sdk.trace import TracerProvider
            from opentelemetry.sdk.trace.export import (
                SimpleSpanProcessor, SpanExporter, SpanExportResult,
            )

            class FileExporter(SpanExporter):
                def export(self, spans):
                    path = os.path.join({str(tmp_path)!r}, f"spans-{{os.getpid()}}.jsonl")
                    with open(path, "a") as f:
                        for s in spans:
                            f.write(json.dumps({{"name": s.name}}) + "\\n")
                    return SpanExportResult.SUCCESS

            provider = TracerProvider()
            provider.add_span_processor(SimpleSpanProcessor(FileExporter()))
            trace.set_tracer_provider(provider)

            from workers_target import server
            """
        )
    )
    env = launcher_env(PYTHONPATH=f"{TESTS}:{tmp_path}", PYTHONDONTWRITEBYTECODE="1")

    def files() -> list[Path]:
        return sorted(tmp_path.glob("spans-*.jsonl"))

    with arbiter(env=env, target="traced_target:server") as instance:
        address = instance.launcher.address()
        for _ in range(400):
            if len(files()) == 2:
                break
            # A fresh connection each time: the kernel spreads them over the workers.
            with thriftpy2_client(testsvc_thrift.TestService, address) as client:
                client.ping()
        assert len(files()) == 2, instance.launcher.output()[-3000:]
    for path in files():
        names = {json.loads(line)["name"] for line in path.read_text().splitlines()}
        assert names == {"TestService/ping"}


@pytest.mark.slow
def test_tracing_off_imports_no_opentelemetry():
    """With tracing off, a started server answers calls without importing OpenTelemetry."""
    script = textwrap.dedent(
        f"""
        import sys
        sys.path.insert(0, {str(TESTS)!r})
        from gevent import monkey; monkey.patch_all()
        import kitegreen
        from service import Handler, testsvc_thrift
        from clients import thriftpy2_client
        config = kitegreen.Config(host="127.0.0.1", port=0, enable_debug_server=False,
                                  tracing=False)
        server = kitegreen.RpcServer(testsvc_thrift.TestService, Handler(), config)
        server.start()
        with thriftpy2_client(testsvc_thrift.TestService, server.address) as c:
            assert c.echo("x") == "x"
        server.stop(timeout=2)
        print(sorted(m for m in sys.modules if m.startswith("opentelemetry")))
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=20, check=True
    )
    assert out.stdout.splitlines()[-1] == "[]", out.stderr


def test_the_provider_is_the_same_through_the_public_api(exporter):
    """CallTracer.provider reads the API's global directly; where the API keeps no such
    global it asks get_tracer_provider(): both give the provider the application set."""
    from kitegreen.observability.tracing import CallTracer

    tracer = CallTracer("svc")
    provider = trace.get_tracer_provider()
    assert isinstance(provider, TracerProvider)
    assert tracer.provider() is provider
    tracer.provider = tracer._set_provider
    assert tracer.provider() is provider
    assert tracer.active()
