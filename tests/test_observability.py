"""Observability: rate-limited reports, the event ring, the debug HTTP server, Prometheus
metrics, hub-block detection and the access log, against real servers on loopback.
"""

from __future__ import annotations

import http.client
import json
import socket
import sys
import time
import urllib.error
import urllib.request
from typing import Any

import gevent
import pytest
import structlog
from clients import apache_client, thriftpy2_client
from conftest import Handler, loopback_config, testsvc_thrift, wait_until
from prometheus_client.parser import text_string_to_metric_families
from structlog.testing import capture_logs
from thrift.Thrift import TApplicationException as ApacheAppError
from thriftpy2.thrift import TApplicationException
from trickle import Tricklers, probe_health

import kitegreen
from kitegreen.observability.debug import PROBE_WAIT
from kitegreen.observability.events import EventQueue
from kitegreen.observability.hubwatch import HubWatch
from kitegreen.observability.panics import PanicLog
from kitegreen.observability.reporter import ReportGate
from kitegreen.rpc.loop import LOADSHEDDING

pytestmark = pytest.mark.timeout(20)

TestService = testsvc_thrift.TestService

NO_REFILL = 600.0
"""A QPS fill interval no test lasts: the bucket keeps exactly the tokens it started with."""


# -- helpers ---------------------------------------------------------------------------------


class RecordingReporter:
    """A kitegreen.Reporter that keeps what it is given."""

    def __init__(self) -> None:
        self.reports: list[tuple[str, str, int]] = []

    def report(self, kind: str, message: str, suppressed: int) -> None:
        self.reports.append((kind, message, suppressed))


class BrokenReporter:
    """A kitegreen.Reporter whose destination is down."""

    def __init__(self) -> None:
        self.calls = 0

    def report(self, kind: str, message: str, suppressed: int) -> None:
        self.calls += 1
        raise ConnectionError("alerting system unreachable")


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of a Prometheus exposition, keyed by name and labels."""
    return {
        (s.name, frozenset(s.labels.items())): float(s.value)
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def metric(server: kitegreen.RpcServer, name: str, **labels: str) -> float | None:
    """One sample of the server's metrics, parsed from its exposition; None if absent."""
    assert server.metrics is not None
    return samples(server.metrics.exposition().decode()).get((name, frozenset(labels.items())))


def fetch(url: str, method: str = "GET") -> tuple[int, dict[str, str], bytes]:
    """An HTTP request: status, headers and body, whatever the status."""
    request = urllib.request.Request(url, method=method, data=b"x" if method == "POST" else None)
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as err:
        with err:
            return err.code, dict(err.headers), err.read()


def debug_url(server: kitegreen.RpcServer, path: str) -> str:
    assert server.debug_address is not None
    host, port = server.debug_address
    return f"http://{host}:{port}{path}"


def events_named(server: kitegreen.RpcServer, name: str) -> list[kitegreen.Event]:
    return [e for e in server.recent_events() if e.name == name]


def access_lines(logs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in logs if e["event"] == "access"]


def watchdog_threads(server: kitegreen.RpcServer) -> int:
    """Native threads running a HubWatch watchdog on behalf of ``server``."""
    code = HubWatch._watch.__code__
    count = 0
    for frame in sys._current_frames().values():
        f: Any = frame
        while f is not None:
            if f.f_code is code:
                if f.f_locals.get("self") is server.hub_watch:
                    count += 1
                break
            f = f.f_back
    return count


# -- reports ---------------------------------------------------------------------------------


class TestReports:
    def test_first_report_goes_out_and_repeats_are_held_back(self, make_server):
        """Within report_interval only the first report of a kind goes out."""
        server = make_server(report_interval=60.0)
        assert server.report("Disk Full", "first") is True
        assert server.report("Disk Full", "second") is False
        assert server.report("Disk Full", "third") is False
        reported = events_named(server, "Disk Full")
        assert [e.detail for e in reported] == ["first"]

    def test_kinds_are_independent(self, make_server):
        """A report of one kind does not hold back a report of another."""
        server = make_server(report_interval=60.0)
        assert server.report("Disk Full", "a") is True
        assert server.report("Cache Cold", "b") is True
        assert server.report("Disk Full", "c") is False
        assert server.report("Cache Cold", "d") is False

    def test_next_report_after_the_interval_says_how_many_were_suppressed(self):
        """The gate reopens after the interval and the report that goes out counts the rest."""
        clock, events, reporter = FakeClock(), EventQueue(50), RecordingReporter()
        gate = ReportGate(10.0, events, reporter, structlog.get_logger("test"), clock=clock)
        assert gate.report("Panic", "one") is True
        clock.now += 1
        assert gate.report("Panic", "two") is False
        clock.now += 8.9
        assert gate.report("Panic", "three") is False
        assert gate.report("Panic", "four") is False
        clock.now += 0.1
        assert gate.report("Panic", "five") is True
        assert reporter.reports == [("Panic", "one", 0), ("Panic", "five", 3)]
        newest = events.recent(1)[0]
        assert newest.name == "Panic"
        assert "five" in newest.detail
        assert "3" in newest.detail
        assert "suppressed" in newest.detail

    def test_count_starts_again_after_each_report(self):
        """A report after a quiet interval carries no suppressed count."""
        clock, events, reporter = FakeClock(), EventQueue(50), RecordingReporter()
        gate = ReportGate(10.0, events, reporter, structlog.get_logger("test"), clock=clock)
        gate.report("Panic", "one")
        gate.report("Panic", "held")
        clock.now += 10
        gate.report("Panic", "two")
        clock.now += 10
        assert gate.report("Panic", "three") is True
        assert reporter.reports[-1] == ("Panic", "three", 0)
        assert "suppressed" not in events.recent(1)[0].detail

    def test_suppressed_counts_are_per_kind(self):
        """Reports held back of one kind are not told with a report of another kind."""
        clock, events, reporter = FakeClock(), EventQueue(50), RecordingReporter()
        gate = ReportGate(10.0, events, reporter, structlog.get_logger("test"), clock=clock)
        gate.report("A", "a1")
        gate.report("A", "a2")
        gate.report("A", "a3")
        gate.report("B", "b1")
        clock.now += 10
        gate.report("B", "b2")
        gate.report("A", "a4")
        assert reporter.reports == [("A", "a1", 0), ("B", "b1", 0), ("B", "b2", 0), ("A", "a4", 2)]

    def test_report_is_logged_as_a_warning(self, make_server):
        """A report that goes out is a warning log line with its kind and message."""
        server = make_server(report_interval=60.0)
        with capture_logs() as logs:
            server.report("Disk Full", "90% used")
            server.report("Disk Full", "held back")
        warnings = [e for e in logs if e.get("kind") == "Disk Full"]
        assert len(warnings) == 1
        assert warnings[0]["log_level"] == "warning"
        assert warnings[0]["message"] == "90% used"

    def test_custom_reporter_receives_reports(self, handler):
        """A Reporter passed to RpcServer gets each report that goes out, with its count."""
        reporter = RecordingReporter()
        assert isinstance(reporter, kitegreen.Reporter)
        config = loopback_config(limit_qps=1, qps_fill_interval=NO_REFILL, report_interval=60.0)
        with kitegreen.RpcServer(TestService, handler, config, reporter=reporter) as server:
            assert server.report("Disk Full", "90% used") is True
            with thriftpy2_client(TestService, server.address) as c:
                assert c.echo("x") == "x"
                with pytest.raises(TApplicationException):
                    c.echo("shed")
        assert reporter.reports[0] == ("Disk Full", "90% used", 0)
        kinds = [kind for kind, _, _ in reporter.reports]
        assert kinds == ["Disk Full", "QPS Overload"]
        assert "echo" in reporter.reports[1][1]

    def test_failing_reporter_does_not_break_the_request_path(self, handler):
        """A reporter that raises is logged; the refusal still reaches the client as usual."""
        reporter = BrokenReporter()
        config = loopback_config(limit_qps=1, qps_fill_interval=NO_REFILL)
        with kitegreen.RpcServer(TestService, handler, config, reporter=reporter) as server:
            with apache_client(server.address) as c:
                assert c.echo("x") == "x"
                with pytest.raises(ApacheAppError) as info:
                    c.echo("shed")
                assert info.value.type == LOADSHEDDING
                with pytest.raises(ApacheAppError) as again:
                    c.echo("shed again")
                assert again.value.type == LOADSHEDDING
            assert reporter.calls == 1
            assert events_named(server, "QPS Overload")


# -- events ----------------------------------------------------------------------------------


class TestEvents:
    def test_push_event_returns_the_event(self, server):
        """push_event records name, detail and a wall-clock time."""
        event = server.push_event("Deploy", "v2")
        assert (event.name, event.detail) == ("Deploy", "v2")
        assert event.time > 1_000_000_000
        assert server.recent_events(1) == [event]

    def test_recent_events_are_newest_first(self, server):
        """recent_events() lists the newest event first; limit keeps the newest ones."""
        for i in range(3):
            server.push_event("Step", str(i))
        steps = events_named(server, "Step")
        assert [e.detail for e in steps] == ["2", "1", "0"]
        assert [e.detail for e in server.recent_events(2)] == ["2", "1"]

    def test_ring_drops_the_oldest(self, make_server):
        """Past event_capacity the oldest events fall off."""
        server = make_server(event_capacity=3)
        for i in range(5):
            server.push_event("Step", str(i))
        assert [(e.name, e.detail) for e in server.recent_events()] == [
            ("Step", "4"),
            ("Step", "3"),
            ("Step", "2"),
        ]

    def test_start_and_stop_are_events(self, handler):
        """Starting and stopping the server are events; start names the address."""
        server = kitegreen.RpcServer(TestService, handler, loopback_config())
        with server:
            start = server.recent_events(1)[0]
            assert start.name == "Server Start"
            host, port = server.address
            assert f"{host}:{port}" in start.detail
        assert server.recent_events(1)[0].name == "Server Stop"

    def test_panic_is_an_event(self, server):
        """A handler raising an undeclared exception records a "Panic" event naming the method."""
        with thriftpy2_client(TestService, server.address) as c:
            with pytest.raises(TApplicationException):
                c.raise_undeclared("boom")
            assert c.echo("after") == "after"
        panics = wait_until(lambda: events_named(server, "Panic"))
        assert len(panics) == 1
        assert "raise_undeclared" in panics[0].detail
        assert "RuntimeError" in panics[0].detail


class TestPanicLog:
    def test_tracebacks_are_rate_limited_but_every_panic_is_counted(self, server):
        """Ten panics in a row: the first three are logged with their traceback, the rest only
        counted (metrics count all ten), and the count is logged when the server stops."""
        with capture_logs() as logs, thriftpy2_client(TestService, server.address) as c:
            for _ in range(10):
                with pytest.raises(TApplicationException):
                    c.raise_undeclared("boom")
            server.stop()
        lines = [e for e in logs if e["event"] == "handler panic"]
        assert len(lines) == 3
        assert all(isinstance(e["exc_info"], RuntimeError) for e in lines)
        assert all(e["method"] == "raise_undeclared" for e in lines)
        [held] = [e for e in logs if e["event"] == "handler panics not logged"]
        assert (held["method"], held["suppressed"]) == ("raise_undeclared", 7)
        assert server.metrics is not None
        assert server.metrics.panics == 10

    def test_next_window_logs_again_with_the_count_held_back(self):
        """Once the interval has passed, tracebacks are logged again, and the first line says
        how many were held back."""
        now = [0.0]
        with capture_logs() as logs:
            panics = PanicLog(structlog.get_logger(), burst=2, interval=60.0, clock=lambda: now[0])
            for _ in range(5):
                panics.panic("m", RuntimeError("x"))
            now[0] = 61.0
            assert panics.panic("m", RuntimeError("y"))
            assert panics.panic("other", RuntimeError("z"))
        assert [e.get("suppressed") for e in logs] == [0, 0, 3, 0]
        assert [e["method"] for e in logs] == ["m", "m", "m", "other"]


# -- the debug server --------------------------------------------------------------------------


@pytest.fixture
def debug_server(make_server):
    """A started server with the debug server on an ephemeral loopback port."""
    return make_server(enable_debug_server=True, debug_port=0)


class TestDebugServer:
    def test_runtime_kite(self, debug_server):
        """/runtime/kite is JSON with overload, remote_configs, events and version."""
        status, headers, body = fetch(debug_url(debug_server, "/runtime/kite"))
        assert status == 200
        assert headers["Content-Type"].startswith("application/json")
        doc = json.loads(body)
        assert {"overload", "remote_configs", "events", "version"} <= doc.keys()
        assert doc["overload"]["conn_limit"] == debug_server.config.limit_connections
        assert doc["overload"]["qps_limit"] == debug_server.config.limit_qps
        assert doc["remote_configs"] == {}
        assert doc["version"]["kitegreen"] == kitegreen.__version__
        assert "Server Start" in [e["name"] for e in doc["events"]]

    def test_runtime_kite_shows_live_state(self, debug_server):
        """Open connections, changed limits and new events show on the next request."""
        debug_server.update_limits(limit_qps=77)
        debug_server.push_event("Deploy", "v2")
        with thriftpy2_client(TestService, debug_server.address) as c:
            assert c.echo("x") == "x"
            _, _, body = fetch(debug_url(debug_server, "/runtime/kite"))
        doc = json.loads(body)
        assert doc["overload"]["conn_now"] == 1
        assert doc["overload"]["qps_limit"] == 77
        newest = doc["events"][0]
        assert (newest["name"], newest["detail"]) == ("Deploy", "v2")

    def test_metrics(self, debug_server):
        """/metrics is Prometheus text with the server's request counters."""
        with thriftpy2_client(TestService, debug_server.address) as c:
            assert c.echo("x") == "x"
        status, headers, body = fetch(debug_url(debug_server, "/metrics"))
        assert status == 200
        assert headers["Content-Type"].startswith("text/plain")
        found = samples(body.decode())
        assert found[("kitegreen_requests_total", frozenset({("method", "echo")}))] == 1

    def test_greenlets(self, debug_server):
        """/debug/greenlets lists greenlet stacks, the warm request workers' among them."""
        with thriftpy2_client(TestService, debug_server.address) as c:
            assert c.echo("x") == "x"
            status, _, body = fetch(debug_url(debug_server, "/debug/greenlets"))
        assert status == 200
        text = body.decode()
        assert "Greenlet" in text
        assert "kitegreen/rpc/dispatch.py" in text

    def test_health_while_serving(self, debug_server):
        """/health answers 200 "ok" while the server serves."""
        status, _, body = fetch(debug_url(debug_server, "/health"))
        assert (status, body.strip()) == (200, b"ok")

    def test_health_while_stopping(self, debug_server, handler):
        """/health answers 503 while stop() drains requests in flight."""
        url = debug_url(debug_server, "/health")

        def slow_call() -> str:
            with thriftpy2_client(TestService, debug_server.address) as c:
                return str(c.slow(1.0, "done"))

        caller = gevent.spawn(slow_call)
        wait_until(lambda: handler.in_flight == 1)
        stopper = gevent.spawn(debug_server.stop)
        try:
            wait_until(lambda: fetch(url)[0] == 503)
            assert fetch(url)[2].strip() == b"stopping"
        finally:
            stopper.join(timeout=5)
            caller.join(timeout=5)
        assert caller.value == "done"

    def test_unknown_path_is_404(self, debug_server):
        """A path the debug server does not know is 404."""
        status, _, _ = fetch(debug_url(debug_server, "/no/such/page"))
        assert status == 404

    def test_post_is_405(self, debug_server):
        """The debug server answers GET only."""
        status, _, _ = fetch(debug_url(debug_server, "/runtime/kite"), method="POST")
        assert status == 405

    def test_port_taken_fails_the_start(self, make_server):
        """When the debug port is taken the start fails, as for the RPC port, naming the port
        and the way out; nothing is left listening."""
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as blocker:
            blocker.bind(("127.0.0.1", 0))
            blocker.listen(1)
            taken = blocker.getsockname()[1]
            server = kitegreen.RpcServer(
                TestService, Handler(), loopback_config(enable_debug_server=True, debug_port=taken)
            )
            with pytest.raises(kitegreen.ListenError, match=f"debug server: .*{taken}") as info:
                server.start()
            assert "debug_optional" in str(info.value)
            assert not server.started

    def test_port_taken_leaves_an_optional_debug_server_off(self, make_server):
        """With debug_optional the RPC server starts anyway and a warning is logged."""
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as blocker:
            blocker.bind(("127.0.0.1", 0))
            blocker.listen(1)
            taken = blocker.getsockname()[1]
            with capture_logs() as logs:
                server = make_server(
                    enable_debug_server=True, debug_port=taken, debug_optional=True
                )
            assert server.debug_address is None
            with thriftpy2_client(TestService, server.address) as c:
                assert c.echo("still served") == "still served"
        warnings = [e for e in logs if e["log_level"] == "warning"]
        assert len(warnings) == 1
        assert "debug server" in warnings[0]["event"]
        assert str(taken) in warnings[0]["error"]

    def test_off_by_request(self, server):
        """With enable_debug_server=False there is no debug address."""
        assert server.debug_address is None


class TestDebugServerLimits:
    """The debug server's connection cap and idle timeout: idle connections to the debug port
    cannot pile up and take the descriptors the RPC listener needs."""

    @staticmethod
    def idle_connection(server: kitegreen.RpcServer) -> socket.socket:
        assert server.debug_address is not None
        return socket.create_connection(server.debug_address, timeout=5.0)

    @staticmethod
    def closed_within(sock: socket.socket, seconds: float) -> bool:
        """Whether the server closes ``sock`` within ``seconds`` (EOF or reset)."""
        sock.settimeout(seconds)
        try:
            return sock.recv(1) == b""
        except TimeoutError:
            return False
        except ConnectionResetError:
            return True

    @staticmethod
    def health(server: kitegreen.RpcServer) -> int | None:
        """The /health status, or None when the connection is closed without an answer."""
        try:
            return fetch(debug_url(server, "/health"))[0]
        except (OSError, http.client.HTTPException):
            return None

    def test_connection_over_the_cap_is_closed_at_once(self, make_server):
        """With the cap reached, one more connection asking for a page is accepted and closed
        without an answer at once, and one that sends nothing within PROBE_WAIT, long before
        the idle timeout; the connections within the cap stay open."""
        server = make_server(
            enable_debug_server=True, debug_port=0, debug_max_connections=2, debug_idle_timeout=30
        )
        held = [self.idle_connection(server) for _ in range(2)]
        try:
            with self.idle_connection(server) as extra:
                extra.sendall(b"GET /runtime/kite HTTP/1.1\r\nHost: x\r\n\r\n")
                assert self.closed_within(extra, 1.0)
            with self.idle_connection(server) as extra:
                assert self.closed_within(extra, PROBE_WAIT + 2.0)
            for sock in held:
                assert not self.closed_within(sock, 0.1)
        finally:
            for sock in held:
                sock.close()

    def test_idle_connection_is_closed_after_the_timeout(self, make_server):
        """A connection that sends nothing is closed once debug_idle_timeout has passed."""
        server = make_server(enable_debug_server=True, debug_port=0, debug_idle_timeout=0.3)
        with self.idle_connection(server) as sock:
            started = time.monotonic()
            assert self.closed_within(sock, 5.0)
            assert time.monotonic() - started >= 0.25

    def test_half_sent_request_is_closed_quietly(self, make_server, capfd):
        """A request line without its headers' end is closed after the timeout, and no
        traceback is printed for it."""
        server = make_server(enable_debug_server=True, debug_port=0, debug_idle_timeout=0.3)
        with self.idle_connection(server) as sock:
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")
            assert self.closed_within(sock, 5.0)
        assert "Traceback" not in capfd.readouterr().err

    def test_health_answers_while_idle_connections_hold_every_slot(self, make_server):
        """Idle connections holding every slot make the debug pages fail fast, but not /health;
        once they time out the pages answer again without anyone closing them."""
        server = make_server(
            enable_debug_server=True, debug_port=0, debug_max_connections=2, debug_idle_timeout=1.0
        )
        held = [self.idle_connection(server) for _ in range(2)]
        try:
            assert self.page(server) is None
            assert probe_health(server.debug_address)[0] == 200
            wait_until(lambda: self.page(server) == 200, timeout=5.0)
            assert all(self.closed_within(sock, 2.0) for sock in held)
        finally:
            for sock in held:
                sock.close()

    @staticmethod
    def page(server: kitegreen.RpcServer) -> int | None:
        """The /runtime/kite status, or None when the connection is closed without an answer."""
        try:
            return fetch(debug_url(server, "/runtime/kite"))[0]
        except (OSError, http.client.HTTPException):
            return None

    def test_health_answers_within_1s_while_40_slow_clients_trickle(self, make_server):
        """40 clients trickling requests a byte a second (and reconnecting when cut off) hold
        every slot they can: the pages are refused, but a kubelet-style /health probe is
        answered 200 within 1 s every time."""
        server = make_server(enable_debug_server=True, debug_port=0)
        assert server.debug_address is not None
        with Tricklers(server.debug_address, count=40, interval=1.0) as slow:
            wait_until(lambda: slow.connects >= 40, timeout=5.0)
            wait_until(lambda: self.page(server) is None, timeout=5.0)
            probes = []
            for _ in range(10):
                probes.append(probe_health(server.debug_address, timeout=1.0))
                gevent.sleep(0.2)
            assert [status for status, _ in probes] == [200] * 10, probes
            assert slow.answered == 0

    def test_a_trickled_request_is_cut_off_at_the_request_timeout(self, make_server, capfd):
        """A client that sends a byte every 0.1 s never idles long enough for the idle timeout,
        but its request is cut off debug_request_timeout after its first byte, quietly."""
        server = make_server(
            enable_debug_server=True,
            debug_port=0,
            debug_idle_timeout=5.0,
            debug_request_timeout=0.5,
        )
        with self.idle_connection(server) as sock:
            sock.settimeout(0.1)
            started = time.monotonic()
            cut_after = None
            for _ in range(100):  # 10 s of trickling at most
                try:
                    sock.sendall(b"G")
                    if sock.recv(1) == b"":
                        cut_after = time.monotonic() - started
                        break
                except TimeoutError:
                    continue
                except OSError:
                    cut_after = time.monotonic() - started
                    break
            assert cut_after is not None, "never cut off"
            assert 0.4 <= cut_after < 3.0, cut_after
        assert "Traceback" not in capfd.readouterr().err

    def test_one_peer_cannot_take_every_slot(self, make_server):
        """At debug_max_connections_per_peer, one address's next connection is refused a page
        (a health probe is still answered), while another address is served; once its
        connections close, the address is served again."""
        server = make_server(
            enable_debug_server=True,
            debug_port=0,
            debug_max_connections=10,
            debug_max_connections_per_peer=2,
            debug_idle_timeout=30,
        )
        held = [self.idle_connection(server) for _ in range(2)]
        try:
            assert self.page(server) is None
            assert probe_health(server.debug_address)[0] == 200
            assert server.debug_address is not None
            with socket.create_connection(
                server.debug_address, timeout=5.0, source_address=("127.0.0.2", 0)
            ) as other:
                other.sendall(b"GET /runtime/kite HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                assert other.recv(64).startswith(b"HTTP/1.1 200")
            for sock in held:
                assert not self.closed_within(sock, 0.1)
            # Closed, they no longer count against their peer.
            for sock in held:
                sock.close()
            wait_until(lambda: self.page(server) == 200, timeout=5.0)
        finally:
            for sock in held:
                sock.close()


# -- metrics ---------------------------------------------------------------------------------


class TestMetrics:
    def test_requests_errors_panics_and_latency(self, server):
        """Counters match the calls made: requests, errors by kind, panics, latency count."""
        n, m, k = 4, 3, 2
        with thriftpy2_client(TestService, server.address) as c:
            for i in range(n):
                assert c.echo(str(i)) == str(i)
            for _ in range(m):
                with pytest.raises(TApplicationException):
                    c.raise_undeclared("boom")
            for _ in range(k):
                with pytest.raises(testsvc_thrift.Declared):
                    c.raise_declared("nope", 7)
        wait_until(lambda: metric(server, "kitegreen_requests_total", method="raise_declared") == k)
        assert metric(server, "kitegreen_requests_total", method="echo") == n
        assert metric(server, "kitegreen_requests_total", method="raise_undeclared") == m
        assert metric(server, "kitegreen_request_duration_seconds_count", method="echo") == n
        assert (
            metric(
                server, "kitegreen_request_errors_total", method="raise_undeclared", kind="internal"
            )
            == m
        )
        assert (
            metric(
                server, "kitegreen_request_errors_total", method="raise_declared", kind="declared"
            )
            == k
        )
        assert metric(server, "kitegreen_request_errors_total", method="echo", kind="internal") == 0
        assert metric(server, "kitegreen_panics_total") == m

    def test_latency_histogram_is_cumulative(self, server):
        """Every echo call falls in the +Inf bucket, and no bucket exceeds the one above it."""
        with apache_client(server.address) as c:
            for _ in range(5):
                assert c.echo("x") == "x"
        wait_until(
            lambda: metric(server, "kitegreen_request_duration_seconds_count", method="echo") == 5
        )
        assert server.metrics is not None
        family = next(
            f
            for f in text_string_to_metric_families(server.metrics.exposition().decode())
            if f.name == "kitegreen_request_duration_seconds"
        )
        buckets = [
            s.value
            for s in family.samples
            if s.name.endswith("_bucket") and s.labels["method"] == "echo"
        ]
        assert buckets == sorted(buckets)
        assert buckets[-1] == 5

    def test_connections_open_follows_the_clients(self, server):
        """kitegreen_connections_open rises with connections and falls when they close."""
        with thriftpy2_client(TestService, server.address) as a:
            assert a.echo("a") == "a"
            with (
                thriftpy2_client(TestService, server.address) as b,
                apache_client(server.address) as c,
            ):
                assert b.echo("b") == "b"
                assert c.echo("c") == "c"
                wait_until(lambda: metric(server, "kitegreen_connections_open", worker="0") == 3)
            wait_until(lambda: metric(server, "kitegreen_connections_open", worker="0") == 1)
        wait_until(lambda: metric(server, "kitegreen_connections_open", worker="0") == 0)
        assert metric(server, "kitegreen_connections_total") == 3

    def test_process_and_runtime_metrics_are_present(self, server):
        """Process, Python GC and greenlet figures are exported alongside the request metrics."""
        assert server.metrics is not None
        names = {
            s.name
            for f in text_string_to_metric_families(server.metrics.exposition().decode())
            for s in f.samples
        }
        assert {"process_resident_memory_bytes", "process_open_fds", "kitegreen_greenlets"} <= names
        assert any(name.startswith("python_gc_") for name in names)
        assert metric(server, "kitegreen_greenlets", worker="0") >= 1

    def test_two_servers_keep_separate_counts(self, make_server):
        """Each server counts only its own requests."""
        one, two = make_server(), make_server()
        with thriftpy2_client(TestService, one.address) as c:
            assert c.echo("x") == "x"
        wait_until(lambda: metric(one, "kitegreen_requests_total", method="echo") == 1)
        assert metric(two, "kitegreen_requests_total", method="echo") == 0


# -- hub blocking ------------------------------------------------------------------------------


class TestHubBlocking:
    def test_cpu_bound_handler_is_reported(self, make_server):
        """A handler spinning the CPU past the threshold is a "Hub Blocked" event naming it."""
        server = make_server(hub_block_threshold=0.1)
        wait_until(lambda: watchdog_threads(server) == 1)
        with thriftpy2_client(TestService, server.address) as c:
            c.block_hub(0.5)
            blocked = wait_until(lambda: events_named(server, "Hub Blocked"))
        assert "block_hub" in blocked[0].detail
        assert "service.py" in blocked[0].detail
        assert metric(server, "kitegreen_hub_blocked_total") >= 1

    def test_cooperative_sleep_is_not_reported(self, make_server, handler):
        """A handler that sleeps cooperatively while other requests run is not a block."""
        server = make_server(hub_block_threshold=0.1)

        def slow_call() -> str:
            with thriftpy2_client(TestService, server.address) as c:
                return str(c.slow(0.5, "done"))

        caller = gevent.spawn(slow_call)
        try:
            wait_until(lambda: handler.in_flight == 1)
            with apache_client(server.address) as c:
                served = 0
                while handler.in_flight:
                    assert c.echo("meanwhile") == "meanwhile"
                    served += 1
                # A round trip after the sleep lets any pending report reach the hub.
                assert c.echo("after") == "after"
        finally:
            caller.join(timeout=5)
        assert caller.value == "done"
        assert served >= 1
        assert events_named(server, "Hub Blocked") == []
        assert metric(server, "kitegreen_hub_blocked_total") == 0

    def test_threshold_zero_starts_nothing(self, make_server):
        """hub_block_threshold=0: no watchdog, and a blocking handler goes unreported."""
        server = make_server(hub_block_threshold=0)
        assert server.hub_watch is None
        assert watchdog_threads(server) == 0
        with thriftpy2_client(TestService, server.address) as c:
            c.block_hub(0.3)
            assert c.echo("after") == "after"
        assert events_named(server, "Hub Blocked") == []
        assert metric(server, "kitegreen_hub_blocked_total") == 0

    def test_stop_ends_the_watchdog(self, make_server):
        """stop() ends the watchdog thread."""
        server = make_server(hub_block_threshold=0.1)
        wait_until(lambda: watchdog_threads(server) == 1)
        server.stop()
        wait_until(lambda: watchdog_threads(server) == 0)


# -- access log ------------------------------------------------------------------------------


class TestAccessLog:
    def test_one_line_per_request(self, make_server):
        """access_log=True logs method, peer, duration_s, sizes and outcome for every request."""
        server = make_server(access_log=True)
        with capture_logs() as logs:
            with thriftpy2_client(TestService, server.address) as c:
                assert c.echo("x") == "x"
                assert c.add(1, 2) == 3
                with pytest.raises(testsvc_thrift.Declared):
                    c.raise_declared("nope", 1)
                with pytest.raises(TApplicationException):
                    c.raise_undeclared("boom")
            wait_until(lambda: len(access_lines(logs)) == 4)
        access = access_lines(logs)
        assert [(e["method"], e["outcome"]) for e in access] == [
            ("echo", "ok"),
            ("add", "ok"),
            ("raise_declared", "declared"),
            ("raise_undeclared", "internal"),
        ]
        for entry in access:
            assert entry["peer"] == "127.0.0.1"
            assert isinstance(entry["duration_s"], float)
            assert 0 <= entry["duration_s"] < 5.0
            assert entry["request_bytes"] > 0
            assert entry["reply_bytes"] > 0
            assert entry["log_level"] == "info"

    @pytest.mark.parametrize(
        ("transport", "framing"), [("buffered", 0), ("framed", 4)], ids=["buffered", "framed"]
    )
    def test_sizes_are_the_bytes_on_the_wire(self, make_server, transport, framing):
        """request_bytes and reply_bytes count the message as sent, frame length included.

        ``add(1, 2)`` in strict binary: a 15-byte message header (version, name "add", seqid),
        two i32 fields of 7 bytes and a stop byte make 30; the reply's header, one i32 field and
        a stop byte make 23.
        """
        server = make_server(access_log=True)
        with capture_logs() as logs:
            with thriftpy2_client(TestService, server.address, transport=transport) as c:
                assert c.add(1, 2) == 3
            assert wait_until(lambda: len(access_lines(logs)) == 1)
        (entry,) = access_lines(logs)
        assert (entry["request_bytes"], entry["reply_bytes"]) == (30 + framing, 23 + framing)

    def test_a_result_that_does_not_encode_is_internal(self, make_server, handler, monkeypatch):
        """A handler's result the IDL cannot encode is answered INTERNAL_ERROR, and counted
        and logged as "internal", not as the handler's "ok"."""
        monkeypatch.setattr(handler, "add", lambda a, b: "not an i32")
        server = make_server(access_log=True)
        with capture_logs() as logs, thriftpy2_client(TestService, server.address) as c:
            with pytest.raises(TApplicationException) as info:
                c.add(1, 2)
            assert info.value.type == TApplicationException.INTERNAL_ERROR
            assert c.echo("x") == "x"
            wait_until(lambda: len(access_lines(logs)) == 2)
        assert [(e["method"], e["outcome"]) for e in access_lines(logs)] == [
            ("add", "internal"),
            ("echo", "ok"),
        ]
        errors = metric(server, "kitegreen_request_errors_total", method="add", kind="internal")
        assert errors == 1

    def test_shed_request_is_logged_as_overload(self, make_server):
        """A request refused by a QPS limit has its access line, outcome "overload"."""
        server = make_server(access_log=True, limit_qps=1, qps_fill_interval=NO_REFILL)
        with capture_logs() as logs, thriftpy2_client(TestService, server.address) as c:
            assert c.echo("x") == "x"
            with pytest.raises(TApplicationException):
                c.echo("shed")
            wait_until(lambda: len(access_lines(logs)) == 2)
        assert [e["outcome"] for e in access_lines(logs)] == ["ok", "overload"]

    def test_off_by_default(self, server):
        """Without access_log no access lines are written."""
        with capture_logs() as logs, thriftpy2_client(TestService, server.address) as c:
            for _ in range(3):
                assert c.echo("x") == "x"
            assert c.add(1, 1) == 2
        wait_until(lambda: metric(server, "kitegreen_requests_total", method="add") == 1)
        assert access_lines(logs) == []
