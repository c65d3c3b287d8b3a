"""The compiled header parser and builder (``_headers.c``) against the Python implementation
they replaced (``tests/headers_reference.py``), as a differential oracle.

For any bytes, the two parsers must agree: the same fields, or the same exception class with
the same message. For any arguments, the two builders must write the same bytes or refuse with
the same error. Inputs are valid frames from either builder, the same mutated (bytes flipped,
cut, inserted, lengths kept right), hand-made headers of random blocks, and random bytes.
"""

from __future__ import annotations

import struct
import zlib
from typing import Any

import headers_reference as ref
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from ttheader import assemble

from kitegreen import ProtocolError
from kitegreen.codec import _headers, headers

LIMIT = 64 * 1024
PING_BINARY = bytes.fromhex("800100010000000470696e670000000700")
PING_COMPACT = bytes.fromhex("8221050470696e6700")

DIFF = settings(max_examples=500, deadline=None, suppress_health_check=list(HealthCheck))
"""Examples per property: a few seconds each here; the ASAN fuzz runs used 3,000 and more."""
pytestmark = pytest.mark.timeout(300)


def outcome(parse: Any, data: bytes, limit: int = LIMIT) -> Any:
    """What a parser makes of ``data``: its fields, or its error's class and message."""
    try:
        frame = parse(data, max_frame_size=limit)
    except Exception as exc:
        return (type(exc).__name__, str(exc))
    return (
        frame.kind,
        frame.flags,
        frame.seqid,
        frame.protocol,
        frame.transforms,
        frame.int_info,
        list(frame.str_info.items()),
        frame.acl_token,
        bytes(frame.payload),
        frame.payload_framed,
    )


def agree(data: bytes, limit: int = LIMIT) -> None:
    assert outcome(headers.parse_frame, data, limit) == outcome(ref.parse_frame, data, limit)
    try:
        frame = headers.parse_frame(data, max_frame_size=limit)
    except ProtocolError:
        return
    # int_value() reads one key from the header bytes, before the dicts exist; then from them.
    keys = [0, 1, 2, 12, 22, 0xFFFF, *range(3, 9)]
    direct = {key: frame.int_value(key) for key in keys}
    assert direct == {key: frame.int_info.get(key) for key in keys}
    assert direct == {key: frame.int_value(key) for key in keys}
    assert frame.int_value(-1) is None
    assert frame.int_value(1 << 16) is None
    # log_id, found by the parse; empty or absent is None, as the request loop logs it.
    assert frame.log_id == (direct[2] or None)
    assert frame.codec_protocol == {"binary": 0, "compact": 2}[frame.protocol]
    # Parsed in place from bytes, or from a bytearray that is then reused (a connection's
    # buffer): the lazy reads see the frame as it was.
    scratch = bytearray(b"\xaa" + data)
    in_bytes = headers.parse_frame(b"\xaa" + data, start=1, max_frame_size=limit)
    in_array = headers.parse_frame(scratch, start=1, max_frame_size=limit)
    scratch[:] = bytes(len(scratch))
    for other in (in_bytes, in_array):
        assert (other.log_id, other.int_info, other.str_info, other.str_value("rip")) == (
            frame.log_id,
            frame.int_info,
            frame.str_info,
            frame.str_info.get("rip"),
        )
    # str_value() the same way, on a frame whose dicts are not read yet.
    fresh = headers.parse_frame(data, max_frame_size=limit)
    keys_str = [*ref.parse_frame(data, max_frame_size=limit).str_info, "", "rip", "\udcff"]
    direct_str = {key: fresh.str_value(key) for key in keys_str}
    assert direct_str == {key: fresh.str_info.get(key) for key in keys_str}
    assert direct_str == {key: fresh.str_value(key) for key in keys_str}


texts = st.text(max_size=12)
binary_texts = st.binary(max_size=12).map(lambda b: b.decode("utf-8", "surrogateescape"))
any_texts = texts | binary_texts


@st.composite
def valid_frames(draw: st.DrawFn) -> bytes:
    """A frame from the reference builder, or from the tests' raw assembler with protocol 3."""
    kind = draw(st.sampled_from(["ttheader", "theader"]))
    protocol = draw(st.sampled_from(["binary", "compact"]))
    payload = PING_BINARY if protocol == "binary" else PING_COMPACT
    if kind == "ttheader":
        frame = ref.build_frame(
            "ttheader",
            seqid=draw(st.integers(-(2**31), 2**31 - 1)),
            flags=draw(st.integers(0, 0xFFFF)),
            protocol=protocol,
            str_info=draw(st.dictionaries(any_texts, any_texts, max_size=4)),
            int_info=draw(st.dictionaries(st.integers(0, 0xFFFF), any_texts, max_size=4)),
            acl_token=draw(st.none() | any_texts),
            payload=payload,
            payload_framed=draw(st.booleans()),
        )
        if protocol == "compact" and draw(st.booleans()):
            frame = frame[:14] + b"\x03" + frame[15:]  # gopkg's compact v2 id
        return frame
    return ref.build_frame(
        "theader",
        seqid=draw(st.integers(-(2**31), 2**31 - 1)),
        flags=draw(st.integers(0, 0xFFFF)),
        protocol=protocol,
        str_info=draw(st.dictionaries(any_texts, any_texts, max_size=4)),
        transforms=draw(st.sampled_from([(), (ref.TRANSFORM_ZLIB,)])),
        payload=payload,
    )


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    """A valid frame with some bytes changed, cut or inserted, its LENGTH often kept right."""
    frame = bytearray(draw(valid_frames()))
    for _ in range(draw(st.integers(1, 4))):
        action = draw(st.sampled_from(["flip", "flip", "cut", "insert", "relength"]))
        position = draw(st.integers(0, max(len(frame) - 1, 0)))
        if action == "flip" and frame:
            frame[position] = draw(st.integers(0, 255) | st.sampled_from([0, 1, 2, 3, 0x10, 0x11]))
        elif action == "cut":
            del frame[position:]
        elif action == "insert":
            frame[position:position] = draw(st.binary(min_size=1, max_size=8))
        elif len(frame) >= 4:
            frame[:4] = struct.pack(">I", len(frame) - 4)
    return bytes(frame)


@st.composite
def block_headers(draw: st.DrawFn) -> bytes:
    """A frame around a header of random info blocks: right ids, lying counts and lengths."""
    magic = draw(st.sampled_from([headers.TTHEADER_MAGIC, headers.THEADER_MAGIC]))
    parts = [bytes([draw(st.sampled_from([0, 2, 3, 1, 4])), draw(st.sampled_from([0, 0, 1, 2]))])]
    for _ in range(draw(st.integers(0, 20))):
        if magic == headers.TTHEADER_MAGIC:
            info = draw(st.sampled_from([0x01, 0x10, 0x11, 0x00, 0x02]))
            count = draw(st.integers(0, 3) | st.integers(0, 0xFFFF))
            body = draw(st.binary(max_size=16))
            parts.append(bytes([info]) + struct.pack(">H", count) + body)
        else:
            info = draw(st.sampled_from([1, 2, 0, 7]))
            count = draw(st.integers(0, 3) | st.integers(0, 2**35))
            varint = bytearray()
            while count > 0x7F:
                varint.append((count & 0x7F) | 0x80)
                count >>= 7
            varint.append(count)
            parts.append(bytes([info]) + bytes(varint) + draw(st.binary(max_size=16)))
    header = b"".join(parts)
    if draw(st.booleans()):
        header += bytes(-len(header) % 4)
    payload = draw(
        st.sampled_from(
            [
                PING_BINARY,
                PING_COMPACT,
                b"",
                struct.pack(">I", len(PING_BINARY)) + PING_BINARY,
                zlib.compress(PING_BINARY),
            ]
        )
    )
    words = draw(st.none() | st.integers(0, 0xFFFF))
    return assemble(magic, header, payload, words=words)


class TestParserAgrees:
    """The C parser reads and refuses exactly as the Python one did."""

    @pytest.mark.parametrize("transform_id", [0, 9, 99, 255])
    def test_most_transform_ids(self, transform_id: int) -> None:
        """255 TTHeader transform ids, all listed in the refusal. Regression: found by the
        differential fuzzer under ASAN, the C message stopped at 512 bytes, and its list of
        ids could outgrow its buffer."""
        header = bytes([0, 255]) + bytes([transform_id]) * 255
        header += bytes(-len(header) % 4)
        frame = assemble(headers.TTHEADER_MAGIC, header, PING_BINARY)
        agree(frame)
        with pytest.raises(ProtocolError, match=r"transforms \[.*\] are not supported"):
            headers.parse_frame(frame, max_frame_size=LIMIT)

    @pytest.mark.slow
    @DIFF
    @given(valid_frames())
    def test_valid_frames(self, data: bytes) -> None:
        """Every field of every valid frame reads the same."""
        agree(data)

    @pytest.mark.slow
    @DIFF
    @given(mutated())
    @example(b"\x00\x00\x00\x0a\x10\x00" + bytes(8))
    def test_mutated_frames(self, data: bytes) -> None:
        """Broken frames are refused with the same class and message, or read the same."""
        agree(data)

    @pytest.mark.slow
    @DIFF
    @given(block_headers())
    def test_random_blocks(self, data: bytes) -> None:
        """Headers of random blocks with lying counts read or fail the same way."""
        agree(data)

    @DIFF
    @given(
        st.binary(max_size=120)
        | st.builds(
            lambda magic, rest: struct.pack(">I", len(rest) + 2) + magic + rest,
            st.sampled_from([b"\x10\x00", b"\x0f\xff"]),
            st.binary(max_size=120),
        )
    )
    def test_random_bytes(self, data: bytes) -> None:
        """Random bytes, with or without a right LENGTH and magic."""
        agree(data)

    @pytest.mark.slow
    @DIFF
    @given(valid_frames(), st.integers(0, 200))
    def test_small_limits(self, data: bytes, limit: int) -> None:
        """max_frame_size is applied alike, to LENGTH and to inflation."""
        agree(data, limit)


def build_outcome(build: Any, kind: Any, arguments: dict[str, Any]) -> Any:
    try:
        return build(kind, **arguments)
    except Exception as exc:
        return (type(exc).__name__, str(exc))


class TestLazyKeyValues:
    """The key-values are read when first asked for, and read the same either way."""

    @pytest.mark.slow
    @DIFF
    @given(valid_frames())
    def test_int_value_agrees_with_int_info(self, data: bytes) -> None:
        """Every integer key of a frame reads the same through int_value() and int_info."""
        frame = headers.parse_frame(data, max_frame_size=LIMIT)
        expected = ref.parse_frame(data, max_frame_size=LIMIT).int_info
        assert {key: frame.int_value(key) for key in expected} == expected
        assert frame.int_info == expected

    def test_last_value_of_a_key_wins(self) -> None:
        """A key sent twice reads as its last value, as int_info (gopkg's map) has it."""
        block = b"\x10\x00\x01" + b"\x00\x02" + b"\x00\x01"
        header = b"\x00\x00" + block + b"a" + block + b"b"
        header += bytes(-len(header) % 4)
        frame = headers.parse_frame(
            assemble(headers.TTHEADER_MAGIC, header, PING_BINARY), max_frame_size=LIMIT
        )
        assert frame.int_value(2) == "b"
        assert frame.log_id == "b"
        assert frame.int_info == {2: "b"}

    @DIFF
    @given(valid_frames())
    def test_str_value_agrees_with_str_info(self, data: bytes) -> None:
        """Every string key of a frame reads the same through str_value() and str_info."""
        frame = headers.parse_frame(data, max_frame_size=LIMIT)
        expected = ref.parse_frame(data, max_frame_size=LIMIT).str_info
        assert {key: frame.str_value(key) for key in expected} == expected
        assert frame.str_info == expected

    def test_last_string_value_of_a_key_wins(self) -> None:
        """A TTHeader string key sent twice reads as its last value, as str_info has it."""
        block = b"\x01\x00\x01" + b"\x00\x03rip" + b"\x00\x01"
        header = b"\x00\x00" + block + b"a" + block + b"b"
        header += bytes(-len(header) % 4)
        frame = headers.parse_frame(
            assemble(headers.TTHEADER_MAGIC, header, PING_BINARY), max_frame_size=LIMIT
        )
        assert frame.str_value("rip") == "b"
        assert frame.str_value("ri") is None
        assert frame.str_info == {"rip": "b"}

    def test_theader_key_value_wins_over_a_persistent_one(self) -> None:
        """THeader: a per-request header is read before a persistent one of the same key,
        whichever block comes first; a key only persistent is read from there."""
        per_request = b"\x01\x01" + b"\x01k" + b"\x01r"
        persistent = b"\x02\x02" + b"\x01k" + b"\x01p" + b"\x01q" + b"\x01s"
        for blocks in (per_request + persistent, persistent + per_request):
            header = b"\x00\x00" + blocks
            header += bytes(-len(header) % 4)
            data = assemble(headers.THEADER_MAGIC, header, PING_BINARY)
            frame = headers.parse_frame(data, max_frame_size=LIMIT)
            assert (frame.str_value("k"), frame.str_value("q")) == ("r", "s")
            assert frame.str_info == ref.parse_frame(data, max_frame_size=LIMIT).str_info

    def test_str_value_keys_are_compared_as_the_parser_decodes_them(self) -> None:
        """A key that is not UTF-8 reads by its surrogate-escaped text; a string no header
        key can decode to reads None; a key that is not a string is a TypeError."""
        data = ref.build_frame(
            "ttheader",
            seqid=1,
            protocol="binary",
            payload=PING_BINARY,
            str_info={b"\xff\xfe".decode("utf-8", "surrogateescape"): "v", "é": "w"},
        )
        frame = headers.parse_frame(data, max_frame_size=LIMIT)
        assert frame.str_value("\udcff\udcfe") == "v"
        assert frame.str_value("é") == "w"
        assert frame.str_value("\ud800") is None
        with pytest.raises(TypeError, match="must be str"):
            frame.str_value(1)  # type: ignore[arg-type]

    @pytest.mark.parametrize("size", [0, 1, 7, 8, 9, 15, 16, 17, 30, 33])
    @pytest.mark.parametrize("odd", [b"\xff", b"\x80", b"\xc3\xa9", b"\xe2\x82"])
    def test_text_of_any_bytes_at_any_place(self, size: int, odd: bytes) -> None:
        """Header text is UTF-8 with surrogate escapes, as Python decodes it, whatever its length
        and wherever a byte that is not ASCII sits (the parser copies all-ASCII text straight
        into a str, testing 8 bytes at a time): the log id the parse reads, int_value(),
        str_value() and both dicts."""
        for at in (None, *range(size)):
            raw = (b"0217abcdefgh" * 3)[:size]
            if at is not None:
                raw = raw[:at] + odd + raw[at + 1 :]
            value = raw.decode("utf-8", "surrogateescape")
            data = ref.build_frame(
                "ttheader",
                seqid=1,
                protocol="binary",
                payload=PING_BINARY,
                int_info={2: value, 7: value},
                str_info={"k": value, value + "key": "v"},
            )
            agree(data)
            frame = headers.parse_frame(data, max_frame_size=LIMIT)
            assert frame.log_id == (value or None)
            assert (frame.int_value(2), frame.int_value(7)) == (value, value)
            assert (frame.str_value("k"), frame.str_value(value + "key")) == (value, "v")
            assert frame.int_info == {2: value, 7: value}
            assert frame.str_info == {"k": value, value + "key": "v"}

    def test_dicts_are_read_once(self) -> None:
        """int_info and str_info are the same dicts on every access."""
        frame = headers.parse_frame(
            ref.build_frame(
                "ttheader", seqid=1, protocol="binary", payload=PING_BINARY, str_info={"k": "v"}
            ),
            max_frame_size=LIMIT,
        )
        assert frame.str_info is frame.str_info
        assert frame.int_info is frame.int_info
        assert frame.str_info == {"k": "v"}


class TestBuilderAgrees:
    """The C builder writes the bytes the Python one wrote, and refuses alike."""

    @pytest.mark.slow
    @DIFF
    @given(
        st.sampled_from(["ttheader", "theader", "other"]),
        st.fixed_dictionaries(
            {
                "seqid": st.integers(-(2**31), 2**32 - 1) | st.integers(-(2**40), 2**40),
                "protocol": st.sampled_from(["binary", "compact", "json"]),
                "payload": st.sampled_from([PING_BINARY, PING_COMPACT, b""]),
            },
            optional={
                "flags": st.integers(0, 0xFFFF) | st.integers(-5, 0x20000),
                "str_info": st.dictionaries(
                    any_texts | st.just("\ud800"),
                    any_texts | st.text(min_size=300, max_size=400),
                    max_size=6,
                ),
                "int_info": st.dictionaries(
                    st.integers(0, 0xFFFF) | st.integers(-3, 2**17), any_texts, max_size=6
                ),
                "acl_token": st.none() | any_texts,
                "transforms": st.sampled_from([(), (1,), (3,), (1, 1)]),
                "payload_framed": st.booleans(),
            },
        ),
    )
    def test_same_bytes_or_same_refusal(self, kind: Any, arguments: dict[str, Any]) -> None:
        """Any arguments: the same frame, or the same error."""
        ours = build_outcome(headers.build_frame, kind, arguments)
        theirs = build_outcome(ref.build_frame, kind, arguments)
        assert ours == theirs

    def test_many_entries_and_long_strings(self) -> None:
        """The limits on entries, string lengths and header size are the same."""
        for kind, arguments in [
            ("ttheader", {"str_info": {str(i): "" for i in range(1001)}}),
            ("ttheader", {"str_info": {str(i): "" for i in range(1000)}}),
            ("ttheader", {"str_info": {"k": "v" * 65535}}),
            ("ttheader", {"str_info": {"k": "v" * 65536}}),
            ("theader", {"str_info": {"k": "v" * 262_000}}),
            ("theader", {"str_info": {"k": "v" * 300_000}}),
        ]:
            full = {"seqid": 1, "protocol": "binary", "payload": PING_BINARY, **arguments}
            assert build_outcome(headers.build_frame, kind, full) == build_outcome(
                ref.build_frame, kind, full
            )


class TestAnswer:
    """answer(), the request loop's reply, writes what reply() with Kitex's MSG_TYPE writes."""

    @DIFF
    @given(
        valid_frames(),
        st.integers(1, 4),
        st.none() | st.dictionaries(any_texts, any_texts | st.text(min_size=300), max_size=40),
        st.sampled_from([PING_BINARY, b"", bytes(300)]),
    )
    def test_same_bytes_or_same_refusal_as_reply(
        self, data: bytes, mtype: int, str_info: dict[str, str] | None, payload: bytes
    ) -> None:
        """For any request frame and key-values (long enough to outgrow the header buffer on
        the stack), the same frame or the same error as reply()."""
        frame = headers.parse_frame(data, max_frame_size=LIMIT)
        ints = {22: str(mtype)} if frame.kind == "ttheader" else None
        assert build_outcome(lambda _: frame.answer(payload, mtype, str_info), None, {}) == (
            build_outcome(
                lambda _: frame.reply(payload, str_info=str_info, int_info=ints), None, {}
            )
        )

    @DIFF
    @given(valid_frames(), st.integers(1, 4), st.sampled_from([PING_BINARY, b"", bytes(300)]))
    def test_without_key_values_the_general_builder_s_bytes(
        self, data: bytes, mtype: int, payload: bytes
    ) -> None:
        """With no key-values to send and no zlib, answer() and reply() write their small
        header straight from the frame's fields: byte for byte what the general builder writes
        from the same fields (protocol id 3, flags, seqid, TTHeaderFramed kept)."""
        frame = headers.parse_frame(data, max_frame_size=LIMIT)
        if frame.transforms:
            return
        ints = {22: str(mtype)} if frame.kind == "ttheader" else None
        fields = (frame.kind, frame.seqid, frame.protocol_id, payload, frame.flags, None)
        general = _headers.build(*fields, ints, None, (), frame.payload_framed)
        assert frame.answer(payload, mtype, None) == general
        assert frame.reply(payload) == _headers.build(*fields, None, None, (), frame.payload_framed)

    def test_kitex_reply_carries_the_message_type(self) -> None:
        """A TTHeader reply to a call carries MSG_TYPE 2 (REPLY) or 3 (EXCEPTION), and no
        other integer key-value; a THeader reply none."""
        for kind in ("ttheader", "theader"):
            request = ref.build_frame(kind, seqid=7, protocol="binary", payload=PING_BINARY)
            frame = headers.parse_frame(request, max_frame_size=LIMIT)
            for mtype in (2, 3):
                reply = headers.parse_frame(
                    frame.answer(PING_BINARY, mtype, {"k": "v"}), max_frame_size=LIMIT
                )
                assert reply.seqid == 7
                assert reply.str_info == {"k": "v"}
                assert reply.int_info == ({22: str(mtype)} if kind == "ttheader" else {})

    def test_a_message_type_out_of_range_is_refused(self) -> None:
        request = ref.build_frame("ttheader", seqid=1, protocol="binary", payload=PING_BINARY)
        frame = headers.parse_frame(request, max_frame_size=LIMIT)
        for mtype in (0, 5, -1):
            with pytest.raises(ValueError, match="message type"):
                frame.answer(PING_BINARY, mtype, None)
        with pytest.raises(TypeError):
            frame.answer(PING_BINARY, 2)  # type: ignore[call-arg]
