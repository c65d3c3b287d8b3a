"""Hostile peers, on real sockets against in-process servers on 127.0.0.1.

Every attack is made with a raw socket and hand-made or corrupted Thrift bytes, on each of the
four wires kitegreen detects. After each one the test checks the outcome the attacker got (an
exception reply where the protocol can carry one, otherwise the connection closed, within a
bounded time) and that well-behaved clients, thriftpy2's and Apache Thrift's, are still served
on new connections. Replies are decoded with Apache Thrift's codecs, an implementation
independent of the server's. Resource checks read the process itself: open file descriptors
from /proc/self/fd, memory from /proc/self/status, greenlets from the garbage collector.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import os
import socket
import struct
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import gevent
import greenlet
import pytest
import structlog
from clients import WIRES, apache_client, thriftpy2_client
from conftest import Handler, loopback_config, testsvc_thrift, wait_until
from gevent.event import Event
from gevent.pool import Pool
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from structlog.testing import capture_logs
from testsvc import TestService as ApacheTestService
from thrift.protocol import TBinaryProtocol
from thrift.protocol import TCompactProtocol as ApacheCompact
from thrift.Thrift import TApplicationException
from thrift.transport import TTransport
from thriftpy2.thrift import TApplicationException as Py2ApplicationException
from wire import (
    CALL,
    EXCEPTION,
    INT32_MAX,
    ONEWAY,
    REPLY,
    encode,
    head,
    sample_item,
    server_wire,
    varint,
    wrap,
)

import kitegreen
from kitegreen.rpc.dispatch import Dispatcher

_WORK_CODE = Dispatcher._work.__code__
T_STOP, T_I32, T_STRING, T_STRUCT, T_MAP, T_LIST = 0, 8, 11, 12, 13, 15
C_STOP, C_I32, C_BINARY, C_LIST, C_MAP, C_STRUCT = 0x00, 0x05, 0x08, 0x09, 0x0B, 0x0C
STOP = b"\x00"
DEPTH = 10_000
MIB = 1 << 20
LOADSHEDDING = 11
LOOPBACK = "127.0.0.1"
WIRE_IDS = [f"{protocol}-{transport}" for protocol, transport in WIRES]

RW = 0.5
"""read_write_timeout of the servers most attacks are made on."""

GARBAGE = {
    "http": b"GET / HTTP/1.1\r\nHost: kitegreen\r\n\r\n",
    "tls-client-hello": bytes.fromhex("16030100c4010000c00303") + bytes(32),
    "proxy-protocol": b"PROXY TCP4 127.0.0.1 127.0.0.1 40000 8888\r\n",
    "non-strict-binary": struct.pack("!i", 4) + b"ping" + b"\x01" + struct.pack("!i", 1) + STOP,
    "zeros": bytes(64),
    "ones": b"\xff" * 64,
}


# -- encoding -------------------------------------------------------------------------------------


def bfield(ttype: int, fid: int) -> bytes:
    return struct.pack("!bh", ttype, fid)


def cfield(ctype: int, delta: int) -> bytes:
    return bytes([(delta << 4) | ctype])


def huge_string(protocol: str, length: int = INT32_MAX) -> bytes:
    """echo(message) whose length field says ``length``, followed by three bytes."""
    if protocol == "binary":
        return head(protocol, "echo") + bfield(T_STRING, 1) + struct.pack("!i", length) + b"abc"
    return head(protocol, "echo") + cfield(C_BINARY, 1) + varint(length) + b"abc"


def huge_list(protocol: str, where: str) -> bytes:
    """A list announcing 2**31-1 elements, followed by a dozen bytes of them.

    ``skipped``: a list<i32> in a field add() does not declare (the skip path);
    ``decoded``: Item.tags, a list<string>, in roundtrip() (the decoding path).
    """
    if protocol == "binary":
        if where == "skipped":
            return (
                head(protocol, "add")
                + bfield(T_LIST, 3)
                + struct.pack("!bi", T_I32, INT32_MAX)
                + bytes(12)
            )
        return (
            head(protocol, "roundtrip")
            + bfield(T_STRUCT, 1)
            + bfield(T_LIST, 3)
            + struct.pack("!bi", T_STRING, INT32_MAX)
            + bytes(12)
        )
    if where == "skipped":
        return (
            head(protocol, "add")
            + cfield(C_LIST, 3)
            + bytes([0xF0 | C_I32])
            + varint(INT32_MAX)
            + b"\x02" * 12
        )
    return (
        head(protocol, "roundtrip")
        + cfield(C_STRUCT, 1)
        + cfield(C_LIST, 3)
        + bytes([0xF0 | C_BINARY])
        + varint(INT32_MAX)
        + bytes(12)
    )


def deep_structs(protocol: str) -> bytes:
    """roundtrip(Item(child=Item(child=...))), DEPTH structs deep."""
    if protocol == "binary":
        nest = bfield(T_STRUCT, 1) + bfield(T_STRUCT, 5) * (DEPTH - 1)
    else:
        nest = cfield(C_STRUCT, 1) + cfield(C_STRUCT, 5) * (DEPTH - 1)
    return head(protocol, "roundtrip") + nest + STOP * (DEPTH + 1)


def deep_lists(protocol: str) -> bytes:
    """ping() with an undeclared field holding list<list<...<i32>>>, DEPTH lists deep."""
    if protocol == "binary":
        nest = (
            bfield(T_LIST, 9)
            + (bytes([T_LIST]) + struct.pack("!i", 1)) * (DEPTH - 1)
            + bytes([T_I32])
            + struct.pack("!i", 0)
        )
    else:
        nest = cfield(C_LIST, 9) + bytes([0x10 | C_LIST]) * (DEPTH - 1) + bytes([C_I32])
    return head(protocol, "ping") + nest + STOP


def bad_version(protocol: str) -> bytes:
    """A ping with protocol version 2: ``80 02`` in binary, version bits 2 in compact."""
    ping = encode(protocol, "ping")
    if protocol == "binary":
        return b"\x80\x02" + ping[2:]
    return ping[:1] + bytes([(ping[1] & 0xE0) | 2]) + ping[2:]


def zero_width_bomb(protocol: str, shape: str, etype: int, count: int) -> bytes:
    """A container of ``count`` elements of a type that occupies no bytes when skipped."""
    if protocol == "binary":
        if shape == "undeclared-list":
            return (
                head(protocol, "ping") + bfield(T_LIST, 9) + struct.pack("!bi", etype, count) + STOP
            )
        return (
            head(protocol, "roundtrip")
            + bfield(T_STRUCT, 1)
            + bfield(T_LIST, 3)
            + struct.pack("!bi", etype, count)
            + STOP
            + STOP
        )
    if shape == "undeclared-list":
        return (
            head(protocol, "ping")
            + cfield(C_LIST, 9)
            + bytes([0xF0 | etype])
            + varint(count)
            + STOP
        )
    return (
        head(protocol, "roundtrip")
        + cfield(C_STRUCT, 1)
        + cfield(C_MAP, 4)
        + varint(count)
        + bytes([(etype << 4) | etype])
        + STOP
        + STOP
    )


def hostile_inputs(protocol: str, transport: str) -> list[tuple[str, bytes, bool]]:
    """Every attack on one wire: ``(name, bytes, whether the attacker then ends its input)``."""

    def w(message: bytes) -> bytes:
        return wrap(transport, message)

    ping = encode(protocol, "ping")
    whole = w(encode(protocol, "roundtrip", item=sample_item()))
    inputs = [
        ("string length 2**31-1", w(huge_string(protocol)), False),
        ("list of 2**31-1 elements, skipped", w(huge_list(protocol, "skipped")), False),
        ("list of 2**31-1 elements, decoded", w(huge_list(protocol, "decoded")), False),
        ("structs 10000 deep", w(deep_structs(protocol)), False),
        ("lists 10000 deep", w(deep_lists(protocol)), False),
        ("protocol version 2", w(bad_version(protocol)), False),
        ("REPLY sent to the server", w(head(protocol, "ping", REPLY) + STOP), False),
        ("EXCEPTION sent to the server", w(head(protocol, "ping", EXCEPTION) + STOP), False),
        ("message type 7", w(head(protocol, "ping", 7) + STOP), False),
        ("unknown method", w(head(protocol, "no_such_method") + STOP), False),
        ("half a request", whole[: len(whole) // 2], True),
    ]
    if protocol == "binary":
        negative = (
            head(protocol, "echo_binary") + bfield(T_STRING, 1) + struct.pack("!i", -1) + STOP
        )
        inputs.append(("negative string length", w(negative), False))
    if transport == "framed":
        inputs += [
            ("frame length max_frame_size + 1", struct.pack("!i", MIB + 1) + ping, False),
            ("frame length 4 x max_frame_size", struct.pack("!i", 4 * MIB) + ping, False),
            ("zero frame length", struct.pack("!i", 0) + ping, False),
        ]
    else:
        inputs.append(("not Thrift (HTTP)", GARBAGE["http"], False))
    return inputs


# -- decoding replies with Apache Thrift ----------------------------------------------------------


@dataclass
class Message:
    raw_name: bytes
    mtype: int
    seqid: int
    body: Any

    @property
    def name(self) -> str:
        return self.raw_name.decode("utf-8", "replace")


@dataclass
class Outcome:
    """What an attacker saw: whole messages, bytes that are not one, and whether it was closed."""

    messages: list[Message]
    leftover: bytes
    closed: bool
    elapsed: float
    received: int = 0

    def __repr__(self) -> str:
        kinds = [(m.name, m.mtype, getattr(m.body, "type", None)) for m in self.messages]
        return (
            f"Outcome(messages={kinds}, leftover={self.leftover[:40]!r}, closed={self.closed},"
            f" elapsed={self.elapsed:.2f}s)"
        )


class _ExactBuffer(TTransport.TMemoryBuffer):  # type: ignore[misc]
    """Apache's memory transport, raising EOFError on a short read: the message is not whole."""

    def read(self, sz: int) -> bytes:
        data: bytes = super().read(sz)
        if len(data) < sz:
            raise EOFError(f"{sz - len(data)} bytes short")
        return data


class _LenientStrings:
    """String fields decoded leniently: a handler echoing a fuzzer's invalid UTF-8 back is the
    handler's business; what is checked here is that replies are whole messages."""

    def readString(self) -> str:
        raw: bytes = self.readBinary()  # type: ignore[attr-defined]
        return raw.decode("utf-8", "replace")


class _Binary(_LenientStrings, TBinaryProtocol.TBinaryProtocol):  # type: ignore[misc]
    pass


class _Compact(_LenientStrings, ApacheCompact.TCompactProtocol):  # type: ignore[misc]
    pass


def read_header(data: bytes, protocol: str) -> tuple[bytes, int, int, int]:
    """A message header by hand: ``(name bytes, type, seqid, header length)``.

    By hand so that a name that is not UTF-8 is seen as such rather than failing the decode.
    """

    def need(n: int) -> None:
        if len(data) < n:
            raise EOFError(f"{n - len(data)} bytes short")

    if protocol == "binary":
        need(8)
        version, mtype, size = struct.unpack("!HHi", data[:8])
        assert version == 0x8001, f"not a strict binary message: {data[:8]!r}"
        assert size >= 0, f"negative name length {size}"
        need(8 + size + 4)
        (seqid,) = struct.unpack("!i", data[8 + size : 12 + size])
        return data[8 : 8 + size], mtype, seqid, 12 + size
    need(2)
    assert data[0] == 0x82, f"not a compact message: {data[:2]!r}"
    assert data[1] & 0x1F == 1, f"compact version {data[1] & 0x1F}"
    pos = 2
    numbers = []
    for _ in range(2):
        value = shift = 0
        while True:
            need(pos + 1)
            byte = data[pos]
            pos += 1
            value |= (byte & 0x7F) << shift
            shift += 7
            if byte < 0x80:
                break
        numbers.append(value)
    seqid, size = numbers
    need(pos + size)
    seqid = seqid - (1 << 32) if seqid > INT32_MAX else seqid
    return data[pos : pos + size], data[1] >> 5, seqid, pos + size


def decode_one(data: bytes, protocol: str) -> tuple[Message, int]:
    """The message at the start of ``data`` (its body read by Apache Thrift), and its length."""
    raw_name, mtype, seqid, used = read_header(data, protocol)
    trans = _ExactBuffer(data, used)
    proto: Any = _Binary(trans) if protocol == "binary" else _Compact(trans)
    body: Any
    if mtype == EXCEPTION:
        body = TApplicationException()
    elif mtype == REPLY:
        body = getattr(ApacheTestService, f"{raw_name.decode()}_result")()
    else:
        raise AssertionError(f"the server sent a message of type {mtype}")
    body.read(proto)
    return Message(raw_name, mtype, seqid, body), trans.cstringio_buf.tell()


def parse_replies(data: bytes, protocol: str, transport: str) -> tuple[list[Message], bytes]:
    """The whole messages at the start of ``data``, and what is left after them."""
    messages = []
    while data:
        if transport == "framed":
            if len(data) < 4:
                break
            (size,) = struct.unpack("!i", data[:4])
            if len(data) < 4 + size:
                break
            message, used = decode_one(data[4 : 4 + size], protocol)
            assert used == size, f"a {size}-byte frame holds {used} bytes of message"
            data = data[4 + size :]
        else:
            try:
                message, used = decode_one(data, protocol)
            except EOFError:
                break
            data = data[used:]
        messages.append(message)
    return messages, data


# -- sockets --------------------------------------------------------------------------------------


@contextlib.contextmanager
def connection(address: Any, *, timeout: float = 5.0, rcvbuf: int = 0) -> Iterator[socket.socket]:
    """A raw TCP connection, always closed."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        if rcvbuf:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.settimeout(timeout)
        sock.connect(address)
        yield sock
    finally:
        sock.close()


def send_quietly(sock: socket.socket, data: bytes) -> bool:
    """Send ``data``; False if the server had already closed the connection."""
    try:
        sock.sendall(data)
    except (BrokenPipeError, ConnectionResetError):
        return False
    return True


def end_input(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_WR)


def arm_reset(sock: socket.socket) -> None:
    """Make the coming close() send a RST instead of a FIN."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


def read_outcome(
    sock: socket.socket, protocol: str, transport: str, *, timeout: float, want: int | None = None
) -> Outcome:
    """Read until ``want`` whole messages arrived, the server closed, or ``timeout`` passed."""
    start = time.monotonic()
    deadline = start + timeout
    data = b""
    closed = False
    while True:
        if want is not None and len(parse_replies(data, protocol, transport)[0]) >= want:
            break
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        sock.settimeout(remaining)
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            break
        except ConnectionResetError:
            closed = True
            break
        if not chunk:
            closed = True
            break
        data += chunk
    messages, leftover = parse_replies(data, protocol, transport)
    return Outcome(messages, leftover, closed, time.monotonic() - start, len(data))


def closed_within(sock: socket.socket, wait: float) -> bool:
    """Whether the server closes the connection within ``wait`` seconds; it must not reply."""
    sock.settimeout(wait)
    try:
        chunk = sock.recv(1)
    except TimeoutError:
        return False
    except ConnectionResetError:
        return True
    assert not chunk, f"the server replied {chunk!r} to a request it cannot have received"
    return True


def attack(
    server: kitegreen.RpcServer,
    wire: tuple[str, str],
    payload: bytes,
    *,
    timeout: float,
    want: int | None = None,
    eof: bool = False,
) -> Outcome:
    """Send ``payload`` on a new connection and see what comes back."""
    protocol, transport = wire
    with connection(server.address) as sock:
        if send_quietly(sock, payload) and eof:
            end_input(sock)
        return read_outcome(sock, protocol, transport, timeout=timeout, want=want)


def assert_exception(outcome: Outcome, kind: int, name: str | None = None) -> None:
    assert outcome.messages, f"expected an exception reply of type {kind}, got {outcome}"
    message = outcome.messages[0]
    assert message.mtype == EXCEPTION, outcome
    assert message.body.type == kind, (
        f"expected exception type {kind}, got {message.body.type}: {message.body.message}"
    )
    if name is not None:
        assert message.name == name
    assert outcome.leftover == b"", f"half a message on the wire: {outcome.leftover[:60]!r}"


def assert_closed(outcome: Outcome, within: float) -> None:
    assert outcome.closed, f"the connection was still open after {outcome.elapsed:.2f}s: {outcome}"
    assert outcome.elapsed <= within, f"closed only after {outcome.elapsed:.2f}s: {outcome}"
    assert outcome.leftover == b"", f"half a message on the wire: {outcome.leftover[:60]!r}"


def assert_served(
    server: kitegreen.RpcServer, protocol: str = "binary", transport: str = "buffered"
) -> None:
    """Both real clients get answers on new connections."""
    with thriftpy2_client(testsvc_thrift.TestService, server.address, protocol, transport) as c:
        assert c.echo("still served") == "still served"
    with apache_client(server.address, protocol, transport) as c:
        assert c.add(20, 22) == 42


# -- resources ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Usage:
    fds: int
    greenlets: int
    connections: int

    def within(self, baseline: Usage) -> bool:
        return (
            self.fds <= baseline.fds
            and self.greenlets <= baseline.greenlets
            and self.connections <= baseline.connections
        )


def _parked_worker(g: greenlet.greenlet) -> bool:
    """A warm worker waiting for its next connection: kept on purpose (at most
    ``dispatch.KEEP_WARM``), serving nobody; one that serves a connection is counted."""
    frame = g.gr_frame
    return frame is not None and frame.f_code is _WORK_CODE


def usage(server: kitegreen.RpcServer) -> Usage:
    greenlets = sum(
        1 for o in gc.get_objects() if isinstance(o, greenlet.greenlet) and not _parked_worker(o)
    )
    return Usage(len(os.listdir("/proc/self/fd")), greenlets, server.overload()["conn_now"])


def settled(server: kitegreen.RpcServer, baseline: Usage, timeout: float = 5.0) -> Usage:
    """Poll until the server is back to ``baseline`` (failing after ``timeout``); the last
    reading."""
    wait_until(
        lambda: usage(server).within(baseline),
        timeout,
        what=lambda: f"descriptors, greenlets and connections back to {baseline}: {usage(server)}",
    )
    return usage(server)


def status_kb(key: str) -> int:
    """A figure from /proc/self/status, in kB (VmRSS, VmSize)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise AssertionError(f"{key} is not in /proc/self/status")


def debug_lines(logs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in logs if e.get("log_level") == "debug" and e.get("peer") == LOOPBACK]


def http_get(url: str, timeout: float = 3.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return int(response.status), response.read()
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, exc.read()


# -- fixtures -------------------------------------------------------------------------------------


def _drop(_logger: Any, _method: str, _event: Any) -> Any:
    raise structlog.DropEvent


@pytest.fixture(scope="module", autouse=True)
def _debug_logging() -> Iterator[None]:
    """Every level reaches capture_logs(); nothing is printed otherwise."""
    saved = structlog.get_config()
    structlog.configure(
        processors=[_drop],
        wrapper_class=structlog.make_filtering_bound_logger(logging.DEBUG),
        cache_logger_on_first_use=False,
    )
    yield
    structlog.configure(**saved)


@pytest.fixture(autouse=True)
def no_greenlet_crashes(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """Fail a test if any greenlet died of an uncaught exception while it ran."""
    hub = gevent.get_hub()
    crashes: list[str] = []
    report = hub.handle_error

    def record(context: Any, kind: Any, value: Any, tb: Any) -> None:
        crashes.append(f"{context!r}: {getattr(kind, '__name__', kind)}: {value}")
        report(context, kind, value, tb)

    monkeypatch.setattr(hub, "handle_error", record)
    yield crashes
    assert not crashes, f"greenlets crashed: {crashes}"


@pytest.fixture
def target(make_server: Callable[..., kitegreen.RpcServer]) -> kitegreen.RpcServer:
    """The server most attacks are made on: short read_write_timeout, 1 MiB max_frame_size."""
    return make_server(read_write_timeout=RW, max_frame_size=MIB, idle_timeout=30.0)


@pytest.fixture(scope="module")
def fuzz_server(_debug_logging: None) -> Iterator[kitegreen.RpcServer]:
    server = kitegreen.RpcServer(
        testsvc_thrift.TestService,
        Handler(),
        loopback_config(read_write_timeout=1.0, max_frame_size=256 * 1024, idle_timeout=5.0),
    )
    server.start()
    yield server
    server.stop(timeout=2.0)


# -- hostile input --------------------------------------------------------------------------------


class TestNotThrift:
    @pytest.mark.parametrize("sample", sorted(GARBAGE))
    def test_bytes_that_are_not_thrift_are_refused_at_once(self, target, sample):
        """HTTP, TLS, PROXY, non-strict binary, zeros, 0xff: the connection is closed, no reply."""
        outcome = attack(target, ("binary", "buffered"), GARBAGE[sample], timeout=RW + 2)
        assert_closed(outcome, within=1.0)
        assert outcome.received == 0
        assert_served(target)


@pytest.mark.parametrize(("protocol", "transport"), WIRES, ids=WIRE_IDS)
class TestHostileInput:
    def test_half_a_request_then_end_of_input_closes(self, target, protocol, transport):
        """A request cut in the middle, then EOF: closed, nothing sent back."""
        whole = wrap(transport, encode(protocol, "roundtrip", item=sample_item()))
        for cut in (1, 5, len(whole) // 2, len(whole) - 1):
            outcome = attack(target, (protocol, transport), whole[:cut], timeout=RW + 2, eof=True)
            assert_closed(outcome, within=1.0)
            assert not outcome.messages
        assert_served(target, protocol, transport)

    def test_string_length_2_31_minus_1(self, target, protocol, transport):
        """A string announcing 2**31-1 bytes: PROTOCOL_ERROR where the stream shows it at once,
        otherwise the connection is closed within read_write_timeout."""
        outcome = attack(
            target, (protocol, transport), wrap(transport, huge_string(protocol)), timeout=RW + 2
        )
        if transport == "buffered" or outcome.messages:
            assert_exception(outcome, TApplicationException.PROTOCOL_ERROR, name="echo")
        assert_closed(outcome, within=RW + 1.5)
        assert_served(target, protocol, transport)

    @pytest.mark.parametrize("where", ["skipped", "decoded"])
    def test_list_announcing_2_31_minus_1_elements_with_few_bytes(
        self, target, protocol, transport, where
    ):
        """Nothing is reserved for the announced elements; the connection is closed (or gets
        PROTOCOL_ERROR) within read_write_timeout, and memory does not grow."""
        rss = status_kb("VmRSS")
        outcome = attack(
            target,
            (protocol, transport),
            wrap(transport, huge_list(protocol, where)),
            timeout=RW + 2,
        )
        if outcome.messages:
            assert_exception(outcome, TApplicationException.PROTOCOL_ERROR)
        assert_closed(outcome, within=RW + 1.5)
        assert status_kb("VmRSS") - rss < 64 * 1024
        assert_served(target, protocol, transport)

    @pytest.mark.parametrize("shape", ["structs", "lists"])
    def test_nesting_10000_deep_is_refused(self, target, protocol, transport, shape):
        """10,000 nested structs (declared) or lists (skipped): PROTOCOL_ERROR, then closed."""
        message = deep_structs(protocol) if shape == "structs" else deep_lists(protocol)
        outcome = attack(target, (protocol, transport), wrap(transport, message), timeout=RW + 2)
        assert_exception(
            outcome,
            TApplicationException.PROTOCOL_ERROR,
            name="roundtrip" if shape == "structs" else "ping",
        )
        assert_closed(outcome, within=2.0)
        assert_served(target, protocol, transport)

    def test_wrong_protocol_version_is_refused(self, target, protocol, transport):
        """Binary ``80 02`` or compact version 2 as the first message: closed, no reply."""
        outcome = attack(
            target, (protocol, transport), wrap(transport, bad_version(protocol)), timeout=RW + 2
        )
        assert_closed(outcome, within=1.0)
        assert outcome.received == 0
        assert_served(target, protocol, transport)

    def test_wrong_protocol_version_after_a_good_request_closes(self, target, protocol, transport):
        """The good request is answered in full, then the connection is closed."""
        payload = wrap(transport, encode(protocol, "echo", message="ok")) + wrap(
            transport, bad_version(protocol)
        )
        outcome = attack(target, (protocol, transport), payload, timeout=RW + 2)
        assert [(m.name, m.mtype) for m in outcome.messages] == [("echo", REPLY)]
        assert outcome.messages[0].body.success == "ok"
        assert_closed(outcome, within=1.0)
        assert_served(target, protocol, transport)

    @pytest.mark.parametrize("mtype", [REPLY, EXCEPTION, 7], ids=["REPLY", "EXCEPTION", "type-7"])
    def test_message_that_is_not_a_call_gets_invalid_message_type(
        self, target, protocol, transport, mtype
    ):
        """A REPLY, an EXCEPTION or type 7 sent to the server: INVALID_MESSAGE_TYPE, or closed."""
        outcome = attack(
            target,
            (protocol, transport),
            wrap(transport, head(protocol, "ping", mtype, seqid=77) + STOP),
            timeout=RW + 2,
            want=1,
        )
        if outcome.messages:
            assert_exception(outcome, TApplicationException.INVALID_MESSAGE_TYPE, name="ping")
            assert outcome.messages[0].seqid == 77
        else:
            assert_closed(outcome, within=1.0)
        assert_served(target, protocol, transport)

    def test_unknown_method_gets_unknown_method_and_the_connection_goes_on(
        self, target, protocol, transport
    ):
        """UNKNOWN_METHOD, and the request pipelined behind it is answered on the same socket."""
        payload = wrap(transport, head(protocol, "no_such_method") + STOP) + wrap(
            transport, encode(protocol, "echo", seqid=2, message="after")
        )
        outcome = attack(target, (protocol, transport), payload, timeout=RW + 2, want=2)
        assert_exception(outcome, TApplicationException.UNKNOWN_METHOD, name="no_such_method")
        assert outcome.messages[1].body.success == "after"
        assert_served(target, protocol, transport)

    def test_method_name_that_is_not_utf8_gets_a_reply_a_strict_client_can_decode(
        self, target, protocol, transport
    ):
        """A name of invalid UTF-8: UNKNOWN_METHOD under a name a strict client decodes (Thrift
        strings are UTF-8; echoing the bytes back breaks Apache Thrift's decoder), or closed."""
        name = b"rou\x8c\xb0ndtrip"
        if protocol == "binary":
            message = struct.pack("!HHI", 0x8001, CALL, len(name)) + name + struct.pack("!i", 1)
        else:
            message = bytes([0x82, (CALL << 5) | 1, 1, len(name)]) + name
        outcome = attack(
            target, (protocol, transport), wrap(transport, message + STOP), timeout=RW + 2, want=1
        )
        if outcome.messages:
            assert_exception(outcome, TApplicationException.UNKNOWN_METHOD)
            raw = outcome.messages[0].raw_name
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError:
                pytest.fail(f"the reply's method name {raw!r} is not UTF-8")
        else:
            assert_closed(outcome, within=1.0)
        assert_served(target, protocol, transport)

    def test_peer_resetting_mid_reply_is_dropped_quietly(self, make_server, protocol, transport):
        """A client that sends RST while a 12 MiB reply is being written: the server drops the
        connection at once (not after read_write_timeout) and keeps serving."""
        rw = 5.0
        server = make_server(read_write_timeout=rw, max_frame_size=16 * MIB)
        assert_served(server, protocol, transport)
        baseline = usage(server)
        request = wrap(transport, encode(protocol, "echo_binary", data=b"\x5a" * (12 * MIB)))
        with connection(server.address, rcvbuf=32 * 1024) as sock:
            sock.sendall(request)
            got = 0
            while got < 64 * 1024:
                chunk = sock.recv(65536)
                assert chunk, "closed before replying"
                got += len(chunk)
            wait_until(
                lambda: server.overload()["conn_busy"],
                2.0,
                what="the reply to be in the middle of its writing, for the reset to cut it",
            )
            arm_reset(sock)
        reset_at = time.monotonic()
        wait_until(
            lambda: not server.overload()["conn_now"],
            rw / 2,
            what="the server to notice the reset and close the connection",
        )
        assert time.monotonic() - reset_at < rw / 2
        assert settled(server, baseline).within(baseline), usage(server)
        assert_served(server, protocol, transport)


class TestAbsurdLengths:
    @pytest.mark.parametrize("transport", ["buffered", "framed"])
    def test_negative_binary_string_length_is_a_protocol_error(self, target, transport):
        """A binary length of -1: PROTOCOL_ERROR, then closed (no stack bytes come back)."""
        message = head("binary", "echo_binary") + bfield(T_STRING, 1) + struct.pack("!i", -1) + STOP
        outcome = attack(target, ("binary", transport), wrap(transport, message), timeout=RW + 2)
        assert_exception(outcome, TApplicationException.PROTOCOL_ERROR, name="echo_binary")
        assert_closed(outcome, within=1.0)
        assert_served(target, "binary", transport)

    @pytest.mark.parametrize("protocol", ["binary", "compact"])
    @pytest.mark.parametrize("excess", [1, 3 * MIB], ids=["max+1", "4xmax"])
    def test_frame_length_over_max_frame_size_is_refused_at_once(
        self, make_server, protocol, excess
    ):
        """The frame length is checked against max_frame_size as soon as it is read: the call
        whose header came with it gets PROTOCOL_ERROR and the connection is closed, without
        waiting read_write_timeout for a body that may not come."""
        rw = 4.0
        server = make_server(read_write_timeout=rw, max_frame_size=MIB)
        payload = struct.pack("!i", MIB + excess) + encode(protocol, "ping")
        outcome = attack(server, (protocol, "framed"), payload, timeout=rw + 1)
        assert_exception(outcome, TApplicationException.PROTOCOL_ERROR, name="ping")
        assert "max_frame_size" in outcome.messages[0].body.message
        assert outcome.closed, outcome
        assert outcome.elapsed < rw / 2, (
            f"a frame of max_frame_size + {excess} bytes was closed only after "
            f"{outcome.elapsed:.1f}s (read_write_timeout {rw}s): its length was not refused"
        )
        assert_served(server, protocol, "framed")

    @pytest.mark.parametrize("protocol", ["binary", "compact"])
    @pytest.mark.parametrize("length", [0, -1])
    def test_zero_or_negative_frame_length_closes(self, target, protocol, length):
        """A frame of length 0 or -1: closed at once, nothing sent back."""
        payload = struct.pack("!i", length) + encode(protocol, "ping")
        outcome = attack(target, (protocol, "framed"), payload, timeout=RW + 2)
        assert_closed(outcome, within=1.0)
        assert outcome.received == 0
        assert_served(target, protocol, "framed")

    @pytest.mark.slow
    @pytest.mark.parametrize("protocol", ["binary", "compact"])
    def test_announced_lengths_reserve_nothing_until_the_bytes_arrive(self, make_server, protocol):
        """100 buffered connections each announce an echo_binary of 16 MiB minus a little (valid,
        within max_frame_size) and send nothing more: the server's address space and resident
        memory grow by what arrived, not by the 1.6 GB announced (it was +2.7 GB), and the
        connections are cut at read_write_timeout."""
        server = make_server(read_write_timeout=1.0)
        length = 16 * MIB - 1024
        if protocol == "binary":
            start = head(protocol, "echo_binary") + bfield(T_STRING, 1) + struct.pack("!i", length)
        else:
            start = head(protocol, "echo_binary") + cfield(C_BINARY, 1) + varint(length)
        before = status_kb("VmSize"), status_kb("VmRSS")
        peak = list(before)
        socks = [socket.create_connection(server.address, timeout=5) for _ in range(100)]
        try:
            for sock in socks:
                sock.sendall(start + b"x" * 1000)
            deadline = time.monotonic() + 0.8
            while time.monotonic() < deadline:
                peak = [max(peak[0], status_kb("VmSize")), max(peak[1], status_kb("VmRSS"))]
                gevent.sleep(0.02)
            wait_until(lambda: not server.overload()["conn_now"], 3.0)
        finally:
            for sock in socks:
                sock.close()
        grown = [(p - b) // 1024 for p, b in zip(peak, before, strict=True)]
        assert grown[0] < 64, f"address space grew by {grown[0]} MiB for 1.6 GB announced"
        assert grown[1] < 32, f"resident memory grew by {grown[1]} MiB"

    @pytest.mark.parametrize("protocol", ["binary", "compact"])
    def test_length_over_max_frame_size_reserves_no_memory(self, make_server, protocol):
        """A string announcing 1 GiB inside a small frame: nothing is allocated for it while the
        server waits for the rest (sampled from VmSize), and the connection is closed."""
        server = make_server(read_write_timeout=1.0, max_frame_size=MIB)
        before = status_kb("VmSize")
        peak = before
        closed = False
        with connection(server.address) as sock:
            sock.sendall(wrap("framed", huge_string(protocol, length=1 << 30)))
            deadline = time.monotonic() + 3.0
            while not closed and time.monotonic() < deadline:
                peak = max(peak, status_kb("VmSize"))
                sock.settimeout(0.02)
                try:
                    closed = sock.recv(65536) == b""
                except TimeoutError:
                    pass
                except ConnectionResetError:
                    closed = True
        grown = (peak - before) // 1024
        assert grown < 256, (
            f"the server's address space grew by {grown} MiB for a length field of 1 GiB "
            f"(max_frame_size 1 MiB): it was allocated before being checked"
        )
        assert closed
        assert_served(server, protocol, "framed")


# Skip bombs: a container announcing 2**31-1 elements of a type that is not a Thrift type. A
# decoder that skips by looping over the count, reading nothing for a type it does not know,
# holds the process for seconds per bomb (thriftpy2's did). Binary's undefined type ids, and
# compact's (0 where a value is due, 13-15).
BOMB_TYPES = {"binary": [0, 1, 5, 7, 9, 16, 17, 255], "compact": [0, 13, 14, 15]}
BOMB_CONTAINERS = ["list", "set", "map-key", "map-value"]
BOMB_PLACES = ["unknown-field", "mistyped-field", "unknown-method", "nested", "several"]
T_SET = 14
C_SET = 0x0A


def container(protocol: str, kind: str, etype: int, count: int = INT32_MAX) -> tuple[int, bytes]:
    """``(field type, value bytes)`` of a container of ``count`` elements of type ``etype``."""
    if protocol == "binary":
        if kind in ("list", "set"):
            return (T_LIST if kind == "list" else T_SET), struct.pack("!Bi", etype, count)
        kv = (etype, T_I32) if kind == "map-key" else (T_I32, etype)
        return T_MAP, struct.pack("!BBi", *kv, count)
    if kind in ("list", "set"):
        return (C_LIST if kind == "list" else C_SET), bytes([0xF0 | etype]) + varint(count)
    kv = (etype, C_I32) if kind == "map-key" else (C_I32, etype)
    return C_MAP, varint(count) + bytes([(kv[0] << 4) | kv[1]])


def skip_bomb(protocol: str, place: str, kind: str, etype: int) -> bytes:
    """A call carrying one (``several``: three) bomb containers, placed as ``place`` says:

    - ``unknown-field``: a field ping() does not declare;
    - ``mistyped-field``: Item.tags (a list<string>) in roundtrip(), sent as the container;
    - ``unknown-method``: the first field of a call to a method the IDL does not have;
    - ``nested``: a list of one list holding the container, in an undeclared field;
    - ``several``: three bombs in undeclared fields of one message.
    """
    ftype, value = container(protocol, kind, etype)
    binary = protocol == "binary"

    def field(t: int, fid: int, delta: int) -> bytes:
        return bfield(t, fid) if binary else cfield(t, delta)

    if place == "unknown-field":
        return head(protocol, "ping") + field(ftype, 9, 9) + value + STOP
    if place == "mistyped-field":
        outer = field(T_STRUCT if binary else C_STRUCT, 1, 1)
        return head(protocol, "roundtrip") + outer + field(ftype, 3, 3) + value + STOP + STOP
    if place == "unknown-method":
        return head(protocol, "no_such_method") + field(ftype, 1, 1) + value + STOP
    if place == "nested":
        if binary:
            lists = struct.pack("!Bi", T_LIST, 1) + struct.pack("!Bi", ftype, 1)
        else:
            lists = bytes([0x10 | C_LIST, 0x10 | ftype])
        return head(protocol, "ping") + field(T_LIST if binary else C_LIST, 9, 9) + lists + value
    bombs = b"".join(field(ftype, fid, 1 if fid > 9 else 9) + value for fid in (9, 10, 11))
    return head(protocol, "ping") + bombs + STOP


class TestSkipBombs:
    @pytest.mark.parametrize(("protocol", "transport"), WIRES, ids=WIRE_IDS)
    @pytest.mark.parametrize("place", BOMB_PLACES)
    def test_bomb_is_refused_at_once_while_others_are_served(
        self, make_server, protocol, transport, place
    ):
        """Every undefined element type, in lists, sets and map keys and values: the attacker
        is answered within 100 ms (PROTOCOL_ERROR naming the undefined type, or UNKNOWN_METHOD
        for a framed call to no method, whose body is never read), and a client on another
        connection gets its ping answered meanwhile."""
        server = make_server(read_write_timeout=5.0)
        slow: list[str] = []
        with connection(server.address) as probe:
            ping = encode("binary", "ping")
            for kind in BOMB_CONTAINERS:
                for etype in BOMB_TYPES[protocol]:
                    bomb = wrap(transport, skip_bomb(protocol, place, kind, etype))
                    with connection(server.address) as attacker:
                        start = time.monotonic()
                        attacker.sendall(bomb)
                        probe.sendall(ping)
                        answer = read_outcome(probe, "binary", "buffered", timeout=2.0, want=1)
                        outcome = read_outcome(attacker, protocol, transport, timeout=2.0, want=1)
                        elapsed = time.monotonic() - start
                    assert [m.name for m in answer.messages] == ["ping"], answer
                    # The header came whole with the bomb: the refusal can name the call.
                    [reply] = outcome.messages
                    if reply.body.type == TApplicationException.UNKNOWN_METHOD:
                        assert (place, transport) == ("unknown-method", "framed"), outcome
                    else:
                        assert reply.body.type == TApplicationException.PROTOCOL_ERROR
                        assert "undefined" in reply.body.message, reply.body.message
                    if elapsed > 0.1:
                        slow.append(f"{kind} of type {etype}: {elapsed * 1000:.0f} ms")
        assert not slow, "answered or closed later than 100 ms:\n" + "\n".join(slow)
        assert_served(server, protocol, transport)


def zigzag(n: int) -> int:
    return (n << 1) ^ (n >> 63)


class TestIntegerRanges:
    @pytest.mark.parametrize("transport", ["buffered", "framed"])
    def test_i32_argument_of_2_41_is_refused_before_the_handler(self, target, transport):
        """add(a=2**41, b=1) in compact, where an i32 is declared: PROTOCOL_ERROR (a handler
        would have answered with a REPLY), not a value that wraps or reaches the handler."""
        message = (
            head("compact", "add")
            + cfield(C_I32, 1)
            + varint(zigzag(2**41))
            + cfield(C_I32, 1)
            + varint(zigzag(1))
            + STOP
        )
        outcome = attack(target, ("compact", transport), wrap(transport, message), timeout=RW + 2)
        assert_exception(outcome, TApplicationException.PROTOCOL_ERROR, name="add")
        assert "overflows 32 bits" in outcome.messages[0].body.message
        assert_served(target, "compact", transport)

    def test_map_value_past_64_bits_is_refused(self, target):
        """An i64 in Item.counts whose varint runs past 64 bits is refused, not truncated."""
        item = cfield(C_MAP, 4) + varint(1) + bytes([(C_BINARY << 4) | 0x06]) + varint(1) + b"k"
        message = head("compact", "roundtrip") + cfield(C_STRUCT, 1) + item + b"\xff" * 10 + b"\x01"
        outcome = attack(target, ("compact", "buffered"), message + STOP + STOP, timeout=RW + 2)
        assert_exception(outcome, TApplicationException.PROTOCOL_ERROR, name="roundtrip")
        assert "overflows 64 bits" in outcome.messages[0].body.message


class TestAccounting:
    def test_every_hostile_input_gets_a_debug_log_line(self, target):
        """Each attack leaves a debug-level line naming the peer by the time it is answered or
        closed (not later, when the attacker hangs up)."""
        missing = []
        for wire in WIRES:
            for name, payload, eof in hostile_inputs(*wire):
                with capture_logs() as logs, connection(target.address) as sock:
                    if send_quietly(sock, payload) and eof:
                        end_input(sock)
                    outcome = read_outcome(sock, *wire, timeout=RW + 1.5, want=1)
                    if not debug_lines(logs):
                        missing.append(f"{'/'.join(wire)} {name} ({outcome})")
                # The line for this connection's end must not count for the next attack.
                wait_until(lambda: not target.overload()["conn_now"], 2.0)
        assert not missing, "no debug-level log line for:\n" + "\n".join(missing)

    def test_attacks_leave_no_fd_greenlet_or_memory_behind(self, target):
        """Three rounds of every attack on every wire, the attacker closing, resetting or ending
        its input: fds, pooled greenlets and open connections return to where they were, and
        resident memory does not grow with the attack."""
        for wire in WIRES:
            assert_served(target, *wire)
        baseline = usage(target)
        rss = status_kb("VmRSS")
        tried = 0
        for round_ in range(3):
            for wire in WIRES:
                for i, (_name, payload, _eof) in enumerate(hostile_inputs(*wire)):
                    with connection(target.address) as sock:
                        send_quietly(sock, payload)
                        ending = (i + round_) % 3
                        if ending == 1:
                            arm_reset(sock)
                        elif ending == 2:
                            end_input(sock)
                    tried += 1
        after = settled(target, baseline, timeout=RW + 5)
        assert after.within(baseline), f"after {tried} attacks: {after}, before: {baseline}"
        assert status_kb("VmRSS") - rss < 64 * 1024
        assert_served(target)


# -- property-based -------------------------------------------------------------------------------

FUZZ = settings(
    max_examples=40,
    deadline=None,
    derandomize=True,
    database=None,
    phases=(Phase.explicit, Phase.generate),
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
FUZZ_CLOSE_WITHIN = 3.0
"""After the input ends, the server has answered what it could and closed by then."""

INTERESTING = [
    b"\x00",
    b"\x01",
    b"\x7f",
    b"\x80",
    b"\xff",
    b"\x00\x00\x00\x00",
    b"\x7f\xff\xff\xff",
    b"\x80\x00\x00\x00",
    b"\xff\xff\xff\xff",
]


def valid_calls(protocol: str, transport: str) -> list[bytes]:
    calls = [
        encode(protocol, "ping"),
        encode(protocol, "echo", message="hello, world"),
        encode(protocol, "echo_binary", data=bytes(range(64))),
        encode(protocol, "add", a=2, b=40),
        encode(protocol, "roundtrip", item=sample_item()),
        encode(protocol, "raise_declared", message="no", code=3),
        encode(protocol, "notify", mtype=ONEWAY, tag="t"),
        encode(protocol, "wrong_return"),
    ]
    framed = [wrap(transport, c) for c in calls]
    return [*framed, framed[0] + framed[1], framed[4] + framed[3]]


@st.composite
def mutated_calls(draw: Any, protocol: str, transport: str) -> bytes:
    """A valid call (or two, pipelined) with bit flips, truncation, insertions, deletions."""
    data = bytearray(draw(st.sampled_from(valid_calls(protocol, transport))))
    for _ in range(draw(st.integers(1, 4))):
        where = draw(st.integers(0, max(len(data) - 1, 0)))
        op = draw(st.sampled_from(["flip", "truncate", "insert", "overwrite", "delete"]))
        if op == "flip" and data:
            data[where] ^= 1 << draw(st.integers(0, 7))
        elif op == "truncate":
            del data[where:]
        elif op == "insert":
            data[where:where] = draw(st.binary(min_size=1, max_size=8))
        elif op == "overwrite":
            chunk = draw(st.sampled_from(INTERESTING))
            data[where : where + len(chunk)] = chunk
        else:
            del data[where : where + draw(st.integers(1, 4))]
    return bytes(data)


def random_input(protocol: str, transport: str) -> st.SearchStrategy[bytes]:
    """Random bytes, bare or behind the magic (and a frame length) of the wire."""
    magic = b"\x80\x01" if protocol == "binary" else b"\x82"
    body = st.binary(max_size=300)
    if transport == "buffered":
        headed = body.map(lambda b: magic + b)
    else:
        headed = st.tuples(st.integers(0, 400), body).map(
            lambda t: struct.pack("!i", t[0]) + magic + t[1]
        )
    return st.one_of(st.binary(min_size=1, max_size=300), headed)


def fuzz_once(server: kitegreen.RpcServer, protocol: str, transport: str, payload: bytes) -> None:
    """Send ``payload`` then end the input: the server answers in whole messages, closes within
    FUZZ_CLOSE_WITHIN, and still answers a ping on a new connection."""
    wire = server_wire(payload)
    with connection(server.address) as sock:
        if send_quietly(sock, payload):
            end_input(sock)
        outcome = read_outcome(sock, *(wire or ("binary", "buffered")), timeout=FUZZ_CLOSE_WITHIN)
    assert outcome.closed, f"still open {FUZZ_CLOSE_WITHIN}s after the input ended: {outcome}"
    assert outcome.leftover == b"", f"a reply was cut short: {outcome.leftover[:60]!r}"
    if wire is None:
        assert outcome.received == 0
    with thriftpy2_client(
        testsvc_thrift.TestService, server.address, protocol, transport, timeout=2.0
    ) as client:
        assert client.echo("ping") == "ping"


@pytest.mark.slow
@pytest.mark.parametrize(("protocol", "transport"), WIRES, ids=WIRE_IDS)
class TestProperties:
    @FUZZ
    @given(data=st.data())
    def test_random_bytes(self, fuzz_server, protocol, transport, data):
        """Random bytes, bare or behind the wire's header: see fuzz_once()."""
        fuzz_once(fuzz_server, protocol, transport, data.draw(random_input(protocol, transport)))

    @FUZZ
    @given(data=st.data())
    def test_mutated_calls(self, fuzz_server, protocol, transport, data):
        """Valid calls, corrupted: see fuzz_once()."""
        fuzz_once(fuzz_server, protocol, transport, data.draw(mutated_calls(protocol, transport)))


# -- slow peers -----------------------------------------------------------------------------------


def trickle(
    sock: socket.socket,
    data: bytes,
    *,
    sent: int,
    start: float,
    gap: float,
    give_up: float,
    between: Callable[[], None] | None = None,
) -> tuple[int, float | None]:
    """Send ``data[sent:]`` one byte every ``gap`` seconds until the server closes.

    Returns:
        The bytes sent, and when the server cut the connection (seconds after ``start``), or
        None if it had not after ``give_up`` seconds.
    """
    while sent < len(data) and time.monotonic() - start < give_up:
        if closed_within(sock, gap):
            return sent, time.monotonic() - start
        if between is not None:
            between()
        try:
            sock.sendall(data[sent : sent + 1])
        except (BrokenPipeError, ConnectionResetError):
            return sent, time.monotonic() - start
        sent += 1
    return sent, None


@pytest.mark.slow
class TestSlowPeers:
    @pytest.mark.parametrize(("protocol", "transport"), WIRES, ids=WIRE_IDS)
    def test_trickled_request_is_cut_off_while_others_are_served(
        self, make_server, protocol, transport
    ):
        """One byte every 50 ms: cut off about read_write_timeout after the first byte, long
        before the request is whole, and another client is answered between every two bytes."""
        rw = 0.5
        server = make_server(read_write_timeout=rw, idle_timeout=30.0)
        request = wrap(transport, encode(protocol, "echo", message="x" * 400))
        latencies: list[float] = []
        with (
            thriftpy2_client(
                testsvc_thrift.TestService, server.address, protocol, transport
            ) as other,
            connection(server.address) as sock,
        ):
            assert other.echo("warm") == "warm"

            def serve_other() -> None:
                sent_at = time.monotonic()
                assert other.echo("meanwhile") == "meanwhile"
                latencies.append(time.monotonic() - sent_at)

            start = time.monotonic()
            sock.sendall(request[:1])
            sent, cut = trickle(
                sock, request, sent=1, start=start, gap=0.05, give_up=rw + 3, between=serve_other
            )
        assert cut is not None, f"not cut off after {sent} bytes"
        assert sent < len(request)
        assert rw - 0.05 <= cut <= rw + 1.0, f"cut off {cut:.2f}s after the first byte"
        assert latencies
        assert max(latencies) < 0.5
        assert_served(server, protocol, transport)

    @pytest.mark.parametrize(("protocol", "transport"), WIRES, ids=WIRE_IDS)
    @pytest.mark.parametrize("scenario", ["byte-by-byte", "after-detection", "pipelined"])
    def test_deadline_runs_from_the_first_byte_of_the_request(
        self, make_server, protocol, transport, scenario
    ):
        """The first byte starts read_write_timeout however the request arrives: a byte every
        0.7 s from the first (``byte-by-byte``: detection itself, which needs 1 to 5 bytes, is
        inside the deadline), in the segment that also told the server the wire
        (``after-detection``: 8 bytes, then a byte every 0.7 s), or behind a whole previous
        request (``pipelined``)."""
        rw = 1.0
        server = make_server(read_write_timeout=rw, idle_timeout=30.0)
        request = wrap(transport, encode(protocol, "echo", message="x" * 100))
        with connection(server.address) as sock:
            start = time.monotonic()
            if scenario == "byte-by-byte":
                sent = 1
                sock.sendall(request[:sent])
            elif scenario == "after-detection":
                sent = 8
                sock.sendall(request[:sent])
            else:
                sent = 1
                sock.sendall(wrap(transport, encode(protocol, "ping")) + request[:sent])
                answer = read_outcome(sock, protocol, transport, timeout=2.0, want=1)
                assert [m.name for m in answer.messages] == ["ping"]
            sent, cut = trickle(sock, request, sent=sent, start=start, gap=0.7, give_up=rw + 3)
        assert cut is not None, f"not cut off after {sent} bytes"
        assert rw - 0.05 <= cut <= rw + 0.35, (
            f"cut off {cut:.2f}s after the first byte; read_write_timeout is {rw}s"
        )

    def test_client_that_never_reads_is_cut_off_and_pins_no_memory(self, make_server):
        """200 echo_binary(256 KiB) requests, no reply read: the write times out, the connection
        is closed, others are served meanwhile, and resident memory stays bounded."""
        rw = 0.5
        server = make_server(read_write_timeout=rw)
        request = encode("binary", "echo_binary", data=bytes(256 * 1024))
        rss = status_kb("VmRSS")
        peak = [rss]
        done = Event()

        def sample() -> None:
            while not done.wait(0.02):
                peak[0] = max(peak[0], status_kb("VmRSS"))

        sampler = gevent.spawn(sample)
        sent = 0
        try:
            with (
                capture_logs() as logs,
                connection(server.address, timeout=2.0, rcvbuf=64 * 1024) as sock,
            ):
                for _ in range(200):
                    try:
                        sock.sendall(request)
                    except (TimeoutError, BrokenPipeError, ConnectionResetError):
                        break
                    sent += 1
                assert_served(server, "compact", "framed")
                wait_until(
                    lambda: not server.overload()["conn_now"],
                    rw + 5,
                    what="the connection of a client that never reads to be closed",
                )
                reasons = [e.get("reason") for e in debug_lines(logs)]
        finally:
            done.set()
            sampler.join(timeout=2)
        assert "read_write_timeout" in reasons, reasons
        grown = (peak[0] - rss) // 1024
        assert grown < 200, f"resident memory grew by {grown} MiB ({sent} requests sent)"
        assert_served(server)


# -- floods ---------------------------------------------------------------------------------------


@dataclass
class Steady:
    """A well-behaved client calling echo() on one connection until stopped, timing each call."""

    server: kitegreen.RpcServer
    shed_ok: bool = False
    calls: list[tuple[str, float]] = field(default_factory=list)
    stop: Event = field(default_factory=Event)

    def run(self) -> None:
        with thriftpy2_client(testsvc_thrift.TestService, self.server.address) as client:
            while not self.stop.is_set():
                sent_at = time.monotonic()
                try:
                    assert client.echo("steady") == "steady"
                    kind = "ok"
                except Py2ApplicationException as exc:
                    if not (self.shed_ok and exc.type == LOADSHEDDING):
                        raise
                    kind = "shed"
                self.calls.append((kind, time.monotonic() - sent_at))
                self.stop.wait(0.02)


@dataclass
class DebugProbe:
    """Polls /health and /runtime/kite until stopped."""

    server: kitegreen.RpcServer
    answers: list[tuple[str, int, float, bytes]] = field(default_factory=list)
    stop: Event = field(default_factory=Event)

    def run(self) -> None:
        assert self.server.debug_address is not None
        host, port = self.server.debug_address
        while not self.stop.is_set():
            for path in ("/health", "/runtime/kite"):
                sent_at = time.monotonic()
                status, body = http_get(f"http://{host}:{port}{path}")
                self.answers.append((path, status, time.monotonic() - sent_at, body))
            self.stop.wait(0.05)

    def check(self) -> dict[str, Any]:
        """Every answer was 200 and prompt; the last /runtime/kite document."""
        assert {p for p, *_ in self.answers} == {"/health", "/runtime/kite"}, self.answers
        assert all(status == 200 for _, status, _, _ in self.answers), self.answers
        assert max(t for _, _, t, _ in self.answers) < 2.0
        runtime = [body for path, _, _, body in self.answers if path == "/runtime/kite"]
        return dict(json.loads(runtime[-1]))


@contextlib.contextmanager
def running(*tasks: Steady | DebugProbe) -> Iterator[None]:
    """Run ``tasks`` in greenlets for the block; stop and join them (re-raising) after."""
    greenlets = [gevent.spawn(task.run) for task in tasks]
    try:
        yield
    finally:
        for task in tasks:
            task.stop.set()
        gevent.joinall(greenlets, timeout=10, raise_error=True)


@pytest.mark.slow
class TestFloods:
    def test_thousands_of_connections_opened_and_dropped(self, make_server):
        """2000 connections, 100 at a time, closed at once, after half a request, after HTTP,
        or reset: a steady client and the debug endpoint keep answering, and every fd and
        greenlet is given back."""
        server = make_server(enable_debug_server=True, debug_port=0)
        assert_served(server)
        baseline = usage(server)
        steady, probe = Steady(server), DebugProbe(server)
        half = encode("binary", "echo", message="x" * 64)[:20]

        def flood_one(i: int) -> None:
            with connection(server.address) as sock:
                if i % 4 == 1:
                    send_quietly(sock, half)
                elif i % 4 == 2:
                    send_quietly(sock, GARBAGE["http"])
                elif i % 4 == 3:
                    arm_reset(sock)

        pool = Pool(100)
        with running(steady, probe):
            for i in range(2000):
                pool.spawn(flood_one, i)
            pool.join(timeout=40, raise_error=True)
        assert len(pool) == 0, "the flood did not finish"
        assert steady.calls
        assert {k for k, _ in steady.calls} == {"ok"}
        assert max(t for _, t in steady.calls) < 1.0
        assert "overload" in probe.check()
        after = settled(server, baseline, timeout=10)
        assert after.within(baseline), f"after the flood: {after}, before: {baseline}"
        assert_served(server)

    def test_connections_over_the_limit_are_closed_at_once(self, make_server):
        """limit_connections=50 held by a steady client and 49 idle sockets: 100 more are each
        closed at once; the steady client and the debug endpoint keep answering; once the
        idle sockets go, new clients are served again."""
        server = make_server(limit_connections=50, enable_debug_server=True, debug_port=0)
        steady, probe = Steady(server), DebugProbe(server)
        refused_in: list[float] = []
        with running(steady, probe), contextlib.ExitStack() as holders:
            wait_until(lambda: steady.calls, 5.0)
            for _ in range(49):
                holders.enter_context(connection(server.address))
            wait_until(lambda: server.overload()["conn_now"] == 50, 5.0)
            for _ in range(100):
                with connection(server.address) as extra:
                    outcome = read_outcome(extra, "binary", "buffered", timeout=3.0)
                assert outcome.closed, outcome
                assert outcome.received == 0, outcome
                refused_in.append(outcome.elapsed)
            probe.check()
            host, port = server.debug_address
            status, body = http_get(f"http://{host}:{port}/runtime/kite")
            calls_while_full = len(steady.calls)
            wait_until(lambda: len(steady.calls) > calls_while_full + 2, 5.0)
        assert max(refused_in) < 1.0
        assert status == 200
        runtime = json.loads(body)
        assert runtime["overload"]["conn_now"] == 50
        assert runtime["overload"]["conn_limit"] == 50
        assert {k for k, _ in steady.calls} == {"ok"}
        assert max(t for _, t in steady.calls) < 1.0
        wait_until(lambda: server.overload()["conn_now"] == 0, 5.0)
        for wire in WIRES:
            assert_served(server, *wire)

    def test_qps_bursts_are_shed_and_the_server_stays_responsive(self, make_server):
        """limit_qps=20 and four connections each pipelining 200 pings: every request is
        answered, the excess with LOADSHEDDING; no more than the bucket allows succeeds; a
        steady client is answered promptly throughout and served again after the burst."""
        server = make_server(limit_qps=20, enable_debug_server=True, debug_port=0)
        started = time.monotonic()
        steady, probe = Steady(server, shed_ok=True), DebugProbe(server)
        n = 200
        outcomes: dict[str, Outcome] = {}

        def burst(protocol: str, transport: str) -> None:
            data = b"".join(wrap(transport, encode(protocol, "ping", seqid=i)) for i in range(n))
            with connection(server.address, timeout=10) as sock:
                sock.sendall(data)
                outcomes[f"{protocol}-{transport}"] = read_outcome(
                    sock, protocol, transport, timeout=15, want=n
                )

        with running(steady, probe):
            gevent.joinall([gevent.spawn(burst, *w) for w in WIRES], timeout=30, raise_error=True)
        ok = shed = 0
        for outcome in outcomes.values():
            assert len(outcome.messages) == n, outcome
            assert outcome.leftover == b"", outcome
            for message in outcome.messages:
                if message.mtype == REPLY:
                    ok += 1
                else:
                    assert message.body.type == LOADSHEDDING, message.body.message
                    shed += 1
        steady_ok = sum(1 for k, _ in steady.calls if k == "ok")
        allowed = 20 + 20 * (time.monotonic() - started) + 2
        assert len(outcomes) == 4
        assert ok + shed == 4 * n
        assert shed > 0
        assert ok + steady_ok <= allowed, f"{ok + steady_ok} admitted, the bucket allows {allowed}"
        assert max(t for _, t in steady.calls) < 1.0
        probe.check()
        with thriftpy2_client(testsvc_thrift.TestService, server.address) as client:

            def answered() -> bool:
                try:
                    return bool(client.echo("again") == "again")
                except Py2ApplicationException as exc:
                    if exc.type != LOADSHEDDING:
                        raise
                    return False

            wait_until(answered, 3.0)


# -- dependency faults ----------------------------------------------------------------------------


class TestDependencyFaults:
    def test_debug_port_taken_the_rpc_service_starts_with_a_warning(self, make_server):
        """The debug port held by another socket, the debug server optional: a warning naming
        it, and RPC served."""
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as blocker:
            blocker.bind((LOOPBACK, 0))
            blocker.listen(1)
            port = blocker.getsockname()[1]
            with capture_logs() as logs:
                server = make_server(enable_debug_server=True, debug_port=port, debug_optional=True)
            assert server.debug_address is None
            warnings = [
                e for e in logs if e["log_level"] == "warning" and "debug server" in e["event"]
            ]
            assert warnings, logs
            assert str(port) in warnings[0]["error"]
            assert_served(server)

    @pytest.mark.parametrize(("protocol", "transport"), WIRES, ids=WIRE_IDS)
    def test_handler_raising_gets_internal_error_and_the_connection_goes_on(
        self, make_server, protocol, transport
    ):
        """A handler raising an undeclared exception: INTERNAL_ERROR to both real clients."""
        server = make_server()
        with thriftpy2_client(
            testsvc_thrift.TestService, server.address, protocol, transport
        ) as client:
            with pytest.raises(Py2ApplicationException) as info:
                client.raise_undeclared("boom")
            assert info.value.type == Py2ApplicationException.INTERNAL_ERROR
            assert client.echo("after") == "after"
        with apache_client(server.address, protocol, transport) as client:
            with pytest.raises(TApplicationException) as apache_info:
                client.raise_undeclared("boom")
            assert apache_info.value.type == TApplicationException.INTERNAL_ERROR
            assert client.add(1, 2) == 3

    @pytest.mark.parametrize(("protocol", "transport"), WIRES, ids=WIRE_IDS)
    def test_result_not_matching_the_idl_is_one_whole_exception_reply(
        self, make_server, protocol, transport
    ):
        """wrong_return() returns an int for a string: exactly one INTERNAL_ERROR message,
        nothing half-written, and the pipelined request behind it is answered."""
        server = make_server()
        payload = wrap(transport, encode(protocol, "wrong_return", seqid=1)) + wrap(
            transport, encode(protocol, "echo", seqid=2, message="after")
        )
        outcome = attack(server, (protocol, transport), payload, timeout=5.0, want=2)
        assert_exception(outcome, TApplicationException.INTERNAL_ERROR, name="wrong_return")
        assert [(m.name, m.seqid) for m in outcome.messages] == [("wrong_return", 1), ("echo", 2)]
        assert outcome.messages[1].body.success == "after"

    @pytest.mark.slow
    def test_client_giving_up_on_a_blocked_handler_leaves_nothing_behind(
        self, make_server, handler
    ):
        """A handler that blocks (cooperatively) for 1 s while its client resets: others are
        served meanwhile, and the connection is gone once the handler returns."""
        server = make_server(read_write_timeout=RW)
        assert_served(server)
        baseline = usage(server)
        with connection(server.address) as sock:
            sock.sendall(encode("binary", "slow", seconds=1.0, message="late"))
            wait_until(lambda: handler.in_flight == 1, 2.0)
            assert_served(server, "compact", "framed")
            arm_reset(sock)
        assert handler.in_flight == 1
        wait_until(lambda: handler.in_flight == 0, 3.0)
        after = settled(server, baseline)
        assert after.within(baseline), f"{after}, before: {baseline}"
        assert_served(server)
