"""The compiled codec (``kitegreen.codec._thrift``) in memory, no sockets.

It must agree with thriftpy2's own codecs (Cython binary, pure-Python compact) and with Apache
Thrift's pure-Python protocols on every type, byte for byte where it encodes; find where a
message ends from any prefix of it; and refuse malformed input before it costs anything: no
allocation or loop sized by a number the bytes did not back, no recursion past 64 levels, no
integer that does not fit its type.
"""

from __future__ import annotations

import contextlib
import shutil
import struct
import subprocess
import sys
import tracemalloc
from pathlib import Path
from typing import Any

import pytest
import thriftpy2
from conftest import TESTS, assert_no_leak, cpu_time, testsvc_thrift
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from thriftpy2.protocol import TBinaryProtocol as Tp2PyBinary
from thriftpy2.protocol.compact import TCompactProtocol as Tp2Compact
from thriftpy2.protocol.cybin import TCyBinaryProtocol
from thriftpy2.transport.memory import TCyMemoryBuffer
from wire import varint

import kitegreen
from kitegreen.codec import _thrift
from kitegreen.exceptions import FrameTooLarge, ProtocolError

codec_thrift = thriftpy2.load(str(TESTS / "idl" / "codec.thrift"), module_name="codec_thrift")
All, Leaf, Node = codec_thrift.All, codec_thrift.Leaf, codec_thrift.Node
AllArgs = codec_thrift.Codec.all_args

BINARY, COMPACT = _thrift.BINARY, _thrift.COMPACT
PROTOCOLS = {"binary": BINARY, "compact": COMPACT}
CALL = 1
INT32_MAX = 2**31 - 1

pytestmark = pytest.mark.timeout(60)

CODEC_SETTINGS = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


# -- helpers --------------------------------------------------------------------------------------


def tp2_protocol(protocol: str, buf: Any, pure: bool = False) -> Any:
    if protocol == "compact":
        return Tp2Compact(buf)
    return Tp2PyBinary(buf) if pure else TCyBinaryProtocol(buf)


def tp2_write(protocol: str, obj: Any, name: str = "all", seqid: int = 1) -> bytes:
    """A CALL message encoded by thriftpy2 (Cython binary or pure-Python compact)."""
    buf = TCyMemoryBuffer()
    proto = tp2_protocol(protocol, buf)
    proto.write_message_begin(name, CALL, seqid)
    proto.write_struct(obj)
    proto.write_message_end()
    return bytes(buf.getvalue())


def tp2_read(protocol: str, data: bytes, cls: Any, pure: bool = False) -> Any:
    proto = tp2_protocol(protocol, TCyMemoryBuffer(data), pure)
    proto.read_message_begin()
    obj = cls()
    proto.read_struct(obj)
    return obj


def read(protocol: str, data: bytes, cls: Any = AllArgs) -> Any:
    """kitegreen's decode of a whole message: the argument struct."""
    proto = PROTOCOLS[protocol]
    _, _, _, pos = _thrift.read_message_begin(proto, data, 0, len(data))
    return _thrift.read_struct(proto, data, pos, len(data), _thrift.compile(cls))


def write(
    protocol: str, obj: Any, name: str = "all", seqid: int = 1, framed: bool = False
) -> bytes:
    spec = _thrift.compile(type(obj))
    return _thrift.write_message(PROTOCOLS[protocol], name, CALL, seqid, obj, spec, framed)


def header(protocol: str, name: str = "all") -> bytes:
    raw = name.encode()
    if protocol == "binary":
        return struct.pack("!HHI", 0x8001, CALL, len(raw)) + raw + struct.pack("!i", 1)
    return bytes([0x82, (CALL << 5) | 1]) + varint(1) + varint(len(raw)) + raw


def refused(
    protocol: str, data: bytes, cls: Any = AllArgs, *, scan_waits: bool = False
) -> ProtocolError:
    """The decoder's error for ``data`` as a whole message. The scanner, which cannot know the
    message is whole, must refuse it too, or (``scan_waits``) wait for more bytes."""
    with pytest.raises(ProtocolError) as decoded:
        read(protocol, data, cls)
    if scan_waits:
        assert isinstance(
            _thrift.scan(PROTOCOLS[protocol], data, 0, len(data), 1 << 24), _thrift.Scanner
        )
    else:
        with pytest.raises(ProtocolError):
            _thrift.scan(PROTOCOLS[protocol], data, 0, len(data), 1 << 24)
    return decoded.value


# -- values of every type -------------------------------------------------------------------------

i16 = st.integers(-(2**15), 2**15 - 1)
i32 = st.integers(-(2**31), 2**31 - 1)
i64 = st.integers(-(2**63), 2**63 - 1)
text = st.text(max_size=20)
blob = st.binary(max_size=20)
leaves = st.builds(Leaf, s=st.none() | text, b=st.none() | blob)


def opt(strategy: Any) -> Any:
    return st.none() | strategy


all_values = st.builds(
    All,
    flag=opt(st.booleans()),
    tiny=opt(st.integers(-128, 127)),
    short_int=opt(i16),
    int32=opt(i32),
    int64=opt(i64),
    real=opt(st.floats(allow_nan=False)),
    text=opt(text),
    blob=opt(blob),
    ints=opt(st.lists(i32, max_size=20)),
    names=opt(st.lists(text, max_size=5, unique=True)),
    leaves_by_name=opt(st.dictionaries(text, leaves, max_size=4)),
    nested=opt(st.lists(st.lists(i64, max_size=4), max_size=4)),
    flags=opt(st.dictionaries(i32, st.lists(st.booleans(), max_size=20), max_size=4)),
    color=opt(st.sampled_from([1, 2])),
    leaf=opt(leaves),
    leaves=opt(st.lists(leaves, max_size=4)),
    with_default=opt(text),
    bools=opt(st.lists(st.booleans(), max_size=40)),
    reals=opt(st.dictionaries(i16, st.floats(allow_nan=False), max_size=4)),
    far=opt(i32),
)


def chain(depth: int) -> Any:
    """A Node holding a Node ... ``depth`` structs deep."""
    node = Node(value=0)
    for i in range(1, depth):
        node = Node(value=i, inner=node)
    return node


# -- agreement with thriftpy2 and Apache Thrift ---------------------------------------------------


# 150 generated values per test: the codec's long property runs, left out of the fast loop.
@pytest.mark.slow
@pytest.mark.parametrize("protocol", ["binary", "compact"])
class TestAgreement:
    @CODEC_SETTINGS
    @given(value=all_values)
    def test_decodes_what_thriftpy2_encodes_as_thriftpy2_does(self, protocol, value):
        """Every type, from thriftpy2's encoder: the same object thriftpy2's decoder makes."""
        data = tp2_write(protocol, AllArgs(value=value))
        assert read(protocol, data) == tp2_read(protocol, data, AllArgs)

    @CODEC_SETTINGS
    @given(value=all_values, seqid=i32)
    def test_encodes_byte_for_byte_as_thriftpy2(self, protocol, value, seqid):
        """Replies are the bytes thriftpy2 would have sent, so its clients see no change."""
        if protocol == "compact":
            # thriftpy2's compact writer loops for ever on a negative sequence id (its varint
            # shifts a negative int); kitegreen writes it as an unsigned 32-bit varint, as
            # Apache Thrift's C++ and Java do.
            seqid = abs(seqid) % 2**31
        args = AllArgs(value=value)
        assert write(protocol, args, seqid=seqid) == tp2_write(protocol, args, seqid=seqid)

    @CODEC_SETTINGS
    @given(value=all_values)
    def test_round_trip(self, protocol, value):
        """What it encodes it decodes back to what thriftpy2 makes of the same bytes."""
        data = write(protocol, AllArgs(value=value))
        assert read(protocol, data) == tp2_read(protocol, data, AllArgs)

    def test_message_header(self, protocol):
        """Name, type and sequence id come back as sent (a negative one too: compact carries it
        as an unsigned 32-bit varint), and the offset is where the arguments begin."""
        data = write(protocol, AllArgs(value=All(int32=5)), name="all", seqid=-7)
        name, mtype, seqid, pos = _thrift.read_message_begin(
            PROTOCOLS[protocol], data, 0, len(data)
        )
        assert (name, mtype, seqid) == ("all", CALL, -7)
        assert _thrift.read_struct(
            PROTOCOLS[protocol], data, pos, len(data), _thrift.compile(AllArgs)
        ) == AllArgs(value=All(int32=5))

    @CODEC_SETTINGS
    @given(value=all_values)
    def test_arguments_as_a_tuple_are_the_struct_fields(self, protocol, value):
        """read_args (what handlers are called with) gives the fields read_struct sets, in
        IDL order, defaults for those absent."""
        data = tp2_write(protocol, AllArgs(value=value))
        _, _, _, pos = _thrift.read_message_begin(PROTOCOLS[protocol], data, 0, len(data))
        spec = _thrift.compile(AllArgs)
        args = _thrift.read_args(PROTOCOLS[protocol], data, pos, len(data), spec)
        assert args == (read(protocol, data).value,)
        empty = _thrift.read_args(PROTOCOLS[protocol], data, len(data) - 1, len(data), spec)
        assert empty == (None,)

    @CODEC_SETTINGS
    @given(value=all_values)
    def test_a_result_field_encodes_as_its_result_struct(self, protocol, value):
        """write_result (a reply without a result object) writes the bytes of the result
        struct with that one field set; None writes an empty struct (a void reply)."""
        result_cls = codec_thrift.Codec.all_result
        spec = _thrift.compile(result_cls)
        proto = PROTOCOLS[protocol]
        for success in (value, None):
            expected = _thrift.write_message(
                proto, "all", 2, 9, result_cls(success=success), spec, True
            )
            assert _thrift.write_result(proto, "all", 2, 9, 0, success, spec, True) == expected

    def test_result_field_must_exist(self, protocol):
        """A field id the result does not have is a TypeError, not a malformed reply."""
        spec = _thrift.compile(codec_thrift.Codec.all_result)
        with pytest.raises(TypeError, match="no field 5"):
            _thrift.write_result(PROTOCOLS[protocol], "all", 2, 9, 5, All(), spec, False)

    def test_framed_reply_carries_its_length(self, protocol):
        """framed=True puts the payload's length in front of it."""
        args = AllArgs(value=All(text="x" * 300))
        framed = write(protocol, args, framed=True)
        assert framed[4:] == write(protocol, args)
        assert struct.unpack("!i", framed[:4])[0] == len(framed) - 4

    def test_apache_thrift_reads_what_it_writes_and_back(self, protocol):
        """Apache Thrift's pure-Python protocol (an independent implementation) reads kitegreen's
        encoding of Item, and kitegreen reads Apache's."""
        from testsvc import TestService as ApacheService
        from testsvc.ttypes import Item as ApacheItem
        from thrift.protocol import TBinaryProtocol, TCompactProtocol
        from thrift.transport.TTransport import TMemoryBuffer

        apache_proto = (
            TBinaryProtocol.TBinaryProtocol
            if protocol == "binary"
            else TCompactProtocol.TCompactProtocol
        )
        child = ApacheItem(id=2, name="child", tags=[], counts={})
        item = ApacheItem(id=1, name="é", tags=["a", "b"], counts={"x": -(2**40)}, child=child)
        out = TMemoryBuffer()
        oprot = apache_proto(out)
        oprot.writeMessageBegin("roundtrip", CALL, 9)
        ApacheService.roundtrip_args(item=item).write(oprot)
        oprot.writeMessageEnd()
        ours = read(protocol, out.getvalue(), testsvc_thrift.TestService.roundtrip_args)
        assert ours.item.counts == {"x": -(2**40)}
        assert ours.item.child.name == "child"

        data = write(protocol, ours, name="roundtrip", seqid=9)
        iprot = apache_proto(TMemoryBuffer(data))
        assert iprot.readMessageBegin() == ("roundtrip", CALL, 9)
        back = ApacheService.roundtrip_args()
        back.read(iprot)
        assert back.item == item

    @CODEC_SETTINGS
    @given(value=all_values)
    def test_another_idl_version_reads_what_it_knows(self, protocol, value):
        """Read with Partial, All's bytes give what thriftpy2's Cython reader gives: unknown
        fields skipped, a field of another type skipped, containers of other element types
        empty. (The reference is the binary reading for both protocols: thriftpy2's pure-Python
        compact reader was seen to hang skipping fields it does not know.)"""
        data = tp2_write(protocol, AllArgs(value=value))
        partial = codec_thrift.Codec.partial_args
        ours = read(protocol, data, partial)
        assert ours == tp2_read("binary", tp2_write("binary", AllArgs(value=value)), partial)
        assert ours.value.int32 == value.int32
        assert ours.value.text is None
        assert ours.value.ints == ([] if value.ints is not None else None)

    def test_string_that_is_not_utf8_arrives_as_bytes(self, protocol):
        """thriftpy2 hands a handler invalid UTF-8 as bytes; so does kitegreen."""
        data = tp2_write(
            protocol, AllArgs(value=All(text="\udcff".encode("utf-8", "surrogatepass")))
        )
        assert read(protocol, data).value.text == b"\xed\xb3\xbf"

    def test_structs_nest_64_deep(self, protocol):
        """64 levels (the outermost struct included) decode: thriftpy2's and Apache's limit."""
        data = write(protocol, chain(64))
        _, _, _, pos = _thrift.read_message_begin(PROTOCOLS[protocol], data, 0, len(data))
        node = _thrift.read_struct(PROTOCOLS[protocol], data, pos, len(data), _thrift.compile(Node))
        assert node.value == 63


# -- the scanner ----------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("protocol", ["binary", "compact"])
class TestScanner:
    @CODEC_SETTINGS
    @given(value=all_values, data=st.data())
    def test_finds_the_end_from_any_prefix(self, protocol, value, data):
        """Scanning a prefix asks for more; fed the rest in any chunks, it ends exactly at the
        message's end, not before and not after the next message's first bytes."""
        message = tp2_write(protocol, AllArgs(value=value))
        stream = message + tp2_write(protocol, AllArgs(value=All(int32=1)))
        cut = data.draw(st.integers(1, len(message) - 1))
        scanner = _thrift.scan(PROTOCOLS[protocol], stream, 0, cut, 1 << 24)
        assert isinstance(scanner, _thrift.Scanner)
        end = -1
        pos = cut
        while end < 0:
            pos = min(len(stream), pos + data.draw(st.integers(1, 64)))
            end = scanner.feed(stream, 0, pos)
        assert end == len(message)
        assert _thrift.scan(PROTOCOLS[protocol], stream, 0, len(stream), 1 << 24) == len(message)

    def test_one_byte_at_a_time(self, protocol):
        """Fed a byte at a time, the scan does work proportional to the bytes, and ends right."""
        message = tp2_write(protocol, AllArgs(value=All(ints=list(range(500)), text="x" * 500)))
        scanner = _thrift.scan(PROTOCOLS[protocol], message, 0, 1, 1 << 24)
        ends = [scanner.feed(message, 0, n) for n in range(2, len(message) + 1)]
        assert ends[:-1] == [-1] * (len(ends) - 1)
        assert ends[-1] == len(message)

    def test_offsets_are_relative_to_start(self, protocol):
        """A message that begins inside a buffer (after a pipelined one) is found where it is."""
        message = tp2_write(protocol, AllArgs(value=All(int32=1)))
        stream = b"junk" + message
        assert _thrift.scan(PROTOCOLS[protocol], stream, 4, len(stream), 1 << 24) == len(stream)

    def test_message_over_max_size_is_refused_before_it_arrives(self, protocol):
        """A string announcing more than max_size is FrameTooLarge at its length field."""
        data = header(protocol) + (
            b"\x0c\x00\x01" + b"\x0b\x00\x07" + struct.pack("!i", 2000)
            if protocol == "binary"
            else b"\x1c" + b"\x78" + varint(2000)
        )
        with pytest.raises(FrameTooLarge):
            _thrift.scan(PROTOCOLS[protocol], data, 0, len(data), 1024)


class TestFrameEnd:
    def test_finds_the_end_of_a_whole_frame(self):
        """A frame's end is its 4-byte length past its start; bytes after it are not its."""
        stream = b"xx" + struct.pack("!i", 3) + b"abc" + b"next"
        assert _thrift.frame_end(stream, 2, len(stream), 1024) == 9

    @pytest.mark.parametrize("have", [0, 3, 4, 6])
    def test_waits_for_the_rest(self, have):
        """Until the length and all its bytes are there, -1: nothing is assumed or reserved."""
        frame = struct.pack("!i", 3) + b"abc"
        assert _thrift.frame_end(frame, 0, have, 1024) == -1

    @pytest.mark.parametrize("length", [0, -1, -(2**31)])
    def test_length_must_be_positive(self, length):
        with pytest.raises(ProtocolError, match="must be positive"):
            _thrift.frame_end(struct.pack("!i", length), 0, 4, 1024)

    def test_length_over_max_size_is_refused_before_its_bytes(self):
        """FrameTooLarge as soon as the length is read, not once the bytes arrived."""
        with pytest.raises(FrameTooLarge, match="frame of 1025 bytes"):
            _thrift.frame_end(struct.pack("!i", 1025), 0, 4, 1024)


# -- refusing malformed input ---------------------------------------------------------------------


def b_field(ttype: int, fid: int) -> bytes:
    return struct.pack("!bh", ttype, fid)


def b_list(etype: int, count: int) -> bytes:
    return struct.pack("!bi", etype, count)


def c_list(ctype: int, count: int) -> bytes:
    return bytes([0xF0 | ctype]) + varint(count)


UNDEFINED_BINARY = [0, 1, 5, 7, 9, 16, 17, 19, 100, 127, -1]
UNDEFINED_COMPACT = [13, 14, 15]


class TestRefusal:
    @pytest.mark.parametrize("etype", UNDEFINED_BINARY)
    @pytest.mark.parametrize("where", ["unknown field", "known field", "map key", "map value"])
    def test_undefined_binary_types(self, etype, where):
        """An undefined element type is refused at once, wherever it is, whatever the count."""
        if where == "unknown field":
            body = b_field(15, 77) + b_list(etype, INT32_MAX)
        elif where == "known field":
            body = b_field(12, 1) + b_field(15, 9) + b_list(etype, INT32_MAX)
        else:
            kv = (etype, 8) if where == "map key" else (8, etype)
            body = b_field(13, 77) + struct.pack("!bbi", *kv, INT32_MAX)
        with cpu_time() as took:
            error = refused("binary", header("binary") + body)
        assert took.seconds < 0.01
        assert "undefined" in str(error)

    @pytest.mark.parametrize("etype", [t for t in UNDEFINED_BINARY if t != 0])  # 0 ends a struct
    def test_undefined_binary_field_type(self, etype):
        """A field header with an undefined type is refused."""
        refused("binary", header("binary") + struct.pack("!bh", etype, 3) + b"\x00" * 8)

    @pytest.mark.parametrize("ctype", [*UNDEFINED_COMPACT, 0])
    @pytest.mark.parametrize("where", ["field", "list", "set", "map"])
    def test_undefined_compact_types(self, ctype, where):
        """Compact's undefined type nibbles (13-15; 0 where a value is due) are refused."""
        if where == "field":
            # With ctype 0: delta 1, type 0, which is not STOP (that is the whole byte 0).
            body = b"\x10" if ctype == 0 else bytes([0x10 | ctype]) + b"\x00" * 8
        elif where in ("list", "set"):
            body = bytes([0x19 if where == "list" else 0x1A]) + c_list(ctype, INT32_MAX)
        else:
            body = b"\x1b" + varint(INT32_MAX) + bytes([(ctype << 4) | 5])
        with cpu_time() as took:
            refused("compact", header("compact") + body)
        assert took.seconds < 0.01

    @pytest.mark.parametrize("protocol", ["binary", "compact"])
    @pytest.mark.parametrize("count", [2**16, INT32_MAX])
    def test_counts_beyond_the_bytes_are_not_allocated(self, protocol, count):
        """A list announcing more i32s than bytes follow is refused before its list exists:
        nothing near count * 8 bytes is allocated (tracemalloc's peak), and it is quick."""
        if protocol == "binary":
            body = b_field(12, 1) + b_field(15, 9) + b_list(8, count) + b"\x00" * 64
        else:
            body = b"\x1c" + b"\x99" + c_list(5, count) + b"\x00" * 64
        tracemalloc.start()
        try:
            with cpu_time() as took:
                # Under 16 MiB of i32s might still arrive on a buffered wire: the scanner waits.
                error = refused(protocol, header(protocol) + body, scan_waits=count * 4 < 1 << 24)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert "elements" in str(error)
        assert peak < 64 * 1024
        assert took.seconds < 0.01

    @pytest.mark.parametrize("protocol", ["binary", "compact"])
    def test_string_longer_than_the_bytes_left(self, protocol):
        """A 1 GiB string length in a small message: refused, nothing allocated."""
        length = 1 << 30
        body = (
            b_field(12, 1) + b_field(11, 7) + struct.pack("!i", length)
            if protocol == "binary"
            else b"\x1c" + b"\x78" + varint(length)
        )
        tracemalloc.start()
        try:
            error = refused(protocol, header(protocol) + body + b"xyz")
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert "truncated" in str(error)
        assert peak < 64 * 1024

    def test_negative_binary_lengths(self):
        """A negative string length or container count is refused, not taken as huge."""
        refused(
            "binary", header("binary") + b_field(12, 1) + b_field(11, 7) + struct.pack("!i", -1)
        )
        refused("binary", header("binary") + b_field(12, 1) + b_field(15, 9) + b_list(8, -5))

    @pytest.mark.parametrize("protocol", ["binary", "compact"])
    @pytest.mark.parametrize("shape", ["structs", "lists", "maps"])
    def test_nesting_past_64_is_refused(self, protocol, shape):
        """10,000 levels of nesting in a small message: refused at level 65, no stack overflow,
        by the decoder and by the scanner, in unknown fields too."""
        if protocol == "binary":
            body = {
                "structs": b_field(12, 99) * 10000,
                "lists": b_field(15, 99) + b_list(15, 1) * 10000,
                "maps": b_field(13, 99) + (struct.pack("!bbi", 8, 13, 1) + b"\x00" * 4) * 10000,
            }[shape]
        else:
            body = {
                "structs": b"\x1c" * 10000,
                "lists": b"\x19" + b"\x19" * 10000,
                "maps": b"\x1b" + b"\x01\x5b\x00" * 10000,
            }[shape]
        error = refused(protocol, header(protocol) + body)
        assert "deeper than 64" in str(error)

    def test_compact_integers_that_overflow_their_type(self):
        """A compact i32 of 2**41 or an i16 of 70,000 is refused, not wrapped or passed on."""
        zigzag = lambda n: (n << 1) ^ (n >> 63)  # noqa: E731
        # All.int32 (field 4, type i32 = 5) inside args field 1 (struct).
        too_big = header("compact") + b"\x1c" + b"\x45" + varint(zigzag(2**41)) + b"\x00\x00"
        assert "overflows 32 bits" in str(refused("compact", too_big))
        short = header("compact") + b"\x1c" + b"\x34" + varint(zigzag(70000)) + b"\x00\x00"
        assert "i16 out of range" in str(refused("compact", short))
        element = header("compact") + b"\x1c" + b"\x99" + bytes([0x15]) + varint(zigzag(2**33))
        assert "overflows 32 bits" in str(refused("compact", element + b"\x00\x00"))
        long_i64 = header("compact") + b"\x1c" + b"\x56" + b"\xff" * 10 + b"\x01\x00\x00"
        assert "varint" in str(refused("compact", long_i64))

    def test_compact_bool_byte_must_be_a_bool(self):
        """Inside a list<bool> each element is 1 (true) or 2 (false); 7 is refused."""
        # Field 18 (bools) is too far from field 0 for a delta: type 9, then its zigzag id.
        data = header("compact") + b"\x1c" + b"\x09" + varint(36) + bytes([0x31]) + b"\x01\x02\x07"
        assert "bool" in str(refused("compact", data + b"\x00\x00"))

    @pytest.mark.parametrize("protocol", ["binary", "compact"])
    def test_every_prefix_of_a_valid_message_is_truncated(self, protocol):
        """Cut anywhere, a message is a clean ProtocolError from the decoder (a framed message
        that ends early), and an incomplete scan."""
        data = tp2_write(protocol, AllArgs(value=All(ints=[1, 2], leaf=Leaf(s="s"), far=1)))
        for n in range(len(data)):
            with pytest.raises(ProtocolError):
                read(protocol, data[:n])
            if n:
                found = _thrift.scan(PROTOCOLS[protocol], data, 0, n, 1 << 24)
                assert isinstance(found, _thrift.Scanner)

    @pytest.mark.parametrize("protocol", ["binary", "compact"])
    def test_bytes_after_the_message_are_refused(self, protocol):
        """A frame holding more than its message is malformed."""
        data = tp2_write(protocol, AllArgs(value=All(int32=1)))
        assert "follow the end" in str(refused_decode(protocol, data + b"\x00"))

    def test_unhashable_map_key_is_a_protocol_error(self):
        """A map whose keys Python cannot hash (map<list<..>, ..>) is refused, not a crash."""
        body = b_field(12, 1) + b_field(13, 1) + struct.pack("!bbi", 15, 8, 1)
        body += b_list(8, 1) + struct.pack("!i", 1) + struct.pack("!i", 2) + b"\x00\x00"
        with pytest.raises(ProtocolError, match="dict key"):
            read("binary", header("binary", "weird") + body, codec_thrift.Codec.weird_args)

    @pytest.mark.slow
    @pytest.mark.parametrize("protocol", ["binary", "compact"])
    @settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(data=st.data())
    def test_mutated_messages_never_crash(self, protocol, data):
        """Valid messages with random bytes overwritten, cut or inserted: decoding and scanning
        either succeed or raise ProtocolError, quickly."""
        value = data.draw(all_values)
        message = bytearray(tp2_write(protocol, AllArgs(value=value)))
        for _ in range(data.draw(st.integers(1, 4))):
            at = data.draw(st.integers(0, len(message) - 1))
            kind = data.draw(st.sampled_from(["set", "cut", "insert"]))
            if kind == "set":
                message[at] = data.draw(st.integers(0, 255))
            elif kind == "cut":
                del message[at : at + data.draw(st.integers(1, 8))]
            else:
                message[at:at] = data.draw(st.binary(min_size=1, max_size=8))
        raw = bytes(message)
        with cpu_time() as took:
            for attempt in (lambda: read(protocol, raw), lambda: scan_all(protocol, raw)):
                with contextlib.suppress(ProtocolError):
                    attempt()
        assert took.seconds < 0.05


def refused_decode(protocol: str, data: bytes) -> ProtocolError:
    with pytest.raises(ProtocolError) as decoded:
        read(protocol, data)
    return decoded.value


def scan_all(protocol: str, data: bytes) -> int:
    found = _thrift.scan(PROTOCOLS[protocol], data, 0, len(data), 1 << 24)
    return found if isinstance(found, int) else -1


# -- encoding what a handler returns --------------------------------------------------------------


@pytest.mark.parametrize("protocol", ["binary", "compact"])
class TestEncodingErrors:
    @pytest.mark.parametrize(
        ("value", "error", "words"),
        [
            (All(int32="1"), TypeError, "int32: expected an int for i32, got str"),
            (All(int32=2**31), OverflowError, "out of range for i32"),
            (All(tiny=200), OverflowError, "out of range for byte"),
            (All(short_int=-(2**15) - 1), OverflowError, "out of range for i16"),
            (All(int64=2**63), OverflowError, "out of range for i64"),
            (All(int32=1.0), TypeError, "expected an int"),
            (All(real="x"), TypeError, "expected a float"),
            (All(text=5), TypeError, "text: expected str or bytes, got int"),
            (All(ints="abc"), TypeError, "expected a list, set or tuple"),
            (All(ints={1: 2}), TypeError, "expected a list, set or tuple"),
            (All(leaves_by_name=[1]), TypeError, "expected a dict"),
            (All(leaf="leaf"), TypeError, "expected Leaf, got str"),
            (All(text="\ud800"), UnicodeEncodeError, "surrogate"),
        ],
    )
    def test_value_that_does_not_match_the_idl(self, protocol, value, error, words):
        """A handler's wrong result is an exception naming the field, never a half message."""
        with pytest.raises(error, match=words):
            write(protocol, AllArgs(value=value))
        assert read(protocol, write(protocol, AllArgs(value=All(int32=3)))).value.int32 == 3

    def test_cycle_is_refused_not_a_crash(self, protocol):
        """A struct that contains itself stops at 64 levels instead of exhausting the stack."""
        node = Node(value=1)
        node.inner = node
        with pytest.raises(ValueError, match="deeper than 64"):
            write(protocol, node)

    def test_sets_tuples_and_mappings_encode(self, protocol):
        """Any sequence encodes as a list or set, any mapping as a map."""
        from types import MappingProxyType

        value = All(ints=(1, 2), names={"a"}, reals=MappingProxyType({1: 0.5}))
        back = read(protocol, write(protocol, AllArgs(value=value))).value
        assert (back.ints, back.names, back.reals) == ([1, 2], ["a"], {1: 0.5})


# -- memory ---------------------------------------------------------------------------------------


@pytest.mark.slow
def test_no_leaks_on_success_or_error_paths():
    """Thousands of decodes, encodes and refusals leave no memory behind (tracemalloc)."""
    good = tp2_write("binary", AllArgs(value=All(ints=[1, 2], leaves=[Leaf(s="a")], far=7)))
    bad = good[:-3]
    bomb = header("binary") + b_field(15, 77) + b_list(1, INT32_MAX)
    wrong = AllArgs(value=All(int32="x"))

    def work() -> None:
        for protocol in ("binary", "compact"):
            data = tp2_write(
                protocol, AllArgs(value=All(text="t", nested=[[1]], flags={1: [True]}))
            )
            read(protocol, data)
            write(protocol, AllArgs(value=All(text="t")))
            with pytest.raises(TypeError):
                write(protocol, wrong)
        for data in (bad, bomb):
            with pytest.raises(ProtocolError):
                read("binary", data)
        scanner = _thrift.scan(BINARY, good, 0, 10, 1 << 24)
        assert scanner.feed(good, 0, len(good)) == len(good)
        read("binary", good)

    assert_no_leak(work)


@pytest.mark.slow
def test_a_checkout_without_the_built_codec_says_how_to_fix_it(tmp_path):
    """Importing kitegreen from a source tree whose codec was never built (``pip install .``,
    then ``python -m kitegreen`` from the checkout) names the cause and the fix."""
    source = Path(kitegreen.__file__).parent
    shutil.copytree(source, tmp_path / "kitegreen", ignore=shutil.ignore_patterns("*.so"))
    result = subprocess.run(
        [sys.executable, "-c", "import kitegreen.codec"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 1
    assert "compiled codec is not built" in result.stderr
    assert "pip install -e ." in result.stderr
