from __future__ import annotations

# The Consul agent double behaves as Consul documents, as the real py-consul client sees it.
# Tests taking the ``agent`` fixture run against the double and, when CONSUL_HTTP_ADDR names a
# real agent, against that agent too (skipped otherwise; the double's variants never are).
import os
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import consul
import gevent
import pytest
import requests
from consul_double import ConsulDouble, SeenRequest, parse_duration

REAL_ADDR = os.environ.get("CONSUL_HTTP_ADDR", "")


@dataclass
class AgentUnderTest:
    """The double or a real agent, with unique names so that a real agent is left clean."""

    kind: str
    make_client: Callable[..., Any]
    double: ConsulDouble | None = None
    tag: str = field(default_factory=lambda: uuid.uuid4().hex[:10])
    service_ids: list[str] = field(default_factory=list)

    def client(self, token: str | None = None) -> Any:
        return self.make_client(token=token)

    def key(self, name: str) -> str:
        return f"consul-double-test/{self.tag}/{name}"

    def service_id(self, name: str) -> str:
        service_id = f"cdt-{name}-{self.tag}"
        self.service_ids.append(service_id)
        return service_id

    def wait_until_blocked(self) -> None:
        """With the double, wait until the blocking query is parked; a real agent gives no
        way to tell, and a write that lands first makes the query return at once, just as
        well."""
        if self.double is not None:
            self.double.wait_for_blocked(1, timeout=2.0)


@pytest.fixture(
    params=[
        "double",
        pytest.param(
            "real",
            marks=pytest.mark.skipif(not REAL_ADDR, reason="CONSUL_HTTP_ADDR is not set"),
        ),
    ]
)
def agent(request: pytest.FixtureRequest) -> Iterator[AgentUnderTest]:
    if request.param == "double":
        with ConsulDouble() as double:
            yield AgentUnderTest("double", double.client, double)
        return
    clients: list[Any] = []

    def make(token: str | None = None) -> Any:
        c = consul.Consul(connections_timeout=2.0)  # CONSUL_HTTP_ADDR, CONSUL_HTTP_TOKEN...
        if token:
            c.token = token
        clients.append(c)
        return c

    real = AgentUnderTest("real", make)
    try:
        yield real
    finally:
        cleaner = make()
        for service_id in real.service_ids:
            cleaner.agent.service.deregister(service_id)
        cleaner.kv.delete(real.key(""), recurse=True)
        for c in clients:
            c.http.session.close()


@pytest.fixture
def double() -> Iterator[ConsulDouble]:
    with ConsulDouble() as d:
        yield d


def _raw(c: Any, method: str, path: str, **kwargs: Any) -> requests.Response:
    """A request on the client's own session (closed with it), for what py-consul lacks."""
    headers = {"X-Consul-Token": c.token} if c.token else {}
    return c.http.session.request(
        method, c.http.base_uri + path, headers=headers, timeout=2.0, **kwargs
    )


# -- agent services and checks, against the double and a real agent ----------------------


def test_register_with_tags_and_tcp_check_is_listed(agent: AgentUnderTest) -> None:
    c = agent.client()
    service_id = agent.service_id("tcp")
    ok = c.agent.service.register(
        "cdt-svc",
        service_id=service_id,
        address="127.0.0.1",
        port=9090,
        tags=["cluster=a", "version=1"],
        meta={"framework": "kitegreen"},
        check={
            "TCP": "127.0.0.1:9090",
            "Interval": "10s",
            "Timeout": "2s",
            "DeregisterCriticalServiceAfter": "1m",
        },
    )
    assert ok is True

    service = c.agent.services()[service_id]
    assert service["ID"] == service_id
    assert service["Service"] == "cdt-svc"
    assert service["Tags"] == ["cluster=a", "version=1"]
    assert service["Address"] == "127.0.0.1"
    assert service["Port"] == 9090
    assert service["Meta"] == {"framework": "kitegreen"}

    check = c.agent.checks()[f"service:{service_id}"]
    assert check["ServiceID"] == service_id
    assert check["ServiceName"] == "cdt-svc"
    assert check["Type"] == "tcp"
    assert check["Name"] == "Service 'cdt-svc' check"
    assert check["Status"] in ("passing", "warning", "critical")
    if agent.double is not None:
        assert check["Status"] == "critical"  # nothing probes it: as registered
        assert agent.double.registrations[service_id]["checks"][0]["TCP"] == "127.0.0.1:9090"
        assert agent.double.check_status(f"service:{service_id}") == "critical"


def test_several_checks_are_numbered(agent: AgentUnderTest) -> None:
    c = agent.client()
    service_id = agent.service_id("multi")
    assert c.agent.service.register(
        "cdt-multi",
        service_id=service_id,
        port=9091,
        check=consul.Check.ttl("30s"),
        extra_checks=[consul.Check.tcp("127.0.0.1", 9091, "10s")],
    )
    checks = c.agent.checks()
    assert {f"service:{service_id}:1", f"service:{service_id}:2"} <= set(checks)
    assert f"service:{service_id}" not in checks
    assert checks[f"service:{service_id}:1"]["Type"] == "ttl"
    assert checks[f"service:{service_id}:2"]["Type"] == "tcp"


def test_deregister_removes_the_service_and_its_checks(agent: AgentUnderTest) -> None:
    c = agent.client()
    service_id = agent.service_id("gone")
    assert c.agent.service.register(
        "cdt-gone", service_id=service_id, check=consul.Check.ttl("30s")
    )
    assert service_id in c.agent.services()

    assert c.agent.service.deregister(service_id) is True
    assert service_id not in c.agent.services()
    assert f"service:{service_id}" not in c.agent.checks()
    # Consul answers 404 "Unknown service ID" for it now; py-consul's boolean callback
    # lets a 404 through as False.
    assert c.agent.service.deregister(service_id) is False


def test_invalid_check_is_a_bad_request(agent: AgentUnderTest) -> None:
    c = agent.client()
    service_id = agent.service_id("bad")
    with pytest.raises(consul.ConsulException) as excinfo:  # BadRequest
        c.agent.service.register("cdt-bad", service_id=service_id, check={"TCP": "127.0.0.1:1"})
    assert type(excinfo.value).__name__ == "BadRequest"
    assert service_id not in c.agent.services()


def test_ttl_check_pass_warn_fail_and_update(agent: AgentUnderTest) -> None:
    c = agent.client()
    service_id = agent.service_id("ttl")
    check_id = f"service:{service_id}"
    assert c.agent.service.register("cdt-ttl", service_id=service_id, check=consul.Check.ttl("30s"))
    assert c.agent.checks()[check_id]["Status"] == "critical"

    assert c.agent.check.ttl_pass(check_id, notes="all good") is True
    check = c.agent.checks()[check_id]
    assert (check["Status"], check["Output"]) == ("passing", "all good")

    assert c.agent.check.ttl_warn(check_id, notes="hmm") is True
    assert c.agent.checks()[check_id]["Status"] == "warning"

    assert c.agent.check.ttl_fail(check_id, notes="down") is True
    assert c.agent.checks()[check_id]["Status"] == "critical"

    response = _raw(
        c, "PUT", f"/v1/agent/check/update/{check_id}", json={"Status": "passing", "Output": "up"}
    )
    assert response.status_code == 200
    check = c.agent.checks()[check_id]
    assert (check["Status"], check["Output"]) == ("passing", "up")

    bad = _raw(c, "PUT", f"/v1/agent/check/update/{check_id}", json={"Status": "meh"})
    assert bad.status_code == 400


def test_ttl_update_of_an_unknown_or_non_ttl_check(agent: AgentUnderTest) -> None:
    c = agent.client()
    unknown = f"service:cdt-nobody-{agent.tag}"
    # 404 "Unknown check ID": py-consul's boolean callback returns False, it does not raise.
    assert c.agent.check.ttl_pass(unknown) is False
    response = _raw(c, "PUT", f"/v1/agent/check/pass/{unknown}")
    assert response.status_code == 404
    assert "Unknown check ID" in response.text

    service_id = agent.service_id("tcponly")
    assert c.agent.service.register(
        "cdt-tcponly", service_id=service_id, check=consul.Check.tcp("127.0.0.1", 1, "10s")
    )
    with pytest.raises(consul.ConsulException, match="does not have associated TTL"):
        c.agent.check.ttl_pass(f"service:{service_id}")


# -- KV, against the double and a real agent ------------------------------------------------


def test_kv_put_get_delete(agent: AgentUnderTest) -> None:
    c = agent.client()
    key = agent.key("plain")

    index, item = c.kv.get(key)
    assert item is None  # a 404: py-consul gives (index, None)
    assert int(index) >= 1

    assert c.kv.put(key, "hello") is True
    index, item = c.kv.get(key)
    assert item["Key"] == key
    assert item["Value"] == b"hello"
    assert item["Flags"] == 0
    assert item["CreateIndex"] == item["ModifyIndex"] == int(index)
    assert item["LockIndex"] == 0

    assert c.kv.put(key, b"\x00\xffbinary", flags=42) is True
    index2, item = c.kv.get(key)
    assert item["Value"] == b"\x00\xffbinary"
    assert item["Flags"] == 42
    assert int(index2) > int(index)
    assert item["CreateIndex"] == int(index)

    raw = _raw(c, "GET", f"/v1/kv/{key}?raw")
    assert raw.content == b"\x00\xffbinary"

    assert c.kv.delete(key) is True
    index3, item = c.kv.get(key)
    assert item is None
    assert int(index3) > int(index2)  # the deletion's index


def test_kv_check_and_set(agent: AgentUnderTest) -> None:
    c = agent.client()
    key = agent.key("cas")
    assert c.kv.put(key, "first", cas=0) is True
    assert c.kv.put(key, "again", cas=0) is False  # cas=0: only when missing
    _, item = c.kv.get(key)
    assert c.kv.put(key, "second", cas=item["ModifyIndex"] + 1000) is False
    assert c.kv.put(key, "second", cas=item["ModifyIndex"]) is True
    _, item = c.kv.get(key)
    assert item["Value"] == b"second"
    assert c.kv.delete(key, cas=item["ModifyIndex"] + 1000) is False
    assert c.kv.delete(key, cas=item["ModifyIndex"]) is True
    assert c.kv.get(key)[1] is None


def test_kv_recurse_and_keys(agent: AgentUnderTest) -> None:
    c = agent.client()
    prefix = agent.key("tree/")
    for name, value in (("a", "1"), ("b", "2"), ("c/d", "3"), ("c/e", "4")):
        assert c.kv.put(prefix + name, value)
    assert c.kv.put(agent.key("treehouse"), "not under tree/")

    index, items = c.kv.get(prefix, recurse=True)
    assert [i["Key"] for i in items] == [prefix + n for n in ("a", "b", "c/d", "c/e")]
    assert [i["Value"] for i in items] == [b"1", b"2", b"3", b"4"]
    assert int(index) == max(i["ModifyIndex"] for i in items)

    _, keys = c.kv.get(prefix, keys=True)
    assert keys == [prefix + n for n in ("a", "b", "c/d", "c/e")]
    _, keys = c.kv.get(prefix, keys=True, separator="/")
    assert keys == [prefix + "a", prefix + "b", prefix + "c/"]

    assert c.kv.delete(prefix + "c/", recurse=True) is True
    _, items = c.kv.get(prefix, recurse=True)
    assert [i["Key"] for i in items] == [prefix + "a", prefix + "b"]

    assert c.kv.delete(prefix, recurse=True) is True
    index, items = c.kv.get(prefix, recurse=True)
    assert items is None
    assert c.kv.get(agent.key("treehouse"))[1]["Value"] == b"not under tree/"


def test_index_is_monotonic(agent: AgentUnderTest) -> None:
    c = agent.client()
    key = agent.key("mono")
    seen = []
    for value in ("1", "2", "3"):
        c.kv.put(key, value)
        seen.append(int(c.kv.get(key)[0]))
    c.kv.delete(key)
    seen.append(int(c.kv.get(key)[0]))
    c.kv.put(key, "4")
    seen.append(int(c.kv.get(key)[0]))
    assert seen == sorted(seen)
    assert len(set(seen)) == len(seen)


# -- blocking queries, against the double and a real agent -------------------------------


def test_blocking_get_returns_when_the_key_changes(agent: AgentUnderTest) -> None:
    reader, writer = agent.client(), agent.client()
    key = agent.key("watched")
    writer.kv.put(key, "before")
    index, _ = reader.kv.get(key)

    def write() -> None:
        agent.wait_until_blocked()
        writer.kv.put(key, "after")

    greenlet = gevent.spawn(write)
    started = time.monotonic()
    new_index, item = reader.kv.get(key, index=index, wait="2s")
    elapsed = time.monotonic() - started
    greenlet.get(timeout=2.0)

    assert item["Value"] == b"after"
    assert int(new_index) > int(index)
    assert int(new_index) == item["ModifyIndex"]
    assert elapsed < 1.5
    if agent.double is not None:
        assert agent.double.blocked_queries == 0


def test_blocking_get_returns_after_the_wait_when_nothing_changes(agent: AgentUnderTest) -> None:
    reader, writer = agent.client(), agent.client()
    key = agent.key("quiet")
    writer.kv.put(key, "same")
    index, _ = reader.kv.get(key)

    # A write elsewhere moves the raft index but not this key: the query keeps waiting.
    def write_elsewhere() -> None:
        agent.wait_until_blocked()
        writer.kv.put(agent.key("elsewhere"), "noise")

    greenlet = gevent.spawn(write_elsewhere)
    started = time.monotonic()
    new_index, item = reader.kv.get(key, index=index, wait="400ms")
    elapsed = time.monotonic() - started
    greenlet.get(timeout=2.0)

    assert new_index == index
    assert item["Value"] == b"same"
    assert 0.35 <= elapsed < 2.0


def test_blocking_get_on_a_missing_key_returns_when_it_is_created(agent: AgentUnderTest) -> None:
    reader, writer = agent.client(), agent.client()
    key = agent.key("later")
    index, item = reader.kv.get(key)
    assert item is None

    def create() -> None:
        agent.wait_until_blocked()
        writer.kv.put(key, "born")

    greenlet = gevent.spawn(create)
    new_index, item = reader.kv.get(key, index=index, wait="2s")
    greenlet.get(timeout=2.0)
    assert item["Value"] == b"born"
    assert int(new_index) > int(index)


def test_blocking_recurse_watches_the_prefix(agent: AgentUnderTest) -> None:
    reader, writer = agent.client(), agent.client()
    prefix = agent.key("limits/")
    writer.kv.put(prefix + "a", "1")
    index, items = reader.kv.get(prefix, recurse=True)
    assert len(items) == 1

    def write() -> None:
        agent.wait_until_blocked()
        writer.kv.put(agent.key("limitsx"), "outside the prefix")
        writer.kv.put(prefix + "b", "2")

    greenlet = gevent.spawn(write)
    new_index, items = reader.kv.get(prefix, recurse=True, index=index, wait="2s")
    greenlet.get(timeout=2.0)
    assert [i["Key"] for i in items] == [prefix + "a", prefix + "b"]
    assert int(new_index) == items[1]["ModifyIndex"]


def test_blocking_get_wakes_on_delete(agent: AgentUnderTest) -> None:
    reader, writer = agent.client(), agent.client()
    key = agent.key("doomed")
    writer.kv.put(key, "x")
    index, _ = reader.kv.get(key)

    def delete() -> None:
        agent.wait_until_blocked()
        writer.kv.delete(key)

    greenlet = gevent.spawn(delete)
    new_index, item = reader.kv.get(key, index=index, wait="2s")
    greenlet.get(timeout=2.0)
    assert item is None
    assert int(new_index) > int(index)


# -- the double's own behaviour and controls -------------------------------------------------


def test_parse_duration() -> None:
    assert parse_duration("5s") == 5.0
    assert parse_duration("100ms") == pytest.approx(0.1)
    assert parse_duration("1m") == 60.0
    assert parse_duration("1m30s") == 90.0
    assert parse_duration("1.5h") == 5400.0
    assert parse_duration("0") == 0.0
    for bad in ("", "5", "s", "5x", "5s5"):
        with pytest.raises(ValueError, match="not a duration"):
            parse_duration(bad)


def test_address_url_and_status_leader(double: ConsulDouble) -> None:
    assert double.address == f"127.0.0.1:{double.port}"
    assert double.url == f"http://127.0.0.1:{double.port}"
    assert double.port > 0
    assert double.client().status.leader() == "127.0.0.1:8300"
    assert double.client().status.peers() == ["127.0.0.1:8300"]


def test_every_response_carries_the_consul_headers(double: ConsulDouble) -> None:
    c = double.client()
    c.kv.put("hdr/a", "1")
    indexes = []
    for method, path in (
        ("GET", "/v1/status/leader"),
        ("GET", "/v1/agent/services"),
        ("GET", "/v1/agent/checks"),
        ("GET", "/v1/kv/hdr/a"),
        ("GET", "/v1/kv/hdr/missing"),
        ("PUT", "/v1/agent/check/pass/nope"),
        ("GET", "/v1/no/such/endpoint"),
    ):
        response = _raw(c, method, path)
        assert int(response.headers["X-Consul-Index"]) >= 1, path
        assert response.headers["X-Consul-KnownLeader"] == "true"
        assert response.headers["X-Consul-LastContact"] == "0"
        indexes.append(int(response.headers["X-Consul-Index"]))
    assert _raw(c, "GET", "/v1/no/such/endpoint").status_code == 404
    c.kv.put("hdr/a", "2")
    later = int(_raw(c, "GET", "/v1/agent/services").headers["X-Consul-Index"])
    assert later > max(indexes)
    assert later == double.index


def test_stop_answers_blocked_queries_promptly() -> None:
    double = ConsulDouble().start()
    try:
        c = double.client(timeout=5.0)
        c.kv.put("k", "v")
        index, _ = c.kv.get("k")
        greenlet = gevent.spawn(c.kv.get, "k", index=index, wait="30s")
        double.wait_for_blocked(1, timeout=2.0)
        started = time.monotonic()
        double.stop()
        assert time.monotonic() - started < 2.5
        new_index, item = greenlet.get(timeout=2.0)
        assert new_index == index
        assert item["Value"] == b"v"
    finally:
        double.stop()
        double.stop()  # idempotent


def test_wait_is_capped_by_max_wait() -> None:
    with ConsulDouble(max_wait=0.2) as double:
        c = double.client()
        c.kv.put("k", "v")
        index, _ = c.kv.get("k")
        started = time.monotonic()
        assert c.kv.get("k", index=index, wait="10m")[0] == index
        assert time.monotonic() - started < 2.0


def test_restart_empty_forgets_services_but_keeps_kv(double: ConsulDouble) -> None:
    c = double.client()
    assert c.agent.service.register("svc", service_id="svc-1", check=consul.Check.ttl("30s"))
    c.kv.put("config/x", "kept")
    index_before = double.index

    double.restart_empty()

    assert c.agent.services() == {}
    assert c.agent.checks() == {}
    assert double.services == {}
    assert double.check_status("service:svc-1") is None
    assert c.kv.get("config/x")[1]["Value"] == b"kept"
    assert double.index > index_before  # the servers' index never goes back
    # The check is gone, so the heartbeat is refused: 404, False from py-consul.
    assert c.agent.check.ttl_pass("service:svc-1") is False


def test_go_down_refuses_connections_and_come_back_uses_the_same_port(
    double: ConsulDouble,
) -> None:
    c = double.client(timeout=5.0)
    c.kv.put("k", "v")
    index, _ = c.kv.get("k")
    blocked = gevent.spawn(c.kv.get, "k", index=index, wait="30s")
    double.wait_for_blocked(1, timeout=2.0)
    port = double.port

    double.go_down()

    assert not double.is_up
    with pytest.raises(requests.exceptions.ConnectionError):
        blocked.get(timeout=2.0)  # the agent dropped the connection under the blocking query
    with pytest.raises(requests.exceptions.ConnectionError):
        c.agent.services()
    with pytest.raises(requests.exceptions.ConnectionError):
        c.kv.get("k")
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=1.0).close()

    double.come_back()

    assert double.is_up
    assert double.port == port
    assert c.kv.get("k")[1]["Value"] == b"v"  # state survives; restart_empty() drops it
    assert c.status.leader() == "127.0.0.1:8300"


def test_garbage_mode_makes_py_consul_raise(double: ConsulDouble) -> None:
    c = double.client()
    double.mode = "garbage"
    with pytest.raises(consul.ConsulException, match="Failed to decode JSON"):
        c.agent.services()
    with pytest.raises(consul.ConsulException, match="Failed to decode JSON"):
        c.kv.get("k")
    with pytest.raises(consul.ConsulException, match="Failed to decode JSON"):
        c.kv.put("k", "v")
    # Calls with a boolean answer look only at the status code: a 200 is True, body or not.
    assert c.agent.service.register("svc", service_id="svc-1") is True
    assert double.services == {}  # ... yet nothing was registered

    double.mode = "normal"
    assert c.agent.services() == {}


def test_error500_mode_makes_py_consul_raise(double: ConsulDouble) -> None:
    c = double.client()
    double.mode = "error500"
    for call in (
        c.agent.services,
        lambda: c.kv.get("k"),
        lambda: c.agent.service.register("svc", service_id="svc-1"),
        lambda: c.agent.check.ttl_pass("service:svc-1"),
    ):
        with pytest.raises(consul.ConsulException, match=r"^500 rpc error"):
            call()
    double.mode = "normal"
    assert c.agent.services() == {}


def test_slow_mode_delays_responses(double: ConsulDouble) -> None:
    double.mode = "slow"
    double.slow_seconds = 0.3
    started = time.monotonic()
    assert double.client(timeout=2.0).status.leader() == "127.0.0.1:8300"
    assert time.monotonic() - started >= 0.28

    impatient = double.client(timeout=0.1)
    with pytest.raises(requests.exceptions.ReadTimeout):
        impatient.agent.services()


def test_token_is_recorded(double: ConsulDouble) -> None:
    double.client(token="secret").agent.services()
    double.client().kv.get("k", token="per-call")
    double.client().agent.checks()
    c = double.client()
    _raw(c, "GET", "/v1/kv/k?token=in-query")

    assert ("GET", "/v1/agent/services", "secret") in double.requests
    assert ("GET", "/v1/kv/k", "per-call") in double.requests
    assert SeenRequest("GET", "/v1/agent/checks", None) in double.requests
    assert ("GET", "/v1/kv/k", "in-query") in double.requests
    assert double.request_details[-1]["query"] == {"token": "in-query"}


def test_acl_token_is_enforced_when_set() -> None:
    with ConsulDouble(acl_token="right") as double:
        assert double.client(token="right").agent.services() == {}
        with pytest.raises(consul.ConsulException) as excinfo:
            double.client(token="wrong").agent.services()
        assert type(excinfo.value).__name__ == "ACLPermissionDenied"
        assert double.client().status.leader() == "127.0.0.1:8300"  # no ACL on status


def test_wait_for_registration(double: ConsulDouble) -> None:
    c = double.client()
    greenlet = gevent.spawn(
        c.agent.service.register, "late", service_id="late-1", port=7000, tags=["t"]
    )
    service = double.wait_for_registration("late", timeout=2.0)
    greenlet.get(timeout=2.0)
    assert service["ID"] == "late-1"
    assert service["Port"] == 7000
    with pytest.raises(TimeoutError, match="no service 'never'"):
        double.wait_for_registration("never", timeout=0.1)


def test_ttl_check_expires_to_critical(double: ConsulDouble) -> None:
    c = double.client()
    assert c.agent.service.register("svc", service_id="svc-1", check=consul.Check.ttl("200ms"))
    assert c.agent.check.ttl_pass("service:svc-1", notes="beat") is True
    assert double.check_status("service:svc-1") == "passing"
    assert double.wait_for(lambda: double.check_status("service:svc-1") == "critical", 2.0)
    output = c.agent.checks()["service:svc-1"]["Output"]
    assert output == "TTL expired (last output before timeout follows): beat"


def test_reregistering_keeps_the_check_status(double: ConsulDouble) -> None:
    c = double.client()
    assert c.agent.service.register("svc", service_id="svc-1", check=consul.Check.ttl("30s"))
    assert c.agent.check.ttl_pass("service:svc-1")
    assert c.agent.service.register(
        "svc", service_id="svc-1", tags=["new"], check=consul.Check.ttl("30s")
    )
    assert double.check_status("service:svc-1") == "passing"
    assert double.checks["service:svc-1"]["ServiceTags"] == ["new"]


def test_tcp_checks_are_probed_when_asked(double: ConsulDouble) -> None:
    double.probe_tcp_checks = True
    listener = socket.socket()
    try:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        port = listener.getsockname()[1]
        c = double.client()
        assert c.agent.service.register(
            "svc", service_id="svc-1", port=port, check=consul.Check.tcp("127.0.0.1", port, "1s")
        )
        assert double.wait_for(lambda: double.check_status("service:svc-1") == "passing", 2.0)
        assert double.checks["service:svc-1"]["Output"].endswith(": Success")
    finally:
        listener.close()
    assert double.wait_for(lambda: double.check_status("service:svc-1") == "critical", 2.0)


def test_test_controls_write_kv_as_clients_see_it(double: ConsulDouble) -> None:
    c = double.client()
    index = double.kv_put("ctl/a", "from the test")
    got_index, item = c.kv.get("ctl/a")
    assert int(got_index) == index
    assert item["Value"] == b"from the test"
    double.kv_put("ctl/b", b"\x01")
    assert double.kv == {"ctl/a": b"from the test", "ctl/b": b"\x01"}
    double.kv_delete("ctl/", recurse=True)
    assert c.kv.get("ctl/", recurse=True)[1] is None
    assert double.kv_get("ctl/a") is None


def test_unknown_datacenter(double: ConsulDouble) -> None:
    with pytest.raises(consul.ConsulException, match="No path to datacenter"):
        double.client().kv.get("k", dc="elsewhere")
