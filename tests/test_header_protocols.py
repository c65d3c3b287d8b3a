"""TTHeader (Kitex, kite) and THeader (Apache Thrift, fbthrift, baseplate) on a real server.

THeader is spoken by Apache Thrift's own Python client (``THeaderTransport`` and
``THeaderProtocol``), an independent implementation. TTHeader has no Python client: requests
are built, and replies read, by the tests' own codec (``tests/ttheader.py``), written from the
published layout apart from kitegreen's. What the handler saw comes back through ``echo``: the
handler below answers ``echo("?info")`` with the request's metadata as JSON.
"""

from __future__ import annotations

import contextlib
import json
import socket
import struct
import time
from collections.abc import Iterator
from typing import Any

import gevent
import gevent.event
import pytest
import structlog
import structlog.testing
import ttheader
from clients import read_exactly
from conftest import Handler, testsvc_thrift, wait_until
from testsvc import TestService as ApacheService
from thrift.protocol.THeaderProtocol import THeaderProtocol
from thrift.Thrift import TApplicationException as ApacheAppError
from thrift.transport import TSocket, TTransport
from thrift.transport.THeaderTransport import (
    THeaderClientType,
    THeaderSubprotocolID,
    THeaderTransformID,
)
from wire import encode

import kitegreen
from kitegreen.codec import _thrift
from kitegreen.rpc.loop import TIMEOUT

pytestmark = pytest.mark.timeout(30)

LOG_ID, FROM_SERVICE, TO_METHOD, RPC_TIMEOUT, FROM_METHOD = 2, 3, 9, 12, 20
PROTOCOL_IDS = {"binary": 0, "compact": 2}


SPAWNED: list[gevent.Greenlet] = []
"""Greenlets ``echo("?spawn")`` started."""
RELEASE = gevent.event.Event()


def _context_once(release: gevent.event.Event) -> dict[str, Any]:
    release.wait(10)
    return structlog.contextvars.get_contextvars()


class MetadataHandler(Handler):
    """The test handler; ``echo("?info")`` returns what the handler sees of the request, and
    ``echo("?biz")`` sets response headers before answering."""

    def echo(self, message: str) -> str:
        info = kitegreen.request_info()
        if message == "?info":
            remaining = info.remaining()
            return json.dumps(
                {
                    "header": info.header,
                    "caller_service": info.caller_service,
                    "caller_method": info.caller_method,
                    "log_id": info.log_id,
                    "remaining": remaining,
                    "transit": dict(info.transit),
                    "persistent": dict(info.persistent),
                    "headers": dict(info.headers),
                    "real_ip": kitegreen.real_ip(),
                }
            )
        if message == "?ctx":
            return json.dumps(structlog.contextvars.get_contextvars())
        if message == "?spawn":
            # A greenlet that reads the log context later, once the test releases it.
            SPAWNED.append(gevent.spawn(_context_once, RELEASE))
            return "spawned"
        if message == "?biz":
            info.set_biz_status(4001, "no such user", {"user": "u1"})
            info.set_backward("trace", "abc")
        return message


@pytest.fixture
def make(make_server: Any) -> Any:
    """``make(**config)``: a server with a MetadataHandler of its own."""
    return lambda **overrides: make_server(handler=MetadataHandler(), **overrides)


# -- TTHeader through the tests' own codec --------------------------------------------------------


def tt_call(
    protocol: str = "binary",
    method: str = "echo",
    *,
    seqid: int = 7,
    str_kv: dict[str, str] | None = None,
    int_kv: dict[int, str] | None = None,
    **args: Any,
) -> bytes:
    """A TTHeader request frame carrying a call, built by tests/ttheader.py."""
    return ttheader.encode(
        ttheader.TTHeader(
            payload=encode(protocol, method, seqid, **args),
            seqid=seqid,
            protocol_id=PROTOCOL_IDS[protocol],
            str_kv={k.encode(): v.encode() for k, v in (str_kv or {}).items()},
            int_kv={k: v.encode() for k, v in (int_kv or {}).items()},
        )
    )


def read_frame(sock: socket.socket) -> bytes:
    """One whole frame (its 4-byte length included) from ``sock``."""
    head = read_exactly(sock, 4)
    (length,) = struct.unpack(">I", head)
    return head + read_exactly(sock, length)


def reply_value(frame: ttheader.TTHeader, method: str = "echo") -> Any:
    """The result (or TApplicationException) in a reply frame's payload."""
    proto = _thrift.COMPACT if frame.protocol_id in (2, 3) else _thrift.BINARY
    name, mtype, seqid, pos = _thrift.read_message_begin(
        proto, frame.payload, 0, len(frame.payload)
    )
    assert name == method
    if mtype == 3:
        cls = kitegreen_app_exception()
    else:
        cls = getattr(testsvc_thrift.TestService, f"{method}_result")
    value = _thrift.read_struct(proto, frame.payload, pos, len(frame.payload), _thrift.compile(cls))
    return (seqid, value if mtype == 3 else value.success)


def kitegreen_app_exception() -> Any:
    from thriftpy2.thrift import TApplicationException

    return TApplicationException


def tt_roundtrip(address: Any, request: bytes) -> ttheader.TTHeader:
    with socket.create_connection(address, timeout=5) as sock:
        sock.sendall(request)
        return ttheader.decode(read_frame(sock))


@pytest.mark.parametrize("protocol", ["binary", "compact"])
class TestTTHeader:
    def test_call_is_answered_in_kind(self, make, protocol):
        """A TTHeader call gets a TTHeader reply with the request's sequence id and protocol
        id, carrying the result."""
        server = make()
        reply = tt_roundtrip(server.address, tt_call(protocol, seqid=41, message="hello"))
        assert (reply.seqid, reply.protocol_id) == (41, PROTOCOL_IDS[protocol])
        assert reply_value(reply) == (41, "hello")

    def test_metadata_reaches_the_handler(self, make, protocol):
        """Caller service and method, log id, the RPC timeout as a deadline, transit and
        persistent metainfo: the handler reads them from request_info()."""
        server = make()
        request = tt_call(
            protocol,
            message="?info",
            int_kv={
                LOG_ID: "20261127-abc",
                FROM_SERVICE: "caller.svc",
                FROM_METHOD: "Do",
                RPC_TIMEOUT: "5000",
            },
            str_kv={
                "RPC_TRANSIT_tenant": "t1",
                "RPC_PERSIST_region": "eu",
                "RPC_TRANSIT_UPSTREAM_x": "y",
            },
        )
        seen = json.loads(reply_value(tt_roundtrip(server.address, request))[1])
        assert seen["header"] == "ttheader"
        assert (seen["caller_service"], seen["caller_method"]) == ("caller.svc", "Do")
        assert seen["log_id"] == "20261127-abc"
        assert 4.0 < seen["remaining"] <= 5.0
        assert seen["transit"] == {"tenant": "t1"}
        assert seen["persistent"] == {"region": "eu"}
        assert seen["real_ip"] == "127.0.0.1"

    def test_response_headers_reach_the_client(self, make, protocol):
        """biz-status, biz-message, biz-extra and backward metainfo set by the handler are in
        the reply's string key-values."""
        server = make()
        reply = tt_roundtrip(server.address, tt_call(protocol, message="?biz"))
        headers = ttheader.texts(reply.str_kv)
        assert headers["biz-status"] == "4001"
        assert headers["biz-message"] == "no such user"
        assert json.loads(headers["biz-extra"]) == {"user": "u1"}
        assert headers["trace"] == "abc"
        assert "crrst" not in headers

    def test_log_id_is_in_the_handlers_log_context(self, make, protocol):
        """While the handler runs, structlog's context carries the request's log id, so its
        own log lines have it; the next request on the connection, without one, does not."""
        server = make()
        with socket.create_connection(server.address, timeout=5) as sock:
            sock.sendall(tt_call(protocol, message="?ctx", int_kv={LOG_ID: "L-7"}))
            first = json.loads(reply_value(ttheader.decode(read_frame(sock)))[1])
            sock.sendall(tt_call(protocol, message="?ctx"))
            second = json.loads(reply_value(ttheader.decode(read_frame(sock)))[1])
        assert first.get("log_id") == "L-7"
        assert "log_id" not in second

    def test_a_spawned_greenlet_keeps_its_requests_log_context(self, make, protocol):
        """A greenlet the handler spawned sees the method and log id of the request that
        spawned it, after the connection has served another request and when it has closed."""
        server = make()
        SPAWNED.clear()
        RELEASE.clear()
        with socket.create_connection(server.address, timeout=5) as sock:
            sock.sendall(tt_call(protocol, message="?spawn", int_kv={LOG_ID: "L-1"}))
            assert reply_value(ttheader.decode(read_frame(sock)))[1] == "spawned"
            sock.sendall(tt_call(protocol, message="?ctx", int_kv={LOG_ID: "L-2"}))
            second = json.loads(reply_value(ttheader.decode(read_frame(sock)))[1])
        RELEASE.set()
        [spawned] = SPAWNED
        assert spawned.get(timeout=5) == {"peer": "127.0.0.1", "method": "echo", "log_id": "L-1"}
        assert second["log_id"] == "L-2"

    def test_the_connections_own_lines_name_no_request(self, make, protocol):
        """What is logged about the connection once its requests are served (its close) does
        not carry the last request's method and log id."""
        server = make()
        with structlog.testing.capture_logs([structlog.contextvars.merge_contextvars]) as logs:
            with socket.create_connection(server.address, timeout=5) as sock:
                sock.sendall(tt_call(protocol, message="x", int_kv={LOG_ID: "L-3"}))
                assert reply_value(ttheader.decode(read_frame(sock)))[1] == "x"
                sock.sendall(b"\x00\x00\x00\x00")  # a frame of length 0: refused
                assert sock.recv(1) == b""
            wait_until(lambda: [e for e in logs if e["event"].startswith("connection closed")])
        [closed] = [e for e in logs if e["event"].startswith("connection closed")]
        assert closed["peer"] == "127.0.0.1"
        assert "method" not in closed
        assert "log_id" not in closed

    def test_log_id_is_in_the_access_log(self, make, protocol):
        """The log id is written in the request's access log line."""
        from structlog.testing import capture_logs

        server = make(access_log=True)
        with capture_logs() as logs:
            tt_roundtrip(server.address, tt_call(protocol, message="x", int_kv={LOG_ID: "L-9"}))
            wait_until(lambda: [e for e in logs if e["event"] == "access"])
        [access] = [e for e in logs if e["event"] == "access"]
        assert access["log_id"] == "L-9"


RIP = {"rip": "203.0.113.9:51234"}
"""What a proxy tells of the client: its address and port."""


class TestRealIp:
    def test_rip_from_an_untrusted_peer_is_ignored(self, make):
        """Without trust, real_ip() stays the TCP peer whatever rip says."""
        server = make()
        seen = json.loads(
            reply_value(tt_roundtrip(server.address, tt_call(message="?info", str_kv=RIP)))[1]
        )
        assert seen["real_ip"] == "127.0.0.1"

    def test_rip_from_a_trusted_proxy_is_the_real_ip(self, make):
        """A TCP peer in trusted_proxies may tell the client's address."""
        server = make(trusted_proxies=("127.0.0.0/8",))
        seen = json.loads(
            reply_value(tt_roundtrip(server.address, tt_call(message="?info", str_kv=RIP)))[1]
        )
        assert seen["real_ip"] == "203.0.113.9"

    def test_rip_in_service_mesh_mode_is_the_real_ip(self, make):
        """In service-mesh mode the sidecar is the only peer, and its rip is trusted."""
        server = make(service_mesh_mode=True, service_mesh_ingress_addr="127.0.0.1:0")
        seen = json.loads(
            reply_value(
                tt_roundtrip(
                    server.address, tt_call(message="?info", str_kv={"rip": "[2001:db8::7]:80"})
                )
            )[1]
        )
        assert seen["real_ip"] == "2001:db8::7"

    def test_trusted_peer_without_rip_is_itself(self, make):
        """A request from a trusted proxy that carries no rip (or a malformed one) shows the
        TCP peer, not the previous request's client."""
        server = make(trusted_proxies=("127.0.0.1/32",))
        with socket.create_connection(server.address, timeout=5) as sock:
            shown = []
            for str_kv in (RIP, {}, {"rip": "not-an-ip"}):
                sock.sendall(tt_call(message="?info", str_kv=str_kv))
                shown.append(
                    json.loads(reply_value(ttheader.decode(read_frame(sock)))[1])["real_ip"]
                )
        assert shown == ["203.0.113.9", "127.0.0.1", "127.0.0.1"]


class TestDeadline:
    def test_deadline_is_readable_but_not_enforced_by_default(self, make):
        """RPC_TIMEOUT 100 ms, a handler taking 300 ms: by default it runs to the end."""
        server = make()
        request = tt_call(method="slow", seconds=0.3, message="done", int_kv={RPC_TIMEOUT: "100"})
        assert reply_value(tt_roundtrip(server.address, request), "slow")[1] == "done"

    def test_enforced_deadline_interrupts_the_handler(self, make):
        """With enforce_rpc_timeout, the same call is cut off at 100 ms: the caller gets a
        TIMEOUT exception saying so, and the metrics count it."""
        server = make(enforce_rpc_timeout=True)
        request = tt_call(method="slow", seconds=2.0, message="done", int_kv={RPC_TIMEOUT: "100"})
        start = time.monotonic()
        _, error = reply_value(tt_roundtrip(server.address, request), "slow")
        assert time.monotonic() - start < 1.0
        assert error.type == TIMEOUT
        assert "RPC timeout" in error.message
        assert server.metrics is not None
        assert server.metrics.methods["slow"].errors["timeout"] == 1

    def test_call_within_its_deadline_is_unaffected(self, make):
        """enforce_rpc_timeout leaves a call that finishes in time alone, and calls without a
        timeout header too."""
        server = make(enforce_rpc_timeout=True)
        quick = tt_call(method="slow", seconds=0.01, message="ok", int_kv={RPC_TIMEOUT: "2000"})
        assert reply_value(tt_roundtrip(server.address, quick), "slow")[1] == "ok"
        plain = tt_call(method="slow", seconds=0.01, message="ok")
        assert reply_value(tt_roundtrip(server.address, plain), "slow")[1] == "ok"

    @pytest.mark.parametrize("timeout", ["\u00b2", "\u0661\u0660\u0660", "-5", "1e3", ""])
    def test_a_timeout_that_is_not_ascii_digits_is_no_deadline(self, make, timeout):
        """An RPC_TIMEOUT that is not a decimal number of milliseconds in ASCII digits ('²',
        Arabic-Indic digits, a sign, an exponent) is ignored: the call is served, not
        answered as a handler's panic nor ended with the connection."""
        server = make(enforce_rpc_timeout=True)
        request = tt_call(method="slow", seconds=0.01, message="ok", int_kv={RPC_TIMEOUT: timeout})
        assert reply_value(tt_roundtrip(server.address, request), "slow")[1] == "ok"
        assert server.metrics is not None
        assert server.metrics.panics == 0


class TestHandoverAtStop:
    def test_replies_sent_after_stop_began_carry_crrst(self, make):
        """A call in flight when stop() begins is answered with crrst=1, telling a Kitex
        client not to send on that connection again; a reply before the stop has none."""
        server = make(exit_wait_time=5.0)
        with socket.create_connection(server.address, timeout=5) as sock:
            sock.sendall(tt_call(message="before"))
            before = ttheader.decode(read_frame(sock))
            sock.sendall(tt_call(method="slow", seconds=0.5, message="during"))
            wait_until(lambda: server.overload()["conn_busy"] == 1, 2.0, what="the slow call")
            stopper = gevent.spawn(server.stop)
            during = ttheader.decode(read_frame(sock))
            assert stopper.get(timeout=5) is True
        assert "crrst" not in ttheader.texts(before.str_kv)
        assert ttheader.texts(during.str_kv)["crrst"] == "1"
        assert reply_value(during, "slow")[1] == "during"


# -- THeader through Apache Thrift's own client ---------------------------------------------------


@contextlib.contextmanager
def apache_header_client(
    address: Any, protocol: str, zlib: bool, *, framed: bool = False
) -> Iterator[tuple[Any, Any]]:
    """Apache's THeader client; ``framed`` puts it over a TFramedTransport, as Apache's
    cross-test does for its ``header`` protocol on the ``framed`` transport."""
    sock = TSocket.TSocket(address[0], address[1])
    sock.setTimeout(5000)
    subprotocol = (
        THeaderSubprotocolID.BINARY if protocol == "binary" else THeaderSubprotocolID.COMPACT
    )
    under = TTransport.TFramedTransport(sock) if framed else sock
    proto = THeaderProtocol(under, [THeaderClientType.HEADERS], default_protocol=subprotocol)
    if zlib:
        proto.trans.add_transform(THeaderTransformID.ZLIB)
    client = ApacheService.Client(proto)
    sock.open()
    try:
        yield client, proto
    finally:
        sock.close()


@pytest.mark.parametrize("protocol", ["binary", "compact"])
@pytest.mark.parametrize("zlib", [False, True], ids=["plain", "zlib"])
class TestTHeader:
    def test_apache_header_client_is_served(self, make, protocol, zlib):
        """Apache Thrift's THeader client, binary or compact inside, with or without zlib:
        calls of every shape come back right."""
        from testsvc.ttypes import Item

        server = make()
        with apache_header_client(server.address, protocol, zlib) as (client, _):
            assert client.echo("héllo") == "héllo"
            assert client.add(2, 40) == 42
            item = Item(id=1, name="n", tags=["a"], counts={"k": 2**40}, child=None)
            assert client.roundtrip(item) == item
            with pytest.raises(ApacheAppError) as refused:
                client.raise_undeclared("boom")
            assert refused.value.type == ApacheAppError.INTERNAL_ERROR

    def test_headers_reach_the_handler_and_back(self, make, protocol, zlib):
        """THeader key-values are the handler's request_info().headers, fbthrift's
        client_timeout its deadline; headers it sets come back to the client."""
        server = make()
        with apache_header_client(server.address, protocol, zlib) as (client, proto):
            proto.trans.set_header(b"client_timeout", b"3000")
            proto.trans.set_header(b"User-Agent", b"pytest")
            seen = json.loads(client.echo("?info"))
            assert seen["header"] == "theader"
            assert seen["headers"]["User-Agent"] == "pytest"
            assert 2.0 < seen["remaining"] <= 3.0
            client.echo("?biz")
            back = proto.trans.get_headers()
            assert back[b"biz-status"] == b"4001"
            assert back[b"trace"] == b"abc"


# -- interop with gopkg's TTHeader codec and Apache's cross-test client ---------------------------


class TestInterop:
    """The four gaps Kitex's own TTHeader codec (cloudwego/gopkg protocol/ttheader) and Apache's
    cross-test client found (issue 17)."""

    def test_acl_token_is_the_transient_gdpr_token(self, make):
        """gopkg writes the metainfo value ``gdpr-token`` as the 0x11 ACL token block; the
        handler sees it where a Kitex server does: transient ``gdpr-token``, and the string
        header ``RPC_TRANSIT_gdpr-token``."""
        server = make()
        request = ttheader.encode(
            ttheader.TTHeader(
                payload=encode("binary", "echo", 3, message="?info"),
                seqid=3,
                acl_token=b"tok-123",
                str_kv={b"RPC_TRANSIT_tenant": b"t1"},
            )
        )
        assert request[16:19] == b"\x11\x00\x07"  # the ACL block comes first, as gopkg's
        seen = json.loads(reply_value(tt_roundtrip(server.address, request))[1])
        assert seen["transit"] == {"tenant": "t1", "gdpr-token": "tok-123"}
        assert seen["headers"]["RPC_TRANSIT_gdpr-token"] == "tok-123"

    @pytest.mark.parametrize("protocol_id", [2, 3], ids=["compact-2", "compact-v2-3"])
    def test_compact_ids_are_served_and_repeated(self, make, protocol_id):
        """Compact under TTHeader comes as id 3 from gopkg (its decoder refuses 2) and as 2
        from Apache-derived peers: both are served, and the reply carries the request's id, so
        gopkg's decoder reads a reply to an id-3 request."""
        server = make()
        request = ttheader.encode(
            ttheader.TTHeader(
                payload=encode("compact", "echo", 9, message="v2"),
                seqid=9,
                protocol_id=protocol_id,
            )
        )
        reply = tt_roundtrip(server.address, request)
        assert reply.protocol_id == protocol_id
        assert reply_value(reply) == (9, "v2")

    @pytest.mark.parametrize("protocol", ["binary", "compact"])
    def test_theader_inside_a_framed_frame(self, make, protocol):
        """Apache's THeader client over a framed transport (``[frame length][THeader length]
        [0x0FFF ...]``) is served, replies framed the same way, headers both ways."""
        server = make()
        with apache_header_client(server.address, protocol, False, framed=True) as (client, p):
            assert client.echo("nested") == "nested"
            assert client.add(40, 2) == 42
            p.trans.set_header(b"client_timeout", b"3000")  # sent with the next call only
            seen = json.loads(client.echo("?info"))
            assert seen["header"] == "theader"
            assert 2.0 < seen["remaining"] <= 3.0
            client.echo("?biz")
            assert p.trans.get_headers()[b"biz-status"] == b"4001"

    def test_theader_inside_a_framed_frame_raw_bytes(self, make):
        """The bytes on the wire: an outer length 4 more than the THeader frame's own, both
        ways."""
        server = make()
        inner = th_request()
        with socket.create_connection(server.address, timeout=5) as sock:
            sock.sendall(struct.pack(">I", len(inner)) + inner)
            outer = read_frame(sock)
        (length,) = struct.unpack(">I", outer[4:8])
        assert length == len(outer) - 8
        assert outer[8:10] == b"\x0f\xff"

    def test_a_wait_for_the_decode_lane_ended_by_the_deadline_is_a_timeout(self, make):
        """A large request (decoded off the hub, one at a time) whose turn does not come before
        the caller's deadline is answered TIMEOUT, not LOADSHEDDING: the caller gave up."""
        server = make()
        # The lane busy, as with another large message being decoded.
        turn = server.engine._ctx.decode_lane._turn
        assert turn.acquire(blocking=False)
        large = "x" * (256 * 1024)  # over OFFLOAD_SIZE
        try:
            with apache_header_client(server.address, "binary", False) as (client, p):
                p.trans.set_header(b"client_timeout", b"100")
                with pytest.raises(ApacheAppError) as info:
                    client.echo(large)
                assert info.value.type == TIMEOUT
                assert "RPC timeout" in info.value.message
        finally:
            turn.release()
        with apache_header_client(server.address, "binary", False) as (client, p):
            p.trans.set_header(b"client_timeout", b"5000")
            assert client.echo(large) == large

    @pytest.mark.parametrize("inflight", [64 * 1024, 32 * 1024 * 1024])
    def test_a_zlib_payload_inflating_past_the_memory_budget_is_answered(self, make, inflight):
        """A THeader zlib payload that inflates past what the message may take is answered
        (PROTOCOL_ERROR naming max_message_memory; LOADSHEDDING naming max_inflight_memory
        when that is what the process has left), no longer closed without a reply; what was
        reserved to inflate it is given back."""
        server = make(max_message_memory=64 * 1024, max_inflight_memory=inflight)
        memory = server.engine._ctx.memory
        if inflight > 64 * 1024:
            memory.hold(inflight - 32 * 1024)  # as if requests in flight held all but 32 KiB
        with apache_header_client(server.address, "binary", True) as (client, _):
            with pytest.raises(ApacheAppError) as info:
                client.echo("x" * (100 * 1024))
            if inflight > 64 * 1024:
                assert info.value.type == 11  # LOADSHEDDING
                assert "max_inflight_memory" in info.value.message
                memory.release(inflight - 32 * 1024)
            else:
                assert info.value.type == ApacheAppError.PROTOCOL_ERROR
                assert "max_message_memory" in info.value.message
            assert client.echo("small") == "small"
        assert wait_until(lambda: memory.held == 0)

    def test_theader_inside_a_framed_frame_sizes_in_the_access_log(self, make):
        """The access log counts both lengths of a nested frame, the outer one included, in
        request_bytes, as reply_bytes counts those of the reply."""
        from structlog.testing import capture_logs

        server = make(access_log=True)
        inner = th_request()
        with capture_logs() as logs:
            with socket.create_connection(server.address, timeout=5) as sock:
                sock.sendall(struct.pack(">I", len(inner)) + inner)
                outer = read_frame(sock)
            assert wait_until(lambda: any(e["event"] == "access" for e in logs))
        (entry,) = [e for e in logs if e["event"] == "access"]
        assert (entry["request_bytes"], entry["reply_bytes"]) == (len(inner) + 4, len(outer))

    @pytest.mark.parametrize("method", ["echo", "raise_undeclared"])
    def test_replies_carry_the_message_type(self, make, method):
        """Like Kitex's server, every TTHeader reply carries integer key 22 (MSG_TYPE): 2 for
        a reply, 3 for an exception."""
        server = make()
        reply = tt_roundtrip(server.address, tt_call(method=method, message="x"))
        expected = b"2" if method == "echo" else b"3"
        assert reply.int_kv == {22: expected}


# -- hostile headers ------------------------------------------------------------------------------


def th_request() -> bytes:
    """A valid THeader echo call, written by Apache's THeaderProtocol into memory."""
    from thrift.transport.TTransport import TMemoryBuffer

    buffer = TMemoryBuffer()
    proto = THeaderProtocol(buffer, [THeaderClientType.HEADERS])
    client = ApacheService.Client(proto)
    client.send_echo("x")
    return bytes(buffer.getvalue())


def lying(kind: str) -> bytes:
    """A header frame that lies about a size or count, or is cut short."""
    payload = encode("binary", "echo", 1, message="x")
    if kind == "header size beyond the frame":
        return ttheader.assemble(ttheader.MAGIC, b"\x00\x00\x00\x00", payload, words=0x4000)
    if kind == "string count beyond the bytes":
        return ttheader.assemble(ttheader.MAGIC, b"\x00\x00\x01\xff\xff\x00\x00\x00", payload)
    if kind == "string length beyond the bytes":
        return ttheader.assemble(ttheader.MAGIC, b"\x00\x00\x01\x00\x01\xff\xff\x00", payload)
    if kind == "unknown info id":
        return ttheader.assemble(ttheader.MAGIC, b"\x00\x00\x42\x00", payload)
    if kind == "unknown protocol id":
        return ttheader.assemble(ttheader.MAGIC, b"\x09\x00\x00\x00", payload)
    if kind == "length beyond max_frame_size":
        return ttheader.assemble(ttheader.MAGIC, b"\x00\x00\x00\x00", payload, length=1 << 30)
    if kind == "truncated header":
        return ttheader.assemble(ttheader.MAGIC, b"\x00\x00", b"")
    if kind == "THeader varint past 32 bits":
        return ttheader.assemble(0x0FFF, b"\xff\xff\xff\xff\xff\x01\x00\x00", payload)
    if kind == "THeader zlib that does not inflate":
        return ttheader.assemble(0x0FFF, b"\x00\x01\x01\x00", b"not zlib at all")
    if kind == "framed THeader whose inner length is wrong":
        inner = th_request()
        return struct.pack(">I", len(inner) + 1) + inner + b"\x00"
    if kind == "framed THeader with a lying header":
        inner = ttheader.assemble(0x0FFF, b"\x00\x00\x01\x80", payload)
        return struct.pack(">I", len(inner)) + inner
    raise AssertionError(kind)


HOSTILE = [
    "header size beyond the frame",
    "string count beyond the bytes",
    "string length beyond the bytes",
    "unknown info id",
    "unknown protocol id",
    "length beyond max_frame_size",
    "truncated header",
    "THeader varint past 32 bits",
    "THeader zlib that does not inflate",
    "framed THeader whose inner length is wrong",
    "framed THeader with a lying header",
]


class TestHostileHeaders:
    @pytest.mark.parametrize("kind", HOSTILE)
    def test_malformed_header_closes_at_once_while_others_are_served(self, make, kind):
        """Each lie is refused within 100 ms with the connection closed, nothing sent back,
        while a client on another connection is answered."""
        server = make(max_frame_size=1 << 20)
        with (
            socket.create_connection(server.address, timeout=5) as probe,
            socket.create_connection(server.address, timeout=5) as attacker,
        ):
            start = time.monotonic()
            attacker.sendall(lying(kind))
            probe.sendall(tt_call(message="still here"))
            assert reply_value(ttheader.decode(read_frame(probe)))[1] == "still here"
            assert attacker.recv(1) == b""
            assert time.monotonic() - start < 0.1
        with socket.create_connection(server.address, timeout=5) as again:
            again.sendall(th_request())
            assert read_frame(again)[4:6] == b"\x0f\xff"
