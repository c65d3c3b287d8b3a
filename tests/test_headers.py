"""TTHeader and THeader frames: kitegreen's parser and builder against independent codecs.

TTHeader is checked against byte fixtures written out below field by field from gopkg's
published layout, and against the tests' own codec (``tests/ttheader.py``). THeader is checked
against Apache Thrift's Python implementation (``thrift.transport.THeaderTransport``), over
in-memory transports. Hostile frames must be refused with ProtocolError (or FrameTooLarge),
quickly, whatever they announce.
"""

from __future__ import annotations

import contextlib
import struct
import tracemalloc
import zlib
from collections.abc import Callable
from typing import Any

import pytest
import ttheader
from conftest import cpu_time
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from testsvc import TestService as ApacheTestService
from thrift.protocol.TBinaryProtocol import TBinaryProtocol
from thrift.protocol.TCompactProtocol import TCompactProtocol
from thrift.protocol.THeaderProtocol import THeaderProtocol
from thrift.Thrift import TMessageType
from thrift.transport.THeaderTransport import (
    THeaderClientType,
    THeaderSubprotocolID,
    THeaderTransformID,
)
from thrift.transport.TTransport import TMemoryBuffer
from ttheader import TTHeader, assemble
from wire import head

from kitegreen import FrameTooLarge, ProtocolError
from kitegreen.codec.headers import (
    FLAG_SUPPORT_OUT_OF_ORDER,
    MAX_HEADER_ENTRIES,
    MAX_INFO_BLOCKS,
    THEADER_MAGIC,
    TRANSFORM_ZLIB,
    TTHEADER_MAGIC,
    HeaderFrame,
    IntKey,
    StrKey,
    THeaderKey,
    build_frame,
    header_kind,
    parse_frame,
)

MIB = 1 << 20
LIMIT = 64 * 1024
"""max_frame_size of most tests."""
QUICK = 0.05
"""CPU seconds a refusal may take, whatever the frame announces."""

# fmt: off
PING_BINARY_7 = bytes.fromhex(
    "80010001"          # strict binary version 1, message type CALL
    "00000004" "70696e67"  # name: 4 bytes, "ping"
    "00000007"          # seqid 7
    "00"                # ping_args: STOP
)
PING_COMPACT_5 = bytes.fromhex(
    "82"                # compact protocol id
    "21"                # message type CALL (1 << 5) | version 1
    "05"                # seqid 5 (varint)
    "04" "70696e67"     # name: 4 bytes (varint), "ping"
    "00"                # ping_args: STOP
)
PING_BINARY_MINUS_1 = bytes.fromhex("80010001" "00000004" "70696e67" "ffffffff" "00")
PING_BINARY_1 = bytes.fromhex("80010001" "00000004" "70696e67" "00000001" "00")

TT_KEYS = bytes.fromhex(
    "0000003b"          # LENGTH: 59 bytes follow
    "1000"              # MAGIC: TTHeader
    "0000"              # FLAGS
    "00000007"          # SEQID: 7
    "0008"              # HEADER SIZE: 8 words, 32 bytes
    "00"                # PROTOCOL ID: Thrift binary
    "00"                # NUM TRANSFORMS: 0
    "01" "0001"         # INFO 0x01 string key-values, 1 entry
    "0003" "726970"     #   key: 3 bytes, "rip"
    "0008" "31302e312e322e33"  # value: 8 bytes, "10.1.2.3"
    "10" "0001"         # INFO 0x10 integer key-values, 1 entry
    "000c"              #   key 12: RPC_TIMEOUT
    "0003" "323530"     #   value: 3 bytes, "250" (milliseconds)
    "0000"              # padding: 30 header bytes up to 32
) + PING_BINARY_7
"""A binary ping with the real client IP and an RPC timeout, as gopkg's encoder lays it out."""

TT_ACL = bytes.fromhex(
    "0000001f"          # LENGTH: 31 bytes follow
    "1000"              # MAGIC: TTHeader
    "0001"              # FLAGS: support out-of-order replies
    "00000005"          # SEQID: 5
    "0003"              # HEADER SIZE: 3 words, 12 bytes
    "02"                # PROTOCOL ID: Thrift compact
    "00"                # NUM TRANSFORMS: 0
    "11"                # INFO 0x11 ACL token
    "0005" "746f6b656e" #   5 bytes, "token"
    "0000"              # padding: 10 header bytes up to 12
) + PING_COMPACT_5
"""A compact ping carrying an ACL token."""

TT_UNPADDED = bytes.fromhex(
    "00000027"          # LENGTH: 39 bytes follow
    "1000"              # MAGIC: TTHeader
    "0000"              # FLAGS
    "ffffffff"          # SEQID: -1
    "0003"              # HEADER SIZE: 3 words, 12 bytes
    "00"                # PROTOCOL ID: Thrift binary
    "00"                # NUM TRANSFORMS: 0
    "10" "0001"         # INFO 0x10 integer key-values, 1 entry
    "0002"              #   key 2: LOG_ID
    "0003" "313233"     #   value: 3 bytes, "123"
                        # no padding: 12 header bytes already
) + PING_BINARY_MINUS_1
"""A header that ends on a word boundary, and a negative seqid."""

TT_FRAMED_PAYLOAD = bytes.fromhex(
    "00000023"          # LENGTH: 35 bytes follow
    "1000"              # MAGIC: TTHeader
    "0000"              # FLAGS
    "00000001"          # SEQID: 1
    "0001"              # HEADER SIZE: 1 word
    "00"                # PROTOCOL ID: Thrift binary
    "00"                # NUM TRANSFORMS: 0
    "0000"              # padding
    "00000011"          # the payload's own frame LENGTH: 17 bytes (Kitex TTHeaderFramed)
) + PING_BINARY_1
"""Kitex's TTHeaderFramed: the message inside is framed again."""

TH_COMPACT = bytes.fromhex(
    "00000023"          # LENGTH: 35 bytes follow
    "0fff"              # MAGIC: THeader
    "0000"              # FLAGS
    "00000005"          # SEQID: 5
    "0004"              # HEADER SIZE: 4 words, 16 bytes
    "02"                # PROTOCOL ID (varint): compact
    "00"                # NUM TRANSFORMS (varint): 0
    "01"                # INFO 1 key-values
    "01"                #   count (varint): 1
    "05" "68656c6c6f"   #   key: 5 bytes, "hello"
    "05" "776f726c64"   #   value: 5 bytes, "world"
                        # no padding: 16 header bytes already
) + PING_COMPACT_5
"""A compact ping over THeader with one key-value, as Apache's Python library writes it."""
# fmt: on

TT_FIXTURES: dict[str, tuple[bytes, dict[str, Any]]] = {
    "keys": (
        TT_KEYS,
        {
            "seqid": 7,
            "flags": 0,
            "protocol": "binary",
            "str_info": {"rip": "10.1.2.3"},
            "int_info": {12: "250"},
            "acl_token": None,
            "payload": PING_BINARY_7,
            "payload_framed": False,
        },
    ),
    "acl": (
        TT_ACL,
        {
            "seqid": 5,
            "flags": FLAG_SUPPORT_OUT_OF_ORDER,
            "protocol": "compact",
            "str_info": {},
            "int_info": {},
            "acl_token": "token",
            "payload": PING_COMPACT_5,
            "payload_framed": False,
        },
    ),
    "unpadded": (
        TT_UNPADDED,
        {
            "seqid": -1,
            "flags": 0,
            "protocol": "binary",
            "str_info": {},
            "int_info": {2: "123"},
            "acl_token": None,
            "payload": PING_BINARY_MINUS_1,
            "payload_framed": False,
        },
    ),
    "framed-payload": (
        TT_FRAMED_PAYLOAD,
        {
            "seqid": 1,
            "flags": 0,
            "protocol": "binary",
            "str_info": {},
            "int_info": {},
            "acl_token": None,
            "payload": PING_BINARY_1,
            "payload_framed": True,
        },
    ),
}


def parse(frame: bytes, max_frame_size: int = LIMIT) -> HeaderFrame:
    return parse_frame(frame, max_frame_size=max_frame_size)


def fields(frame: HeaderFrame) -> dict[str, Any]:
    """The parsed frame as a dict comparable with TT_FIXTURES (payload as bytes)."""
    return {
        "seqid": frame.seqid,
        "flags": frame.flags,
        "protocol": frame.protocol,
        "str_info": frame.str_info,
        "int_info": frame.int_info,
        "acl_token": frame.acl_token,
        "payload": bytes(frame.payload),
        "payload_framed": frame.payload_framed,
    }


def inner_framed(expected: dict[str, Any]) -> bytes:
    """A fixture's TTHeader payload as sent: framed again under Kitex's TTHeaderFramed."""
    payload: bytes = expected["payload"]
    return struct.pack(">I", len(payload)) + payload if expected["payload_framed"] else payload


def timed_refusal(frame: bytes, error: type[Exception] = ProtocolError, **kw: Any) -> str:
    """Parse ``frame``, expecting ``error`` within QUICK seconds; return its message."""
    with cpu_time() as took, pytest.raises(error) as caught:
        parse_frame(frame, max_frame_size=kw.get("max_frame_size", LIMIT))
    assert took.seconds < QUICK, f"refusal took {took.seconds * 1000:.1f} ms of CPU"
    return str(caught.value)


class TestHeaderKind:
    """header_kind() tells a header frame from the first six bytes of a connection."""

    def test_ttheader(self) -> None:
        """Bytes 4-5 of 0x1000 are TTHeader."""
        assert header_kind(TT_KEYS[:6]) == "ttheader"

    def test_theader(self) -> None:
        """Bytes 4-5 of 0x0FFF are THeader."""
        assert header_kind(TH_COMPACT[:6]) == "theader"

    @pytest.mark.parametrize(
        "start",
        [
            struct.pack(">I", 17) + PING_BINARY_7[:2],
            struct.pack(">I", 9) + PING_COMPACT_5[:2],
            PING_BINARY_7[:6],
            PING_COMPACT_5[:6],
            b"GET / HTTP/1.1",
            bytes.fromhex("16030100c401"),
        ],
        ids=[
            "framed-binary",
            "framed-compact",
            "buffered-binary",
            "buffered-compact",
            "http",
            "tls",
        ],
    )
    def test_other_wires(self, start: bytes) -> None:
        """Plain Thrift messages, framed or not, and other protocols are not header frames."""
        assert header_kind(start) is None

    def test_length_with_top_bits(self) -> None:
        """A LENGTH over 0x3FFFFFFF cannot start a header frame, whatever bytes 4-5 say."""
        assert header_kind(bytes.fromhex("80000000") + b"\x10\x00") is None

    def test_short(self) -> None:
        """Fewer than six bytes cannot be told apart."""
        assert header_kind(TT_KEYS[:5]) is None


class TestTTHeaderFixtures:
    """Hand-written TTHeader frames read the same in kitegreen and in the tests' codec, and
    kitegreen writes them byte for byte."""

    @pytest.mark.parametrize("name", TT_FIXTURES)
    def test_parsed(self, name: str) -> None:
        """kitegreen reads every field of the fixture."""
        frame, expected = TT_FIXTURES[name]
        parsed = parse(frame)
        assert parsed.kind == "ttheader"
        assert parsed.transforms == ()
        assert fields(parsed) == expected

    @pytest.mark.parametrize("name", TT_FIXTURES)
    def test_tests_codec_agrees(self, name: str) -> None:
        """The tests' own decoder reads the fixture the same way."""
        frame, expected = TT_FIXTURES[name]
        decoded = ttheader.decode(frame)
        assert decoded.seqid == expected["seqid"]
        assert decoded.flags == expected["flags"]
        assert decoded.protocol_id == {"binary": 0, "compact": 2}[expected["protocol"]]
        assert ttheader.texts(decoded.str_kv) == expected["str_info"]
        assert {k: v.decode() for k, v in decoded.int_kv.items()} == expected["int_info"]
        token = expected["acl_token"]
        assert decoded.acl_token == (token.encode() if token is not None else None)
        assert decoded.payload == inner_framed(expected)

    @pytest.mark.parametrize("name", TT_FIXTURES)
    def test_built(self, name: str) -> None:
        """kitegreen's builder writes the fixture, byte for byte."""
        frame, expected = TT_FIXTURES[name]
        built = build_frame(
            "ttheader",
            seqid=expected["seqid"],
            flags=expected["flags"],
            protocol=expected["protocol"],
            payload=expected["payload"],
            str_info=expected["str_info"],
            int_info=expected["int_info"],
            acl_token=expected["acl_token"],
            payload_framed=expected["payload_framed"],
        )
        assert built.hex() == frame.hex()

    @pytest.mark.parametrize("name", TT_FIXTURES)
    def test_tests_codec_writes_them(self, name: str) -> None:
        """The tests' own encoder writes the fixture too: the fixtures follow the layout."""
        frame, expected = TT_FIXTURES[name]
        token = expected["acl_token"]
        encoded = ttheader.encode(
            TTHeader(
                payload=inner_framed(expected),
                seqid=expected["seqid"],
                flags=expected["flags"],
                protocol_id={"binary": 0, "compact": 2}[expected["protocol"]],
                str_kv={k.encode(): v.encode() for k, v in expected["str_info"].items()},
                int_kv={k: v.encode() for k, v in expected["int_info"].items()},
                acl_token=token.encode() if token is not None else None,
            )
        )
        assert encoded.hex() == frame.hex()

    def test_payloads_are_plain_messages(self) -> None:
        """The fixtures' payloads are the messages tests/wire.py builds by hand."""
        assert head("binary", "ping", seqid=7) + b"\x00" == PING_BINARY_7
        assert head("compact", "ping", seqid=5) + b"\x00" == PING_COMPACT_5

    def test_payload_is_a_view(self) -> None:
        """Without transforms the payload is a view of the frame given, not a copy."""
        buffer = bytearray(TT_KEYS)
        parsed = parse_frame(memoryview(buffer), max_frame_size=LIMIT)
        assert isinstance(parsed.payload, memoryview)
        assert parsed.payload.obj is buffer


class TestTTHeaderCodecs:
    """kitegreen and the tests' codec understand each other beyond the fixtures."""

    def test_kitex_request(self) -> None:
        """A request with the keys Kitex's client sends is read whole."""
        int_kv = {
            IntKey.TRANSPORT_TYPE: b"framed",
            IntKey.LOG_ID: b"20240101120000010203040506070809",
            IntKey.FROM_SERVICE: b"p.s.caller",
            IntKey.FROM_METHOD: b"Handle",
            IntKey.TO_SERVICE: b"p.s.callee",
            IntKey.TO_METHOD: b"ping",
            IntKey.RPC_TIMEOUT: b"1500",
            IntKey.MSG_TYPE: b"1",
        }
        str_kv = {
            b"isn": b"TestService",
            b"rip": b"192.0.2.10:54321",
            b"RPC_TRANSIT_tenant": b"t-1",
            b"RPC_PERSIST_trace": "café".encode(),
        }
        frame = ttheader.encode(
            TTHeader(payload=PING_BINARY_7, seqid=7, str_kv=str_kv, int_kv=int_kv)
        )
        parsed = parse(frame)
        assert parsed.int_info[IntKey.RPC_TIMEOUT] == "1500"
        assert parsed.int_info == {int(k): v.decode() for k, v in int_kv.items()}
        assert parsed.str_info == ttheader.texts(str_kv)
        assert parsed.str_info[StrKey.PREFIX_PERSIST + "trace"] == "café"

    def test_reply_read_by_tests_codec(self) -> None:
        """A reply built for a request carries its seqid, flags and key-values back."""
        request = parse(TT_ACL)
        reply = request.reply(
            PING_COMPACT_5,
            str_info={StrKey.BIZ_STATUS: "1001", StrKey.BIZ_MESSAGE: "quota exceeded"},
            int_info={IntKey.MSG_TYPE: "2"},
        )
        decoded = ttheader.decode(reply)
        assert decoded.seqid == 5
        assert decoded.flags == FLAG_SUPPORT_OUT_OF_ORDER
        assert decoded.protocol_id == 2
        assert decoded.str_kv == {b"biz-status": b"1001", b"biz-message": b"quota exceeded"}
        assert decoded.int_kv == {22: b"2"}
        assert decoded.payload == PING_COMPACT_5

    def test_reply_mirrors_inner_framing(self) -> None:
        """A TTHeaderFramed request gets a TTHeaderFramed reply."""
        reply = parse(TT_FRAMED_PAYLOAD).reply(PING_BINARY_1)
        assert ttheader.decode(reply).payload == struct.pack(">I", 17) + PING_BINARY_1

    def test_duplicate_keys_keep_last(self) -> None:
        """A key sent twice (two string blocks) keeps its last value, as gopkg's map does."""
        block = b"\x01\x00\x01" + b"\x00\x01k" + b"\x00\x01"
        header = b"\x00\x00" + block + b"1" + block + b"2"
        header += bytes(-len(header) % 4)
        assert parse(assemble(TTHEADER_MAGIC, header, PING_BINARY_7)).str_info == {"k": "2"}

    def test_non_utf8_value(self) -> None:
        """Bytes that are not UTF-8 read as surrogate escapes and encode back unchanged."""
        raw = b"\x80\xffbin\x00"
        frame = ttheader.encode(TTHeader(payload=PING_BINARY_7, str_kv={b"ctx": raw}))
        value = parse(frame).str_info["ctx"]
        assert value.encode("utf-8", "surrogateescape") == raw
        rebuilt = build_frame(
            "ttheader", seqid=0, protocol="binary", payload=PING_BINARY_7, str_info={"ctx": value}
        )
        assert rebuilt == frame


def apache_request(
    protocol_id: int,
    *,
    headers: dict[bytes, bytes] | None = None,
    compress: bool = False,
    message: str = "hello",
    seqid: int = 42,
) -> bytes:
    """A call of echo(message) as Apache's THeaderProtocol client writes it."""
    buffer = TMemoryBuffer()
    protocol = THeaderProtocol(buffer, [THeaderClientType.HEADERS], default_protocol=protocol_id)
    for key, value in (headers or {}).items():
        protocol.set_header(key, value)
    if compress:
        protocol.add_transform(THeaderTransformID.ZLIB)
    client = ApacheTestService.Client(protocol)
    client._seqid = seqid
    client.send_echo(message)
    return bytes(buffer.getvalue())


def apache_message(protocol: str, write: Callable[[Any], None]) -> bytes:
    """A plain (unframed) message written by Apache's own protocol codec."""
    buffer = TMemoryBuffer()
    write(TBinaryProtocol(buffer) if protocol == "binary" else TCompactProtocol(buffer))
    return bytes(buffer.getvalue())


def apache_read_echo_call(protocol: str, payload: bytes | memoryview) -> tuple[Any, ...]:
    """(name, type, seqid, message) of an echo call, read by Apache's own protocol codec."""
    buffer = TMemoryBuffer(bytes(payload))
    proto = TBinaryProtocol(buffer) if protocol == "binary" else TCompactProtocol(buffer)
    name, mtype, seqid = proto.readMessageBegin()
    args = ApacheTestService.echo_args()
    args.read(proto)
    proto.readMessageEnd()
    return name, mtype, seqid, args.message


def echo_reply(protocol: str, value: str, seqid: int = 42) -> bytes:
    def write(proto: Any) -> None:
        proto.writeMessageBegin("echo", TMessageType.REPLY, seqid)
        ApacheTestService.echo_result(success=value).write(proto)
        proto.writeMessageEnd()

    return apache_message(protocol, write)


SUBPROTOCOLS = {"binary": THeaderSubprotocolID.BINARY, "compact": THeaderSubprotocolID.COMPACT}


class TestApacheTHeader:
    """THeader frames go both ways between kitegreen and Apache Thrift's Python library."""

    def test_fixture_is_what_apache_writes(self) -> None:
        """Apache writes the hand-written THeader fixture byte for byte."""

        def write(proto: Any) -> None:
            proto.set_header(b"hello", b"world")
            client = ApacheTestService.Client(proto)
            client._seqid = 5
            client.send_ping()

        buffer = TMemoryBuffer()
        write(THeaderProtocol(buffer, [THeaderClientType.HEADERS], THeaderSubprotocolID.COMPACT))
        assert bytes(buffer.getvalue()).hex() == TH_COMPACT.hex()

    def test_fixture_parsed(self) -> None:
        """kitegreen reads every field of the THeader fixture."""
        parsed = parse(TH_COMPACT)
        assert (parsed.kind, parsed.seqid, parsed.flags, parsed.protocol) == (
            "theader",
            5,
            0,
            "compact",
        )
        assert parsed.str_info == {"hello": "world"}
        assert (parsed.int_info, parsed.acl_token, parsed.transforms) == ({}, None, ())
        assert bytes(parsed.payload) == PING_COMPACT_5

    def test_fixture_built(self) -> None:
        """kitegreen's builder writes the THeader fixture byte for byte."""
        built = build_frame(
            "theader",
            seqid=5,
            protocol="compact",
            payload=PING_COMPACT_5,
            str_info={"hello": "world"},
        )
        assert built.hex() == TH_COMPACT.hex()

    @pytest.mark.parametrize("compress", [False, True], ids=["plain", "zlib"])
    @pytest.mark.parametrize("protocol", ["binary", "compact"])
    def test_apache_request_parsed(self, protocol: str, compress: bool) -> None:
        """A call Apache writes, with headers and with or without zlib, is read whole."""
        headers = {b"Trace": b"1234", b"Deadline-Budget": b"250", b"Edge-Request": b"\x0b\x00\xff"}
        frame = apache_request(
            SUBPROTOCOLS[protocol], headers=headers, compress=compress, message="x" * 300
        )
        parsed = parse(frame)
        assert parsed.kind == "theader"
        assert parsed.protocol == protocol
        assert parsed.seqid == 42
        assert parsed.transforms == ((TRANSFORM_ZLIB,) if compress else ())
        assert parsed.str_info == {
            k.decode(): v.decode("utf-8", "surrogateescape") for k, v in headers.items()
        }
        assert parsed.str_info[THeaderKey.DEADLINE_BUDGET] == "250"
        assert apache_read_echo_call(protocol, parsed.payload) == (
            "echo",
            TMessageType.CALL,
            42,
            "x" * 300,
        )

    @pytest.mark.parametrize("compress", [False, True], ids=["plain", "zlib"])
    @pytest.mark.parametrize("protocol", ["binary", "compact"])
    def test_reply_read_by_apache_client(self, protocol: str, compress: bool) -> None:
        """Apache's client reads the reply kitegreen builds for its request, headers too."""
        request = parse(apache_request(SUBPROTOCOLS[protocol], compress=compress))
        frame = request.reply(
            echo_reply(protocol, "y" * 300),
            str_info={"served-by": "kitegreen", "Edge-Request": "\udcff\x00"},
        )
        if compress:
            assert len(frame) < 300
        inbound = THeaderProtocol(TMemoryBuffer(frame), [THeaderClientType.HEADERS])
        assert ApacheTestService.Client(inbound).recv_echo() == "y" * 300
        assert inbound.get_headers() == {b"served-by": b"kitegreen", b"Edge-Request": b"\xff\x00"}

    def test_persistent_key_values(self) -> None:
        """fbthrift's persistent key-values (info id 2) are read; a per-request value wins."""
        header = (
            b"\x00\x00"  # binary, no transforms
            + b"\x02\x02" + b"\x01a\x01p" + b"\x01b\x01p"  # persistent: a=p, b=p
            + b"\x01\x01" + b"\x01b\x01r"  # per request: b=r
        )  # fmt: skip
        header += bytes(-len(header) % 4)
        parsed = parse(assemble(THEADER_MAGIC, header, PING_BINARY_7))
        assert parsed.str_info == {"a": "p", "b": "r"}

    def test_unknown_info_id_is_skipped(self) -> None:
        """HeaderFormat.md: info blocks are ignorable; an unknown one ends them."""
        header = b"\x00\x00" + b"\x01\x01\x01k\x01v" + b"\x07\xff\xff\xff"
        header += bytes(-len(header) % 4)
        parsed = parse(assemble(THEADER_MAGIC, header, PING_BINARY_7))
        assert parsed.str_info == {"k": "v"}
        assert bytes(parsed.payload) == PING_BINARY_7

    def test_fbthrift_padding_of_a_whole_word(self) -> None:
        """fbthrift pads 1 to 4 bytes (4 when the header is already aligned): still read."""
        header = b"\x00\x00\x01\x01\x01k\x01v" + bytes(4)
        assert parse(assemble(THEADER_MAGIC, header, PING_BINARY_7)).str_info == {"k": "v"}


class TestKitexKeys:
    """The key numbers and names are Kitex's (gopkg protocol/ttheader/metakey.go)."""

    def test_int_keys(self) -> None:
        """The integer keys the README documents have gopkg's numbers."""
        assert (IntKey.LOG_ID, IntKey.FROM_SERVICE, IntKey.TO_SERVICE, IntKey.TO_METHOD) == (
            2,
            3,
            6,
            9,
        )
        assert (IntKey.RPC_TIMEOUT, IntKey.FROM_METHOD, IntKey.MSG_TYPE) == (12, 20, 22)
        assert [key.value for key in IntKey] == list(range(28))

    def test_str_keys(self) -> None:
        """The string keys and metainfo prefixes are spelt as Kitex spells them."""
        assert (StrKey.REAL_IP, StrKey.CONNECTION_READY_TO_RESET) == ("rip", "crrst")
        assert (StrKey.BIZ_STATUS, StrKey.BIZ_MESSAGE, StrKey.BIZ_EXTRA) == (
            "biz-status",
            "biz-message",
            "biz-extra",
        )
        assert (StrKey.PREFIX_TRANSIT, StrKey.PREFIX_PERSIST, StrKey.PREFIX_BACKWARD) == (
            "RPC_TRANSIT_",
            "RPC_PERSIST_",
            "RPC_BACKWARD_",
        )


def tt(header: bytes, payload: bytes = PING_BINARY_7, **kw: Any) -> bytes:
    """A TTHeader frame around raw header bytes."""
    return assemble(TTHEADER_MAGIC, header, payload, **kw)


def th(header: bytes, payload: bytes = PING_BINARY_7, **kw: Any) -> bytes:
    """A THeader frame around raw header bytes."""
    return assemble(THEADER_MAGIC, header, payload, **kw)


def padded(header: bytes) -> bytes:
    return header + bytes(-len(header) % 4)


def many_tt_entries(count: int) -> bytes:
    """A TTHeader header of ``count`` integer key-values with empty values, all present."""
    body = b"".join(struct.pack(">HH", i, 0) for i in range(count))
    return padded(b"\x00\x00\x10" + struct.pack(">H", count) + body)


# Hostile frames: (frame, the exception, a fragment of its message). Each is refused quickly.
HOSTILE: dict[str, tuple[bytes, type[Exception], str]] = {
    "truncated-fixed-part": (TT_KEYS[:13], ProtocolError, "fixed part"),
    "truncated-frame": (TT_KEYS[:-1], ProtocolError, "LENGTH says 59"),
    "trailing-bytes": (TT_KEYS + b"\x00", ProtocolError, "LENGTH says 59"),
    "length-over-max": (
        struct.pack(">I", LIMIT + 1) + TT_KEYS[4:],
        FrameTooLarge,
        "max_frame_size",
    ),
    "length-2**31": (struct.pack(">I", 2**31) + TT_KEYS[4:], FrameTooLarge, "max_frame_size"),
    "bad-magic": (assemble(0x1001, b"\x00\x00\x00\x00", PING_BINARY_7), ProtocolError, "magic"),
    "header-size-0": (tt(b"", words=0), ProtocolError, "HEADER SIZE is 0"),
    "header-beyond-frame": (tt(b"\x00\x00\x00\x00", words=0xFFFF), ProtocolError, "HEADER SIZE"),
    "tt-protocol-kitex-protobuf": (tt(b"\x04\x00\x00\x00"), ProtocolError, "Kitex protobuf"),
    "tt-protocol-streaming": (tt(b"\x10\x00\x00\x00"), ProtocolError, "streaming"),
    "tt-protocol-unknown": (tt(b"\x99\x00\x00\x00"), ProtocolError, "protocol id 153"),
    "tt-transform": (tt(b"\x00\x01\x01\x00"), ProtocolError, "transforms [1]"),
    "tt-transforms-beyond-header": (tt(b"\x00\xff\x00\x00"), ProtocolError, "truncated"),
    "tt-str-count-beyond-bytes": (
        tt(b"\x00\x00\x01\xff\xff\x00\x00\x00"),
        ProtocolError,
        "announces 65535 entries",
    ),
    "tt-int-count-beyond-bytes": (
        tt(b"\x00\x00\x10\xff\xff\x00\x00\x00"),
        ProtocolError,
        "announces 65535 entries",
    ),
    "tt-key-beyond-bytes": (
        tt(padded(b"\x00\x00\x01\x00\x01\xff\xffkey\x00\x00")),
        ProtocolError,
        "needs 65535 bytes",
    ),
    "tt-value-beyond-bytes": (
        tt(padded(b"\x00\x00\x10\x00\x01\x00\x0c\x7f\xff250")),
        ProtocolError,
        "needs 32767 bytes",
    ),
    "tt-acl-length-truncated": (tt(b"\x00\x00\x11\x01"), ProtocolError, "ACL token length"),
    "tt-acl-beyond-bytes": (tt(b"\x00\x00\x11\xff\xff\x00\x00\x00"), ProtocolError, "65535"),
    "tt-unknown-info-id": (tt(b"\x00\x00\x02\x00"), ProtocolError, "info id 0x02"),
    "tt-bad-padding": (tt(b"\x00\x00\x00\x07"), ProtocolError, "padding holds 0x07"),
    "tt-too-many-entries": (tt(many_tt_entries(MAX_HEADER_ENTRIES + 1)), ProtocolError, "1001"),
    "tt-too-many-blocks": (
        tt(padded(b"\x00\x00" + b"\x01\x00\x00" * (MAX_INFO_BLOCKS + 1))),
        ProtocolError,
        "info blocks",
    ),
    "tt-inner-frame-mismatch": (
        tt(b"\x00\x00\x00\x00", struct.pack(">I", 99) + PING_BINARY_7),
        ProtocolError,
        "inner frame length is 99",
    ),
    "tt-kitex-protobuf-payload": (
        tt(b"\x00\x00\x00\x00", bytes.fromhex("0000000a90010001000000000000")),
        ProtocolError,
        "Kitex protobuf",
    ),
    "no-payload": (tt(b"\x00\x00\x00\x00", b""), ProtocolError, "no message"),
    "th-varint-6-bytes": (th(b"\x80\x80\x80\x80\x80\x00\x00\x00"), ProtocolError, "5 bytes"),
    "th-varint-over-32-bits": (th(b"\xff\xff\xff\xff\x7f\x00\x00\x00"), ProtocolError, "32 bits"),
    "th-varint-beyond-header": (th(b"\x00\x00\x01\x80"), ProtocolError, "truncated"),
    "th-protocol-json": (th(b"\x01\x00\x00\x00"), ProtocolError, "JSON"),
    "th-2**31-entries": (
        th(padded(b"\x00\x00\x01\x80\x80\x80\x80\x08")),
        ProtocolError,
        "announces 2147483648 entries",
    ),
    "th-2**32-1-transforms": (
        th(padded(b"\x00\xff\xff\xff\xff\x0f")),
        ProtocolError,
        "4294967295 transforms",
    ),
    "th-snappy": (th(b"\x00\x01\x03\x00"), ProtocolError, "snappy"),
    "th-unknown-transform": (th(b"\x00\x01\x63\x00"), ProtocolError, "transform 99 (unknown)"),
    "th-zlib-twice": (th(b"\x00\x02\x01\x01"), ProtocolError, "twice"),
    "th-string-beyond-bytes": (
        th(padded(b"\x00\x00\x01\x01\xff\xff\x03k")),
        ProtocolError,
        "needs 65535 bytes",
    ),
    "th-bad-padding": (th(b"\x00\x00\x00\x01"), ProtocolError, "padding holds 0x01"),
    "th-zlib-corrupt": (th(b"\x00\x01\x01\x00", b"not zlib at all"), ProtocolError, "corrupt"),
    "th-zlib-truncated": (
        th(b"\x00\x01\x01\x00", zlib.compress(PING_BINARY_7)[:-3]),
        ProtocolError,
        "truncated",
    ),
    "th-zlib-trailing": (
        th(b"\x00\x01\x01\x00", zlib.compress(PING_BINARY_7) + b"junk"),
        ProtocolError,
        "4 bytes after",
    ),
    "th-zlib-bomb": (
        th(b"\x00\x01\x01\x00", zlib.compress(bytes(4 * MIB), 9)),
        FrameTooLarge,
        "inflates past",
    ),
}


class TestHostileFrames:
    """Malformed frames are refused with a message saying what was wrong, within QUICK
    seconds, whatever sizes and counts they announce."""

    @pytest.mark.parametrize("name", HOSTILE)
    def test_refused(self, name: str) -> None:
        """Each hostile frame raises the expected error, promptly."""
        frame, error, fragment = HOSTILE[name]
        assert fragment in timed_refusal(frame, error)

    def test_zlib_inflates_within_bound(self) -> None:
        """A zlib bomb never allocates much beyond max_frame_size, however far it would go."""
        bomb = th(b"\x00\x01\x01\x00", zlib.compress(bytes(64 * MIB), 9))
        assert len(bomb) < 100 * 1024
        tracemalloc.start()
        try:
            with pytest.raises(FrameTooLarge):
                parse_frame(bomb, max_frame_size=MIB)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert peak < 3 * MIB

    def test_zlib_up_to_the_bound(self) -> None:
        """A payload that inflates to exactly max_frame_size is accepted."""
        payload = PING_BINARY_7 + bytes(LIMIT - len(PING_BINARY_7))
        frame = th(b"\x00\x01\x01\x00", zlib.compress(payload))
        assert bytes(parse(frame).payload) == payload

    def test_entries_at_the_limit(self) -> None:
        """MAX_HEADER_ENTRIES key-values are accepted, one more is not."""
        parsed = parse(tt(many_tt_entries(MAX_HEADER_ENTRIES)))
        assert len(parsed.int_info) == MAX_HEADER_ENTRIES


class TestBuildRefusals:
    """build_frame refuses what the format cannot carry, with ProtocolError."""

    @pytest.mark.parametrize(
        ("kind", "kwargs", "fragment"),
        [
            ("ttheader", {"str_info": {"k": "v" * 65536}}, "at most 65535"),
            ("ttheader", {"int_info": {65536: "v"}}, "16 bits"),
            ("ttheader", {"transforms": (1,)}, "no transforms"),
            ("ttheader", {"flags": 0x10000}, "FLAGS"),
            ("ttheader", {"seqid": 2**32}, "SEQID"),
            ("ttheader", {"str_info": {str(i): "" for i in range(1001)}}, "at most 1000"),
            ("ttheader", {"str_info": {"k": "\ud800"}}, "cannot be encoded"),
            ("theader", {"int_info": {1: "v"}}, "no integer"),
            ("theader", {"acl_token": "t"}, "no integer"),
            ("theader", {"transforms": (3,)}, "zlib"),
            ("theader", {"str_info": {"k": "v" * 300_000}}, "HEADER SIZE"),
        ],
    )
    def test_refused(self, kind: Any, kwargs: dict[str, Any], fragment: str) -> None:
        """Each impossible header is refused, naming the problem."""
        arguments: dict[str, Any] = {"seqid": 1, "protocol": "binary", "payload": PING_BINARY_7}
        arguments.update(kwargs)
        with pytest.raises(ProtocolError, match=fragment):
            build_frame(kind, **arguments)

    def test_unsigned_seqid(self) -> None:
        """An unsigned 32-bit seqid is written as the same four bytes as its signed value."""
        built = build_frame("ttheader", seqid=2**32 - 1, protocol="binary", payload=b"x")
        assert parse(built).seqid == -1


texts = st.text(max_size=20)
binary_texts = st.binary(max_size=20).map(lambda b: b.decode("utf-8", "surrogateescape"))
frames = st.one_of(
    st.builds(
        lambda seqid, flags, protocol, str_info, int_info, acl, payload, framed: build_frame(
            "ttheader",
            seqid=seqid,
            flags=flags,
            protocol=protocol,
            str_info=str_info,
            int_info=int_info,
            acl_token=acl,
            payload=payload,
            payload_framed=framed,
        ),
        st.integers(-(2**31), 2**31 - 1),
        st.integers(0, 0xFFFF),
        st.sampled_from(["binary", "compact"]),
        st.dictionaries(texts, binary_texts, max_size=5),
        st.dictionaries(st.integers(0, 0xFFFF), texts, max_size=5),
        st.none() | texts,
        st.sampled_from([PING_BINARY_7, PING_COMPACT_5]),
        st.booleans(),
    ),
    st.builds(
        lambda seqid, protocol, str_info, transforms, payload: build_frame(
            "theader",
            seqid=seqid,
            protocol=protocol,
            str_info=str_info,
            transforms=transforms,
            payload=payload,
        ),
        st.integers(-(2**31), 2**31 - 1),
        st.sampled_from(["binary", "compact"]),
        st.dictionaries(texts, binary_texts, max_size=5),
        st.sampled_from([(), (TRANSFORM_ZLIB,)]),
        st.sampled_from([PING_BINARY_7, PING_COMPACT_5]),
    ),
)


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    """A valid frame with some bytes changed, cut, or inserted."""
    frame = bytearray(draw(frames))
    for _ in range(draw(st.integers(1, 4))):
        action = draw(st.sampled_from(["flip", "cut", "insert", "relength"]))
        position = draw(st.integers(0, max(len(frame) - 1, 0)))
        if action == "flip" and frame:
            frame[position] = draw(st.integers(0, 255))
        elif action == "cut":
            del frame[position:]
        elif action == "insert":
            frame[position:position] = draw(st.binary(min_size=1, max_size=8))
        elif len(frame) >= 4:
            # Keep LENGTH right, so that the header itself is what gets parsed.
            frame[:4] = struct.pack(">I", len(frame) - 4)
    return bytes(frame)


def parse_or_refuse(data: bytes) -> None:
    """Parse ``data``: the only acceptable failures are ProtocolError and its subclass."""
    with cpu_time() as took, contextlib.suppress(ProtocolError):
        parse_frame(data, max_frame_size=LIMIT)
    assert took.seconds < 0.1, f"took {took.seconds * 1000:.1f} ms of CPU"


PROPERTY = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.mark.slow
class TestProperties:
    """Properties over generated frames."""

    @PROPERTY
    @given(
        st.binary(max_size=200)
        | st.builds(
            lambda magic, rest: struct.pack(">I", len(rest) + 2) + magic + rest,
            st.sampled_from([b"\x10\x00", b"\x0f\xff"]),
            st.binary(max_size=200),
        )
    )
    def test_random_bytes(self, data: bytes) -> None:
        """Random bytes, with or without a right LENGTH and magic, only ever raise
        ProtocolError, quickly."""
        parse_or_refuse(data)

    @PROPERTY
    @given(mutated())
    def test_mutated_frames(self, data: bytes) -> None:
        """Valid frames with bytes flipped, cut or inserted only ever raise ProtocolError."""
        parse_or_refuse(data)

    @PROPERTY
    @given(
        st.sampled_from(["ttheader", "theader"]),
        st.integers(-(2**31), 2**31 - 1),
        st.sampled_from(["binary", "compact"]),
        st.dictionaries(texts | binary_texts, texts | binary_texts, max_size=8),
    )
    def test_round_trip(self, kind: Any, seqid: int, protocol: Any, info: dict[str, str]) -> None:
        """What build_frame writes, parse_frame reads back unchanged, binary values too."""
        frame = build_frame(
            kind, seqid=seqid, protocol=protocol, payload=b"\x80\x01", str_info=info
        )
        parsed = parse(frame)
        assert (parsed.kind, parsed.seqid, parsed.protocol) == (kind, seqid, protocol)
        assert parsed.str_info == info
        assert bytes(parsed.payload) == b"\x80\x01"

    @PROPERTY
    @given(
        st.dictionaries(st.binary(max_size=10), st.binary(max_size=10), max_size=8),
        st.dictionaries(st.integers(0, 0xFFFF), st.binary(max_size=10), max_size=8),
        st.none() | st.binary(max_size=10),
    )
    def test_tests_codec_round_trip(
        self, str_kv: dict[bytes, bytes], int_kv: dict[int, bytes], acl: bytes | None
    ) -> None:
        """Frames from the tests' encoder read as the tests' decoder reads them."""
        frame = ttheader.encode(
            TTHeader(payload=PING_BINARY_7, str_kv=str_kv, int_kv=int_kv, acl_token=acl)
        )
        parsed = parse(frame)
        assert parsed.str_info == ttheader.texts(str_kv)
        assert {k: v.encode("utf-8", "surrogateescape") for k, v in parsed.int_info.items()} == (
            int_kv
        )
        assert parsed.acl_token == (None if acl is None else acl.decode("utf-8", "surrogateescape"))
