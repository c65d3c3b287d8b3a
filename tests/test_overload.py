"""Overload protection: the connection limit, QPS limits, run-time limit changes and
service-mesh mode, against real servers on loopback with thriftpy2's and Apache Thrift's clients.

QPS tests that must give exact counts use a fill interval far longer than any test
(``NO_REFILL``), so the bucket holds exactly its initial tokens and no count depends on how fast
the machine is. Tests that use a real refill rate assert only bounds.
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from clients import apache_client, thriftpy2_client
from conftest import testsvc_thrift, wait_until
from prometheus_client.parser import text_string_to_metric_families
from structlog.testing import capture_logs
from thrift.Thrift import TApplicationException as ApacheAppError
from thrift.transport.TTransport import TTransportException as ApacheTransportError
from thriftpy2.thrift import TApplicationException
from thriftpy2.transport import TTransportException

import kitegreen
from kitegreen.limiter import Limiter, Limits
from kitegreen.rpc.loop import LOADSHEDDING

pytestmark = pytest.mark.timeout(20)

TestService = testsvc_thrift.TestService

NO_REFILL = 600.0
"""A QPS fill interval no test lasts: the bucket keeps exactly the tokens it started with."""

CLIENTS = ["thriftpy2", "apache"]
APP_ERRORS = (TApplicationException, ApacheAppError)
TIMED_OUT = 3
"""``TTransportException.TIMED_OUT`` in both thriftpy2 and Apache Thrift."""


# -- helpers ---------------------------------------------------------------------------------


@contextlib.contextmanager
def client(kind: str, address: Any) -> Iterator[Any]:
    """A connected TestService client of the given implementation."""
    if kind == "thriftpy2":
        with thriftpy2_client(TestService, address) as c:
            yield c
    else:
        with apache_client(address) as c:
            yield c


def outcome(call: Callable[..., Any], *args: Any) -> str:
    """Make one call: ``"ok"`` if it was served, ``"shed"`` if a QPS limit refused it.

    Any other failure propagates. A refusal must carry LOADSHEDDING and a "QPS Overload" message.
    """
    try:
        call(*args)
    except APP_ERRORS as exc:
        if exc.type != LOADSHEDDING:
            raise
        message = str(exc.message)
    else:
        return "ok"
    assert message.startswith("QPS Overload"), message
    return "shed"


def outcomes(call: Callable[..., Any], n: int, *args: Any) -> list[str]:
    """``outcome`` of ``n`` calls in a row."""
    return [outcome(call, *args) for _ in range(n)]


def metric(server: kitegreen.RpcServer, name: str, **labels: str) -> float | None:
    """One sample of the server's Prometheus exposition, parsed; None if absent."""
    assert server.metrics is not None
    text = server.metrics.exposition().decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return float(sample.value)
    return None


def events_named(server: kitegreen.RpcServer, name: str) -> list[kitegreen.Event]:
    return [e for e in server.recent_events() if e.name == name]


def refused_at_once(address: tuple[str, int]) -> bool:
    """Connect with a bare socket; True if the server closes it (EOF or reset) before a timeout.

    A connection left waiting (in the backlog, or accepted and ignored) raises TimeoutError.
    """
    with socket.create_connection(address, timeout=5.0) as sock:
        try:
            return sock.recv(1) == b""
        except ConnectionResetError:
            return True


def served(address: tuple[str, int]) -> bool:
    """A fresh connection gets an answer."""
    with thriftpy2_client(TestService, address) as c:
        return c.echo("served?") == "served?"


# -- the connection limit ----------------------------------------------------------------------


class TestConnectionLimit:
    def test_connection_over_the_limit_is_closed_at_once(self, make_server):
        """At the limit a new connection is accepted and closed: the client sees EOF, not a hang."""
        server = make_server(limit_connections=2)
        with thriftpy2_client(TestService, server.address) as a, apache_client(server.address) as b:
            assert a.echo("a") == "a"
            assert b.echo("b") == "b"
            assert refused_at_once(server.address)

    @pytest.mark.parametrize("kind", CLIENTS)
    def test_client_sees_a_transport_error_not_a_timeout(self, make_server, kind):
        """A Thrift client over the limit fails with a closed connection, not a read timeout."""
        server = make_server(limit_connections=1)
        with thriftpy2_client(TestService, server.address) as holder:
            assert holder.echo("hold") == "hold"
            with (
                pytest.raises((TTransportException, ApacheTransportError, ConnectionError)) as info,
                client(kind, server.address) as refused,
            ):
                refused.echo("over")
            assert getattr(info.value, "type", None) != TIMED_OUT
            assert holder.echo("still") == "still"

    def test_refusal_is_logged_reported_and_counted(self, make_server):
        """Each refusal is counted; the first is logged as a warning and becomes an event."""
        server = make_server(limit_connections=1, report_interval=60.0)
        with thriftpy2_client(TestService, server.address) as holder, capture_logs() as logs:
            assert holder.echo("hold") == "hold"
            assert refused_at_once(server.address)
            assert refused_at_once(server.address)
            wait_until(
                lambda: (
                    metric(server, "kitegreen_overload_rejections_total", limit="connections") == 2
                )
            )
        overloads = events_named(server, "Connection Overload")
        assert len(overloads) == 1
        assert "limit 1" in overloads[0].detail
        warnings = [e for e in logs if e.get("kind") == "Connection Overload"]
        assert len(warnings) == 1
        assert warnings[0]["log_level"] == "warning"

    def test_closing_a_connection_frees_its_slot(self, make_server):
        """Once a connection closes, a new one is admitted in its place."""
        server = make_server(limit_connections=1)
        with thriftpy2_client(TestService, server.address) as first:
            assert first.echo("first") == "first"
            assert refused_at_once(server.address)
        wait_until(lambda: server.overload()["conn_now"] == 0)
        assert served(server.address)

    def test_connections_under_the_limit_are_all_served(self, make_server):
        """Up to the limit every connection is served."""
        server = make_server(limit_connections=3)
        with contextlib.ExitStack() as stack:
            clients = [
                stack.enter_context(thriftpy2_client(TestService, server.address)) for _ in range(3)
            ]
            assert [c.echo(str(i)) for i, c in enumerate(clients)] == ["0", "1", "2"]
            assert server.overload()["conn_now"] == 3


# -- QPS limits --------------------------------------------------------------------------------


class TestQpsLimit:
    @pytest.mark.parametrize("kind", CLIENTS)
    def test_burst_over_the_limit_is_shed(self, make_server, kind):
        """A burst of 40 calls at limit_qps=5: some are served, many get LOADSHEDDING."""
        server = make_server(limit_qps=5)
        with client(kind, server.address) as c:
            results = outcomes(c.echo, 40, "burst")
        # The bucket starts full, so the first five always pass; refills (5/s) cannot cover
        # 35 more calls unless the burst took seconds.
        assert results[:5] == ["ok"] * 5
        assert results.count("shed") >= 10

    @pytest.mark.parametrize("kind", CLIENTS)
    def test_connection_keeps_serving_after_a_refusal(self, make_server, kind):
        """A shed request does not close the connection: it is served again once tokens refill."""
        server = make_server(limit_qps=5, qps_fill_interval=0.1)
        with client(kind, server.address) as c:
            assert "shed" in outcomes(c.echo, 20, "drain")
            wait_until(lambda: outcome(c.echo, "again") == "ok")

    def test_limit_is_per_request_not_per_connection(self, make_server):
        """One connection is limited call by call, and a second connection shares the bucket."""
        server = make_server(limit_qps=3, qps_fill_interval=NO_REFILL)
        with thriftpy2_client(TestService, server.address) as one:
            assert outcomes(one.echo, 5, "x") == ["ok"] * 3 + ["shed"] * 2
        with apache_client(server.address) as two:
            assert outcome(two.echo, "y") == "shed"

    def test_refusal_is_reported_and_counted(self, make_server):
        """Shed requests are counted by limit and method; the report is a "QPS Overload" event."""
        server = make_server(limit_qps=1, qps_fill_interval=NO_REFILL, report_interval=60.0)
        with thriftpy2_client(TestService, server.address) as c, capture_logs() as logs:
            assert outcomes(c.echo, 3, "x") == ["ok", "shed", "shed"]
        wait_until(lambda: metric(server, "kitegreen_overload_rejections_total", limit="qps") == 2)
        assert metric(server, "kitegreen_request_errors_total", method="echo", kind="overload") == 2
        overloads = [e for e in server.recent_events() if "QPS Overload" in e.name]
        assert len(overloads) == 1
        assert "echo" in overloads[0].detail
        assert any(e["log_level"] == "warning" and e.get("kind") == "QPS Overload" for e in logs)

    @pytest.mark.parametrize("kind", CLIENTS)
    def test_endpoint_limit_refuses_only_that_method(self, make_server, kind):
        """endpoint_qps_limits={"echo": 2}: echo is shed after two calls, add is not limited."""
        server = make_server(endpoint_qps_limits={"echo": 2}, qps_fill_interval=NO_REFILL)
        with client(kind, server.address) as c:
            assert outcomes(c.echo, 4, "x") == ["ok", "ok", "shed", "shed"]
            assert [c.add(i, 1) for i in range(10)] == list(range(1, 11))
        wait_until(
            lambda: metric(server, "kitegreen_overload_rejections_total", limit="endpoint_qps") == 2
        )

    def test_method_refused_by_its_own_limit_leaves_the_server_limit_alone(self, make_server):
        """Calls shed by a per-method limit do not spend the server-wide tokens of other methods."""
        server = make_server(
            limit_qps=5, endpoint_qps_limits={"echo": 1}, qps_fill_interval=NO_REFILL
        )
        with thriftpy2_client(TestService, server.address) as c:
            assert outcomes(c.echo, 6, "x") == ["ok"] + ["shed"] * 5
            # echo was served once: four of the five server-wide tokens are left for add.
            assert outcomes(c.add, 4, 1, 1) == ["ok"] * 4


class TestBucket:
    """The token bucket with an injected clock: exact and independent of machine speed."""

    @staticmethod
    def limiter(qps: int, endpoint: dict[str, int] | None = None, fill: float = 0.1) -> Any:
        now = [0.0]
        lim = Limiter(Limits(0, qps, endpoint or {}), fill, clock=lambda: now[0])
        return lim, now

    def test_starts_full(self):
        """A new bucket admits ``limit`` requests at once, then refuses."""
        lim, _ = self.limiter(5)
        assert [lim.admit_request("echo", 0.0) for _ in range(6)] == [None] * 5 + ["qps"]

    def test_refills_limit_times_interval_per_interval(self):
        """Every fill interval adds limit*interval tokens; part of an interval adds none."""
        lim, _ = self.limiter(10, fill=0.1)
        assert [lim.admit_request("echo", 0.0) for _ in range(10)] == [None] * 10
        assert lim.admit_request("echo", 0.05) == "qps"
        assert lim.admit_request("echo", 0.12) is None
        assert lim.admit_request("echo", 0.15) == "qps"
        # Two more intervals have passed by 0.33 (counted from 0.1): two tokens.
        assert lim.admit_request("echo", 0.33) is None
        assert lim.admit_request("echo", 0.33) is None
        assert lim.admit_request("echo", 0.33) == "qps"

    def test_holds_at_most_one_seconds_worth(self):
        """However long the server was idle, a burst gets at most ``limit`` tokens."""
        lim, _ = self.limiter(5, fill=0.1)
        assert [lim.admit_request("echo", 0.0) for _ in range(5)] == [None] * 5
        assert [lim.admit_request("echo", 100.0) for _ in range(6)] == [None] * 5 + ["qps"]

    def test_zero_is_no_limit(self):
        """limit_qps=0 switches the server-wide limit off."""
        lim, _ = self.limiter(0)
        assert all(lim.admit_request("echo", 0.0) is None for _ in range(10_000))

    def test_endpoint_bucket_names_its_limit(self):
        """A per-method refusal says it was the endpoint limit; other methods pass."""
        lim, _ = self.limiter(0, {"echo": 1})
        assert lim.admit_request("echo", 0.0) is None
        assert lim.admit_request("echo", 0.0) == "endpoint_qps"
        assert lim.admit_request("add", 0.0) is None

    def test_changing_only_the_connection_limit_keeps_the_tokens(self):
        """An update that leaves the QPS limit alone does not refill the bucket."""
        lim, _ = self.limiter(2)
        assert [lim.admit_request("echo", 0.0) for _ in range(2)] == [None, None]
        lim.update(connections=5)
        assert lim.admit_request("echo", 0.0) == "qps"

    def test_new_qps_limit_starts_full(self):
        """A changed QPS limit takes effect with a full bucket of the new size."""
        lim, now = self.limiter(2)
        assert [lim.admit_request("echo", 0.0) for _ in range(3)] == [None, None, "qps"]
        lim.update(qps=4)
        assert [lim.admit_request("echo", now[0]) for _ in range(5)] == [None] * 4 + ["qps"]

    def test_disabled_limiter_admits_everything(self):
        """With limits disabled (service-mesh mode) nothing is refused, but connections count."""
        lim = Limiter(Limits(1, 1, {"echo": 1}), 0.1, enabled=False, clock=lambda: 0.0)
        assert all(lim.admit_connection() for _ in range(5))
        assert lim.connections == 5
        assert all(lim.admit_request("echo", 0.0) is None for _ in range(5))
        assert not lim.limits_requests

    def test_limits_requests_follows_the_qps_limits(self):
        """The request loop asks for a token only while a QPS limit is set (limits_requests),
        whichever limit it is and however it was set."""
        lim, _ = self.limiter(0)
        assert not lim.limits_requests
        lim.update(endpoint_qps={"echo": 1})
        assert lim.limits_requests
        lim.update(endpoint_qps={"echo": 0})
        assert not lim.limits_requests
        lim.update(qps=3)
        assert lim.limits_requests
        lim.update(qps=0)
        assert not lim.limits_requests
        assert self.limiter(2)[0].limits_requests


# -- run-time changes ------------------------------------------------------------------------


class TestUpdateLimits:
    def test_overload_reflects_the_new_limits(self, make_server):
        """overload() shows the limits update_limits() set, and the connections open now."""
        server = make_server(limit_connections=10, limit_qps=100)
        with thriftpy2_client(TestService, server.address) as c:
            assert c.echo("x") == "x"
            limits = server.update_limits(
                limit_connections=3, limit_qps=7, endpoint_qps_limits={"echo": 2}
            )
            assert (limits.connections, limits.qps, dict(limits.endpoint_qps)) == (
                3,
                7,
                {"echo": 2},
            )
            over = server.overload()
        assert over["conn_now"] == 1
        assert over["conn_limit"] == 3
        assert over["qps_limit"] == 7
        assert over["endpoint_qps_limits"] == {"echo": 2}

    def test_none_keeps_a_limit(self, make_server):
        """A limit left out of the call stays as it was."""
        server = make_server(limit_connections=10, limit_qps=100)
        server.update_limits(limit_qps=50)
        assert server.overload()["conn_limit"] == 10
        assert server.overload()["qps_limit"] == 50

    def test_lowered_connection_limit_refuses_new_connections(self, make_server):
        """Open connections keep serving; new ones are refused until the limit is raised."""
        server = make_server(limit_connections=10)
        with (
            thriftpy2_client(TestService, server.address) as a,
            thriftpy2_client(TestService, server.address) as b,
        ):
            assert a.echo("a") == "a"
            assert b.echo("b") == "b"
            server.update_limits(limit_connections=2)
            assert refused_at_once(server.address)
            assert a.echo("a") == "a"
            server.update_limits(limit_connections=3)
            assert served(server.address)

    @pytest.mark.parametrize("kind", CLIENTS)
    def test_new_qps_limit_applies_to_open_connections(self, make_server, kind):
        """A QPS limit set at run time sheds calls on a connection opened before it."""
        server = make_server(limit_qps=0, qps_fill_interval=NO_REFILL)
        with client(kind, server.address) as c:
            assert outcomes(c.echo, 5, "x") == ["ok"] * 5
            server.update_limits(limit_qps=2)
            assert outcomes(c.echo, 3, "x") == ["ok", "ok", "shed"]
            server.update_limits(limit_qps=0)
            assert outcomes(c.echo, 5, "x") == ["ok"] * 5

    def test_endpoint_limits_are_replaced(self, make_server):
        """New per-method limits replace the old ones; an empty mapping removes them."""
        server = make_server(qps_fill_interval=NO_REFILL)
        with thriftpy2_client(TestService, server.address) as c:
            server.update_limits(endpoint_qps_limits={"echo": 1})
            assert outcomes(c.echo, 2, "x") == ["ok", "shed"]
            assert outcome(c.add, 1, 2) == "ok"
            server.update_limits(endpoint_qps_limits={"add": 1})
            assert outcomes(c.echo, 3, "x") == ["ok"] * 3
            assert outcomes(c.add, 2, 1, 2) == ["ok", "shed"]
            server.update_limits(endpoint_qps_limits={})
            assert outcomes(c.add, 3, 1, 2) == ["ok"] * 3

    def test_change_is_an_event(self, make_server):
        """A change records a "Config Change" event; an update that changes nothing does not."""
        server = make_server(limit_connections=10, limit_qps=100)
        server.update_limits(limit_connections=3)
        newest = server.recent_events(1)[0]
        assert newest.name == "Config Change"
        assert "3" in newest.detail
        server.update_limits(limit_connections=3, limit_qps=100)
        assert len(events_named(server, "Config Change")) == 1

    @pytest.mark.parametrize(
        "change",
        [
            {"limit_connections": -1},
            {"limit_qps": -5},
            {"limit_qps": 2.5},
            {"limit_connections": "10"},
            {"limit_qps": True},
            {"endpoint_qps_limits": {"echo": -1}},
            {"endpoint_qps_limits": {"echo": "5"}},
        ],
        ids=repr,
    )
    def test_bad_value_raises_config_error(self, make_server, change):
        """A negative or non-integer limit raises ConfigError and changes nothing."""
        server = make_server(limit_connections=10, limit_qps=100)
        before = server.overload()
        with pytest.raises(kitegreen.ConfigError):
            server.update_limits(**change)
        assert server.overload() == before
        assert events_named(server, "Config Change") == []


# -- service-mesh mode -------------------------------------------------------------------------


class TestServiceMeshMode:
    def test_limits_are_off(self, make_server):
        """In service-mesh mode more connections and calls than the limits allow are served."""
        server = make_server(
            service_mesh_mode=True,
            service_mesh_ingress_addr="127.0.0.1:0",
            limit_connections=1,
            limit_qps=1,
            qps_fill_interval=NO_REFILL,
        )
        assert server.overload()["limits_enabled"] is False
        with contextlib.ExitStack() as stack:
            clients = [
                stack.enter_context(thriftpy2_client(TestService, server.address)) for _ in range(3)
            ]
            clients.append(stack.enter_context(apache_client(server.address)))
            for c in clients:
                assert outcomes(c.echo, 3, "mesh") == ["ok"] * 3
            assert server.overload()["conn_now"] == 4

    def test_update_limits_does_not_switch_limits_on(self, make_server):
        """Limits set at run time in service-mesh mode are recorded but not enforced."""
        server = make_server(
            service_mesh_mode=True,
            service_mesh_ingress_addr="127.0.0.1:0",
            qps_fill_interval=NO_REFILL,
        )
        server.update_limits(limit_connections=1, limit_qps=1, endpoint_qps_limits={"echo": 1})
        assert server.overload()["conn_limit"] == 1
        with (
            thriftpy2_client(TestService, server.address) as a,
            thriftpy2_client(TestService, server.address) as b,
        ):
            assert outcomes(a.echo, 3, "a") == ["ok"] * 3
            assert outcomes(b.echo, 3, "b") == ["ok"] * 3
