"""TTHeader (Kitex, kite) and THeader (Apache Thrift, fbthrift) frames, parsed and built whole.

Both formats put a header between a 4-byte frame length and the Thrift message; bytes 4-5 tell
them apart, and from a plain framed message, whose byte 4 is 0x80 or 0x82::

    offset   size  field
    0        4     LENGTH       bytes after this field, big-endian (at most 0x3FFFFFFF)
    4        2     MAGIC        0x1000 TTHeader, 0x0FFF THeader
    6        2     FLAGS        FLAG_* bits
    8        4     SEQID        the request's sequence id (the message carries its own as well)
    12       2     HEADER SIZE  length of the header in 4-byte words, counted from offset 14
    14       4*n   HEADER       protocol id, transforms, info blocks, zero padding
    14+4*n   ...   PAYLOAD      the Thrift message (THeader: before its transforms are undone)

TTHeader's header has fixed widths (cloudwego/gopkg ``protocol/ttheader/encode.go``,
``decode.go``): PROTOCOL ID u8, NUM TRANSFORMS u8, then info blocks, each an id u8 and its data:
``0x01`` string key-values (count u16; key and value each u16 length + bytes), ``0x10`` integer
key-values (count u16; key u16, value u16 length + bytes), ``0x11`` ACL token (u16 length +
bytes), ``0x00`` padding. THeader's uses varints (apache/thrift ``doc/specs/HeaderFormat.md``):
PROTOCOL ID, NUM TRANSFORMS, TRANSFORM IDs, then info blocks ``1`` key-values (count; key and
value each varint length + bytes) and fbthrift's ``2``, persistent key-values, laid out alike.

Decisions, and why:

* A frame is given and built whole, LENGTH included: offsets read as in the published diagrams,
  the LENGTH field is checked against the bytes actually given, and ``parse_frame(build_frame(
  ...))`` round-trips. A reader that reads the length first can read the rest into the same
  ``bytearray``; a ``memoryview`` is accepted, and the payload is a view of it, not a copy.
* Everything a peer announces (header size, counts, string lengths, varints) is checked against
  the bytes present before anything is sliced, and every loop consumes bytes on each step: a
  frame costs time and memory in proportion to its own length, whatever it announces. At most
  :data:`MAX_HEADER_ENTRIES` key-values are accepted per frame. zlib inflates within
  ``max_frame_size`` and the memory the message may take (:func:`inflate_limit`).
* Header strings are decoded as UTF-8 with ``surrogateescape``: valid UTF-8 reads as text, any
  other byte ``b`` as the lone surrogate ``U+DC00+b``. Refusing non-UTF-8 would refuse
  baseplate's ``Edge-Request`` header, a serialized Thrift struct; ``value.encode("utf-8",
  "surrogateescape")`` gives the original bytes back, and :func:`build_frame` encodes that way,
  so binary values survive a round trip.
* TTHeader is read as strictly as gopkg reads it, and stricter where gopkg is lenient: an unknown
  info id is refused (gopkg refuses it too); any transform is refused (gopkg defines none, and
  reads their ids only to ignore them, which would misread a transformed payload); padding must
  be zeros to the end of the header (gopkg takes a 0x00 anywhere as one byte of padding).
  THeader follows its spec: info blocks are "ignorable", so an unknown info id ends them and the
  rest of the header is skipped, as Apache's and fbthrift's readers do (refusing it would refuse
  a future client the spec allows); an unknown transform is refused, as the spec requires.
* Only the Thrift binary (id 0) and compact (id 2) protocols are served. Kitex sends id 0 for
  Kitex protobuf too (kitex ``pkg/remote/codec/header_codec.go``, ``getProtocolID``), so id 0
  does not prove a Thrift payload: the message codec still checks the message's first bytes.
* Kitex's ``TTHeaderFramed`` transport puts a 4-byte length before the message, inside the
  TTHeader payload (kitex ``pkg/remote/codec/default_codec.go``, ``checkPayload``). It is
  recognised (payload byte 4 starts a message, the first four bytes give the rest's length),
  removed, and recorded in :attr:`HeaderFrame.payload_framed` so that the reply can mirror it.
"""

from __future__ import annotations

import enum
import struct
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final, Literal

import gevent

from kitegreen.exceptions import FrameTooLarge, MemoryBudgetExceeded, ProtocolError

HeaderKind = Literal["ttheader", "theader"]
ThriftProtocol = Literal["binary", "compact"]

TTHEADER_MAGIC: Final = 0x1000
THEADER_MAGIC: Final = 0x0FFF

FIXED_SIZE: Final = 14
"""LENGTH, MAGIC, FLAGS, SEQID and HEADER SIZE: the bytes before the header proper."""
MAX_LENGTH: Final = 0x3FFFFFFF
"""Largest LENGTH either format allows (gopkg ``MaxFrameSize``, HeaderFormat.md)."""
MAX_HEADER_SIZE: Final = 4 * 0xFFFF
"""Largest header the 16-bit HEADER SIZE field (in 4-byte words) can describe."""
MAX_HEADER_ENTRIES: Final = 1000
"""Most key-values (string, integer, ACL token together) one frame may carry.

Kitex sends about ten, metainfo adds one per propagated value; a thousand leaves room for any
real caller, and keeps a header of tiny entries (65,535 fit in one 262 KB header) from costing
tens of thousands of Python strings and loop steps per request.
"""
MAX_INFO_BLOCKS: Final = 16
"""Most info blocks one frame may carry. Senders write one per kind (three at most); the bound
keeps a header of empty blocks (two or three bytes each) from costing a Python loop step per
couple of bytes.
"""

FLAG_SUPPORT_OUT_OF_ORDER: Final = 0x01
"""The client accepts replies in any order (gopkg ``HeaderFlagSupportOutOfOrder``, fbthrift)."""
FLAG_STREAMING: Final = 0x02
"""A TTHeader streaming frame (gopkg ``HeaderFlagsStreaming``); streams are not served."""
FLAG_DUPLEX_REVERSE: Final = 0x08
"""A request sent server to client on a duplex connection (gopkg, fbthrift)."""
FLAG_SASL: Final = 0x10
"""fbthrift's SASL handshake (gopkg ``HeaderFlagSASL``)."""

PROTOCOL_BINARY: Final = 0
PROTOCOL_COMPACT: Final = 2
_PROTOCOL_NAMES: Final[dict[int, ThriftProtocol]] = {
    PROTOCOL_BINARY: "binary",
    PROTOCOL_COMPACT: "compact",
}
_PROTOCOL_IDS: Final[dict[str, int]] = {name: pid for pid, name in _PROTOCOL_NAMES.items()}
# Named in refusals, so that an operator sees what the peer speaks rather than a bare number.
_UNSERVED_PROTOCOLS: Final[dict[str, dict[int, str]]] = {
    "ttheader": {
        3: "Thrift compact v2, or Kitex protobuf before Kitex 1.9.2",
        4: "Kitex protobuf",
        0x10: "TTHeader streaming Thrift struct",
        0x11: "TTHeader streaming protobuf struct",
    },
    "theader": {1: "JSON"},
}

TRANSFORM_ZLIB: Final = 1
_UNSERVED_TRANSFORMS: Final[dict[int, str]] = {2: "HMAC", 3: "snappy", 4: "QuickLZ", 5: "zstd"}

TT_INFO_PADDING: Final = 0x00
TT_INFO_KEY_VALUE: Final = 0x01
TT_INFO_INT_KEY_VALUE: Final = 0x10
TT_INFO_ACL_TOKEN: Final = 0x11
TH_INFO_KEY_VALUE: Final = 1
TH_INFO_PERSISTENT_KEY_VALUE: Final = 2

_FIXED = struct.Struct(">IHHiH")
_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_KIND_NAMES: Final = {"ttheader": "TTHeader", "theader": "THeader"}


class IntKey(enum.IntEnum):
    """Keys of TTHeader's integer key-values (0x10 block), as Kitex numbers them.

    From cloudwego/gopkg ``protocol/ttheader/metakey.go`` (also kitex
    ``pkg/remote/transmeta/metakey.go``). Values are strings on the wire; timeouts are decimal
    milliseconds. ``frame.int_info[IntKey.RPC_TIMEOUT]`` works, an IntEnum hashing as its int.
    """

    MESH_VERSION = 0
    TRANSPORT_TYPE = 1
    """``framed`` or ``unframed``: whether the client's transport is TTHeaderFramed."""
    LOG_ID = 2
    """The request's log id, for correlating logs across services."""
    FROM_SERVICE = 3
    """The calling service's name."""
    FROM_CLUSTER = 4
    FROM_IDC = 5
    TO_SERVICE = 6
    """The service the caller meant to reach."""
    TO_CLUSTER = 7
    TO_IDC = 8
    TO_METHOD = 9
    """The method called (the message names it too)."""
    ENV = 10
    DEST_ADDRESS = 11
    RPC_TIMEOUT = 12
    """The caller's whole-call timeout, decimal milliseconds."""
    READ_TIMEOUT = 13
    RING_HASH_KEY = 14
    DDP_TAG = 15
    WITH_MESH_HEADER = 16
    CONNECT_TIMEOUT = 17
    SPAN_CONTEXT = 18
    SHORT_CONNECTION = 19
    FROM_METHOD = 20
    """The method of the calling service that made this call."""
    STRESS_TAG = 21
    MSG_TYPE = 22
    """The Thrift message type, decimal (Kitex writes it on requests and replies)."""
    HTTP_CONTENT_TYPE = 23
    RAW_RING_HASH_KEY = 24
    LB_TYPE = 25
    CLUSTER_SHARD_ID = 26
    FRAME_TYPE = 27
    """TTHeader streaming's frame type."""


class StrKey:
    """Keys and key prefixes of TTHeader's string key-values (0x01 block) that Kitex uses.

    From cloudwego/gopkg ``protocol/ttheader/metakey.go``, kitex
    ``pkg/remote/transmeta/metakey.go`` and ``pkg/transmeta/ttheader.go``, and for the metainfo
    prefixes bytedance/gopkg ``cloud/metainfo/info.go``.
    """

    IDL_SERVICE_NAME: Final = "isn"
    """The IDL service name, for servers that serve several services on one port."""
    REAL_IP: Final = "rip"
    """The client's address as a mesh sidecar or proxy saw it (``host`` or ``host:port``)."""
    TO_CLUSTER: Final = "tc"
    TO_IDC: Final = "ti"
    CONNECTION_READY_TO_RESET: Final = "crrst"
    """In a reply: the server will close this connection; the client should stop reusing it."""
    PROCESS_AT_TIME: Final = "K_ProcessAtTime"
    CRC32C: Final = "crc32c"
    """Kitex's optional payload checksum."""
    BIZ_STATUS: Final = "biz-status"
    """In a reply: a business status code, decimal int32; non-zero means a business error."""
    BIZ_MESSAGE: Final = "biz-message"
    BIZ_EXTRA: Final = "biz-extra"
    """In a reply: the business error's extra fields, a JSON object of strings."""
    GDPR_TOKEN: Final = "RPC_TRANSIT_gdpr-token"  # noqa: S105 (a key name, not a secret)
    """Where gopkg files the 0x11 ACL token among the string key-values (kitegreen keeps it in
    :attr:`HeaderFrame.acl_token` instead)."""
    PREFIX_TRANSIT: Final = "RPC_TRANSIT_"
    """metainfo: a value for the next hop only."""
    PREFIX_TRANSIT_UPSTREAM: Final = "RPC_TRANSIT_UPSTREAM_"
    PREFIX_PERSIST: Final = "RPC_PERSIST_"
    """metainfo: a value every later hop passes on."""
    PREFIX_BACKWARD: Final = "RPC_BACKWARD_"
    """metainfo's backward prefix. Kitex does not use it on TTHeader: a server's backward values
    travel in the reply's string key-values under their bare keys."""
    PREFIX_BACKWARD_DOWNSTREAM: Final = "RPC_BACKWARD_DOWNSTREAM_"


class THeaderKey:
    """Well-known THeader key-values, from fbthrift and baseplate.

    fbthrift: ``thrift/lib/cpp/transport/THeader.cpp``. baseplate: reddit/baseplate.go
    ``transport/headers.go`` (baseplate.py reads the same names, case-insensitively).
    """

    CLIENT_TIMEOUT: Final = "client_timeout"
    """fbthrift: the client's timeout, decimal milliseconds."""
    QUEUE_TIMEOUT: Final = "queue_timeout"
    """fbthrift: how long the request may wait in the server's queue, decimal milliseconds."""
    TRACE: Final = "Trace"
    """baseplate: trace id, decimal 64-bit integer."""
    SPAN: Final = "Span"
    PARENT: Final = "Parent"
    SAMPLED: Final = "Sampled"
    """baseplate: ``1`` when the trace is sampled."""
    FLAGS: Final = "Flags"
    EDGE_REQUEST: Final = "Edge-Request"
    """baseplate: the edge context, a serialized Thrift struct (binary, not UTF-8)."""
    DEADLINE_BUDGET: Final = "Deadline-Budget"
    """baseplate: time left for the call, decimal milliseconds."""
    USER_AGENT: Final = "User-Agent"


@dataclass(frozen=True, slots=True)
class HeaderFrame:
    """One parsed request frame: its header, and the Thrift message it carries."""

    kind: HeaderKind
    """``"ttheader"`` or ``"theader"``."""
    flags: int
    """FLAGS, as sent (``FLAG_*``); a reply echoes them."""
    seqid: int
    """SEQID, signed 32-bit; the message inside carries its own, which may differ (Kitex
    tolerates a mismatch, logging a warning)."""
    protocol: ThriftProtocol
    """The payload's protocol: ``"binary"`` or ``"compact"``."""
    transforms: tuple[int, ...]
    """THeader transforms undone to get :attr:`payload` (``(TRANSFORM_ZLIB,)`` or ``()``);
    a reply applies them again, as fbthrift's server does."""
    int_info: dict[int, str]
    """TTHeader integer key-values (keys are :class:`IntKey` numbers); empty for THeader."""
    str_info: dict[str, str]
    """TTHeader string key-values, or THeader key-values (persistent ones included, the
    per-request value winning on a clash). A key sent twice keeps its last value."""
    acl_token: str | None
    """TTHeader's ACL token (0x11 block), or None."""
    payload: bytes | memoryview
    """The Thrift message. A view into the frame given to :func:`parse_frame` when no transform
    applied: keep that buffer unchanged while the payload is in use."""
    payload_framed: bool = False
    """True when a TTHeader payload was itself framed (Kitex's TTHeaderFramed); the 4-byte
    length is not part of :attr:`payload`."""

    def reply(
        self,
        payload: bytes | bytearray | memoryview,
        *,
        str_info: Mapping[str, str] | None = None,
        int_info: Mapping[int, str] | None = None,
    ) -> bytes:
        """Build the reply frame for this request: same kind, protocol, seqid, flags,
        transforms and payload framing.

        Args:
            payload: the encoded reply message.
            str_info: string key-values to send back (``biz-status``, ``crrst``, backward
                metainfo); THeader key-values for a THeader request.
            int_info: integer key-values to send back; TTHeader only.

        Returns:
            The whole frame, LENGTH included.

        Raises:
            ProtocolError: the key-values cannot be carried by this header format.
        """
        return build_frame(
            self.kind,
            seqid=self.seqid,
            protocol=self.protocol,
            payload=payload,
            flags=self.flags,
            str_info=str_info,
            int_info=int_info,
            transforms=self.transforms,
            payload_framed=self.payload_framed,
        )


def header_kind(head: bytes | bytearray | memoryview) -> HeaderKind | None:
    """Tell a header frame from its first six bytes.

    Args:
        head: the start of a frame, LENGTH included; at least six bytes are needed.

    Returns:
        ``"ttheader"`` or ``"theader"``, or None when ``head`` is not the start of either (a
        plain framed or buffered message, anything else) or is shorter than six bytes.
    """
    if len(head) < 6 or head[0] & 0xC0:
        # LENGTH is at most 0x3FFFFFFF: a buffered message (0x80 0x01, 0x82) is never a header.
        return None
    magic = (head[4] << 8) | head[5]
    if magic == TTHEADER_MAGIC:
        return "ttheader"
    if magic == THEADER_MAGIC:
        return "theader"
    return None


def inflate_limit(max_frame_size: int, memory: int | None) -> int:
    """The most bytes a THeader zlib payload may inflate to: ``max_frame_size``, and no more
    than ``memory``, what the message may take (its inflated bytes are part of what it costs:
    15.6 KB of zlib inflate to 16 MB of empty structs)."""
    return max_frame_size if memory is None else min(max_frame_size, memory)


def parse_frame(
    frame: bytes | bytearray | memoryview, *, max_frame_size: int, max_memory: int | None = None
) -> HeaderFrame:
    """Parse one TTHeader or THeader frame.

    Args:
        frame: the whole frame, its 4-byte LENGTH included, and nothing after it.
        max_frame_size: the largest LENGTH accepted, and the largest payload a transform may
            inflate to.
        max_memory: the memory the message may take; a transform inflates to no more.

    Returns:
        The header and the Thrift message it carries, transforms undone.

    Raises:
        FrameTooLarge: LENGTH exceeds ``max_frame_size``, or the payload inflates past it.
        MemoryBudgetExceeded: the payload inflates past ``max_memory``.
        ProtocolError: anything else wrong; the message says what and where.
    """
    view = memoryview(frame)
    if view.ndim != 1 or view.itemsize != 1:
        view = view.cast("B")
    size = len(view)
    if size < FIXED_SIZE:
        raise ProtocolError(
            f"header frame truncated: {size} bytes, the fixed part alone takes {FIXED_SIZE}"
        )
    length, magic, flags, seqid, words = _FIXED.unpack_from(view)
    if length > max_frame_size or length > MAX_LENGTH:
        raise FrameTooLarge(
            f"frame of {length} bytes, max_frame_size is {max_frame_size} "
            f"(the formats allow {MAX_LENGTH})"
        )
    if length != size - 4:
        raise ProtocolError(f"frame LENGTH says {length} bytes follow it, {size - 4} do")
    kind: HeaderKind
    if magic == TTHEADER_MAGIC:
        kind = "ttheader"
    elif magic == THEADER_MAGIC:
        kind = "theader"
    else:
        raise ProtocolError(f"not a TTHeader or THeader frame: magic 0x{magic:04x}")
    header_end = FIXED_SIZE + 4 * words
    if words == 0:
        raise ProtocolError(
            f"{_KIND_NAMES[kind]} HEADER SIZE is 0; the protocol id and transform count "
            "need at least one word"
        )
    if header_end > size:
        raise ProtocolError(
            f"{_KIND_NAMES[kind]} HEADER SIZE is {4 * words} bytes, but only "
            f"{size - FIXED_SIZE} follow the fixed part"
        )
    # The header as bytes (at most 256 KiB, and only what arrived): indexing and slicing bytes
    # is several times cheaper than a memoryview's, and a header is read field by field.
    cursor = _Cursor(view[:header_end].tobytes(), header_end, kind)
    if kind == "ttheader":
        protocol, transforms, int_info, str_info, acl_token = _read_ttheader(cursor)
    else:
        protocol, transforms, str_info = _read_theader(cursor)
        int_info, acl_token = {}, None

    payload: bytes | memoryview = view[header_end:]
    for _ in transforms:
        # zlib is the only transform accepted, and at most once; the readers refuse the rest.
        payload = _inflate(payload, inflate_limit(max_frame_size, max_memory), max_frame_size)
    payload_framed = False
    if kind == "ttheader":
        payload, payload_framed = _unframe(payload)
    if not payload:
        raise ProtocolError(f"{_KIND_NAMES[kind]} frame carries no message after its header")
    return HeaderFrame(
        kind=kind,
        flags=flags,
        seqid=seqid,
        protocol=protocol,
        transforms=transforms,
        int_info=int_info,
        str_info=str_info,
        acl_token=acl_token,
        payload=payload,
        payload_framed=payload_framed,
    )


def build_frame(
    kind: HeaderKind,
    *,
    seqid: int,
    protocol: ThriftProtocol,
    payload: bytes | bytearray | memoryview,
    flags: int = 0,
    str_info: Mapping[str, str] | None = None,
    int_info: Mapping[int, str] | None = None,
    acl_token: str | None = None,
    transforms: tuple[int, ...] = (),
    payload_framed: bool = False,
) -> bytes:
    """Build one TTHeader or THeader frame.

    TTHeader blocks are written in gopkg's order (ACL token, string key-values, integer
    key-values), THeader's as Apache's Python library writes them; both pad the header with
    zeros to the next 4-byte boundary.

    Args:
        kind: ``"ttheader"`` or ``"theader"``.
        seqid: SEQID, signed or unsigned 32-bit.
        protocol: the payload's protocol, ``"binary"`` or ``"compact"``.
        payload: the encoded Thrift message.
        flags: FLAGS, 16 bits.
        str_info: string key-values (THeader: its key-values).
        int_info: integer key-values, keys 0-65535; TTHeader only.
        acl_token: the ACL token; TTHeader only.
        transforms: THeader transforms to apply, ``(TRANSFORM_ZLIB,)`` at most.
        payload_framed: put a 4-byte length before the message (Kitex's TTHeaderFramed);
            TTHeader only.

    Returns:
        The whole frame, LENGTH included.

    Raises:
        ProtocolError: the arguments cannot be carried by this header format (a TTHeader
            string over 65,535 bytes, more than :data:`MAX_HEADER_ENTRIES` key-values, a
            header over :data:`MAX_HEADER_SIZE`, a string that is not encodable, ...).
        FrameTooLarge: the frame would exceed :data:`MAX_LENGTH`.
    """
    if kind not in _KIND_NAMES:
        raise ProtocolError(f"header kind must be 'ttheader' or 'theader', got {kind!r}")
    name = _KIND_NAMES[kind]
    if protocol not in _PROTOCOL_IDS:
        raise ProtocolError(f"protocol must be 'binary' or 'compact', got {protocol!r}")
    if not 0 <= flags <= 0xFFFF:
        raise ProtocolError(f"{name} FLAGS must fit 16 bits, got {flags}")
    if not -(2**31) <= seqid < 2**32:
        raise ProtocolError(f"{name} SEQID must fit 32 bits, got {seqid}")
    str_info = str_info or {}
    int_info = int_info or {}
    entries = len(str_info) + len(int_info) + (acl_token is not None)
    if entries > MAX_HEADER_ENTRIES:
        raise ProtocolError(
            f"{name} header of {entries} key-values; at most {MAX_HEADER_ENTRIES} are accepted"
        )
    if kind == "ttheader":
        if transforms:
            raise ProtocolError(f"TTHeader defines no transforms, got {transforms}")
        header = _ttheader_header(_PROTOCOL_IDS[protocol], str_info, int_info, acl_token)
        magic = TTHEADER_MAGIC
        if payload_framed:
            payload = _U32.pack(len(payload)) + payload
    else:
        if int_info or acl_token is not None or payload_framed:
            raise ProtocolError(
                "THeader has no integer key-values, ACL token or inner framing; "
                "send key-values in str_info"
            )
        if transforms not in ((), (TRANSFORM_ZLIB,)):
            raise ProtocolError(f"THeader transforms must be () or (1,) (zlib), got {transforms}")
        header = _theader_header(_PROTOCOL_IDS[protocol], str_info, transforms)
        magic = THEADER_MAGIC
        if transforms:
            payload = zlib.compress(payload)
    if len(header) > MAX_HEADER_SIZE:
        raise ProtocolError(
            f"{name} header of {len(header)} bytes; HEADER SIZE can describe {MAX_HEADER_SIZE}"
        )
    length = FIXED_SIZE - 4 + len(header) + len(payload)
    if length > MAX_LENGTH:
        raise FrameTooLarge(f"{name} frame of {length} bytes; the format allows {MAX_LENGTH}")
    if seqid >= 2**31:
        seqid -= 2**32
    fixed = _FIXED.pack(length, magic, flags, seqid, len(header) // 4)
    return b"".join((fixed, header, payload))


class _Cursor:
    """Reads a header region, refusing any read past its end before it happens."""

    __slots__ = ("blocks", "buf", "end", "name", "pos")

    def __init__(self, buf: bytes, end: int, kind: HeaderKind) -> None:
        self.buf = buf
        self.pos = FIXED_SIZE
        self.end = end
        self.name = _KIND_NAMES[kind]
        self.blocks = 0

    def block(self) -> None:
        """Count an info block about to be read, refusing one too many."""
        self.blocks += 1
        if self.blocks > MAX_INFO_BLOCKS:
            raise ProtocolError(f"{self.name} header has more than {MAX_INFO_BLOCKS} info blocks")

    @property
    def left(self) -> int:
        """Header bytes not read yet."""
        return self.end - self.pos

    def truncated(self, what: str, needed: int) -> ProtocolError:
        """The error for a read of ``needed`` bytes that the header cannot satisfy."""
        return ProtocolError(
            f"{self.name} header truncated: {what} needs {needed} bytes at header offset "
            f"{self.pos - FIXED_SIZE}, {self.left} remain"
        )

    def u8(self, what: str) -> int:
        """One byte."""
        if self.pos >= self.end:
            raise self.truncated(what, 1)
        value = self.buf[self.pos]
        self.pos += 1
        return value

    def u16(self, what: str) -> int:
        """A big-endian unsigned 16-bit integer."""
        if self.end - self.pos < 2:
            raise self.truncated(what, 2)
        (value,) = _U16.unpack_from(self.buf, self.pos)
        self.pos += 2
        return int(value)

    def varint(self, what: str) -> int:
        """An unsigned LEB128 varint of at most five bytes and 32 bits."""
        value = shift = 0
        for _ in range(5):
            byte = self.u8(what)
            value |= (byte & 0x7F) << shift
            if not byte & 0x80:
                if value > 0xFFFFFFFF:
                    raise ProtocolError(f"{self.name} {what}: varint exceeds 32 bits")
                return value
            shift += 7
        raise ProtocolError(f"{self.name} {what}: varint longer than 5 bytes")

    def text(self, size: int, what: str) -> str:
        """``size`` bytes, decoded as UTF-8 with ``surrogateescape`` (never fails)."""
        if size > self.end - self.pos:
            raise self.truncated(what, size)
        start = self.pos
        self.pos += size
        return str(self.buf[start : self.pos], "utf-8", "surrogateescape")

    def entries(self, count: int, least: int, total: int, what: str) -> int:
        """Check a block's announced ``count`` before reading any of it.

        Args:
            count: entries the block announces.
            least: fewest bytes one entry can take.
            total: entries already read from earlier blocks.
            what: the block, for the message.

        Returns:
            The new running total.
        """
        if count * least > self.left:
            raise ProtocolError(
                f"{self.name} {what} block announces {count} entries, but only {self.left} "
                f"header bytes remain (an entry takes at least {least})"
            )
        total += count
        if total > MAX_HEADER_ENTRIES:
            raise ProtocolError(
                f"{self.name} header carries {total} key-values or more; at most "
                f"{MAX_HEADER_ENTRIES} are accepted"
            )
        return total

    def padding(self) -> None:
        """Check that the rest of the header, after a padding id, is zeros."""
        rest = bytes(self.buf[self.pos : self.end])
        stripped = rest.lstrip(b"\x00")
        if stripped:
            offset = self.end - len(stripped) - FIXED_SIZE
            raise ProtocolError(
                f"{self.name} padding holds 0x{stripped[0]:02x} at header offset {offset}; "
                "padding must be zeros to the end of the header"
            )
        self.pos = self.end


def _protocol(name: str, kind: HeaderKind, protocol_id: int) -> ThriftProtocol:
    protocol = _PROTOCOL_NAMES.get(protocol_id)
    if protocol is None:
        known = _UNSERVED_PROTOCOLS[kind].get(protocol_id, "unknown")
        raise ProtocolError(
            f"{name} protocol id {protocol_id} ({known}) is not served; "
            "binary (0) and compact (2) are"
        )
    return protocol


def _read_ttheader(
    cur: _Cursor,
) -> tuple[ThriftProtocol, tuple[int, ...], dict[int, str], dict[str, str], str | None]:
    protocol = _protocol("TTHeader", "ttheader", cur.u8("protocol id"))
    count = cur.u8("transform count")
    if count:
        if count > cur.left:
            raise cur.truncated(f"{count} transform ids", count)
        ids = list(cur.buf[cur.pos : cur.pos + count])
        raise ProtocolError(
            f"TTHeader transforms {ids} are not supported: gopkg defines no TTHeader transform"
        )
    int_info: dict[int, str] = {}
    str_info: dict[str, str] = {}
    acl_token: str | None = None
    total = 0
    while cur.pos < cur.end:
        info_id = cur.u8("info id")
        if info_id == TT_INFO_PADDING:
            cur.padding()
            break
        cur.block()
        if info_id == TT_INFO_KEY_VALUE:
            count = cur.u16("string key-value count")
            total = cur.entries(count, 4, total, "string key-value")
            if not _tt_pairs(cur, count, str_info, text_keys=True):
                for _ in range(count):
                    key = cur.text(cur.u16("key length"), "string key")
                    str_info[key] = cur.text(cur.u16("value length"), "string value")
        elif info_id == TT_INFO_INT_KEY_VALUE:
            count = cur.u16("integer key-value count")
            total = cur.entries(count, 4, total, "integer key-value")
            if not _tt_pairs(cur, count, int_info, text_keys=False):
                for _ in range(count):
                    key_id = cur.u16("integer key")
                    int_info[key_id] = cur.text(cur.u16("value length"), "integer value")
        elif info_id == TT_INFO_ACL_TOKEN:
            total = cur.entries(1, 0, total, "ACL token")
            acl_token = cur.text(cur.u16("ACL token length"), "ACL token")
        else:
            raise ProtocolError(
                f"unknown TTHeader info id 0x{info_id:02x} at header offset "
                f"{cur.pos - 1 - FIXED_SIZE}"
            )
    return protocol, (), int_info, str_info, acl_token


def _tt_pairs(cur: _Cursor, count: int, into: dict[Any, str], *, text_keys: bool) -> bool:
    """Read a TTHeader key-value block's ``count`` entries into ``into``, fast.

    The cursor's method per field costs about 1.5 µs an entry, and a Kitex request carries a
    dozen: this loop reads the same layout from the bytes directly. When anything does not fit
    it reads nothing and returns False, and the cursor's loop reads the block again to refuse
    it with the precise error.
    """
    buf = cur.buf
    pos, end = cur.pos, cur.end
    found: list[tuple[Any, str]] = []
    for _ in range(count):
        if end - pos < 4:
            return False
        if text_keys:
            size = (buf[pos] << 8) | buf[pos + 1]
            pos += 2
            if end - pos < size + 2:
                return False
            key: Any = buf[pos : pos + size].decode("utf-8", "surrogateescape")
            pos += size
        else:
            key = (buf[pos] << 8) | buf[pos + 1]
            pos += 2
        size = (buf[pos] << 8) | buf[pos + 1]
        pos += 2
        if end - pos < size:
            return False
        found.append((key, buf[pos : pos + size].decode("utf-8", "surrogateescape")))
        pos += size
    into.update(found)
    cur.pos = pos
    return True


def _read_theader(cur: _Cursor) -> tuple[ThriftProtocol, tuple[int, ...], dict[str, str]]:
    protocol = _protocol("THeader", "theader", cur.varint("protocol id"))
    count = cur.varint("transform count")
    if count > cur.left:
        raise ProtocolError(
            f"THeader announces {count} transforms, but only {cur.left} header bytes remain"
        )
    transforms: list[int] = []
    for _ in range(count):
        transform = cur.varint("transform id")
        if transform != TRANSFORM_ZLIB:
            known = _UNSERVED_TRANSFORMS.get(transform, "unknown")
            raise ProtocolError(
                f"THeader transform {transform} ({known}) is not supported; only zlib (1) is"
            )
        if transforms:
            # Only zlib is known, so a second transform repeats it: one inflation per frame.
            raise ProtocolError("THeader lists the zlib transform twice")
        transforms.append(transform)
    values: dict[str, str] = {}
    persistent: dict[str, str] = {}
    total = 0
    while cur.pos < cur.end:
        info_id = cur.varint("info id")
        if info_id == 0:
            cur.padding()
            break
        cur.block()
        if info_id in (TH_INFO_KEY_VALUE, TH_INFO_PERSISTENT_KEY_VALUE):
            what = "key-value" if info_id == TH_INFO_KEY_VALUE else "persistent key-value"
            target = values if info_id == TH_INFO_KEY_VALUE else persistent
            count = cur.varint(f"{what} count")
            total = cur.entries(count, 2, total, what)
            for _ in range(count):
                key = cur.text(cur.varint("key length"), "key")
                target[key] = cur.text(cur.varint("value length"), "value")
        else:
            # HeaderFormat.md: info headers are ignorable, and ordered oldest first, so none
            # after an unknown one is known either; skip to the payload.
            break
    if persistent:
        persistent.update(values)
        values = persistent
    return protocol, tuple(transforms), values


INFLATE_ON_HUB = 1024 * 1024
"""Bytes of a zlib payload inflated on the hub (~1 ms); the rest, if any, is inflated in
gevent's threadpool, where zlib lets go of the GIL: 16 MB take ~20-40 ms, and a 15.6 KB payload
may inflate to that much, so its compressed size says nothing."""


def _inflate(data: bytes | memoryview, limit: int, max_size: int) -> bytes:
    """Undo THeader's zlib transform, producing at most ``limit`` bytes (``max_size``, the
    frame size limit, or less: the memory the message may take)."""
    inflater = zlib.decompressobj()
    try:
        # One byte over the limit tells "exactly the limit" from "more than the limit"; zlib
        # grows its output as it goes, so nothing near the limit is allocated up front.
        out = inflater.decompress(data, min(limit + 1, INFLATE_ON_HUB))
        if len(out) == INFLATE_ON_HUB and not inflater.eof and limit + 1 > INFLATE_ON_HUB:
            # More to come: all of it again off the hub (inline when already off it). Starting
            # over wastes the first ~1 ms but copies nothing: joining the two parts would hold
            # the GIL for a copy of the whole, and hold both at once.
            out, inflater = b"", zlib.decompressobj()  # the first try's memory let go of first
            out = gevent.get_hub().threadpool.apply(inflater.decompress, (data, limit + 1))
    except zlib.error as exc:
        raise ProtocolError(f"THeader zlib payload is corrupt: {exc}") from None
    if len(out) > limit:
        if limit < max_size:
            raise MemoryBudgetExceeded(
                f"THeader zlib payload inflates past the {limit} bytes of memory the message "
                "may take"
            )
        raise FrameTooLarge(f"THeader zlib payload inflates past max_frame_size ({limit} bytes)")
    if not inflater.eof:
        raise ProtocolError("THeader zlib payload is truncated: the stream does not end")
    if inflater.unused_data:
        raise ProtocolError(
            f"THeader zlib payload has {len(inflater.unused_data)} bytes after its stream"
        )
    return out


def _unframe(payload: bytes | memoryview) -> tuple[bytes | memoryview, bool]:
    """Remove a TTHeaderFramed payload's own length field, if there is one."""
    if len(payload) < 6 or payload[0] in (0x80, 0x82):
        return payload, False
    if payload[4] == 0x90 and payload[5] == 0x01:
        raise ProtocolError("TTHeader payload is Kitex protobuf (magic 0x9001), not served")
    if payload[4] not in (0x80, 0x82):
        # Not a framed message either: the message codec refuses it with its own diagnosis.
        return payload, False
    (inner,) = _U32.unpack_from(payload)
    if inner != len(payload) - 4:
        raise ProtocolError(
            f"TTHeader payload's inner frame length is {inner}, but {len(payload) - 4} bytes "
            "follow it"
        )
    return payload[4:], True


def _encode(value: str, what: str) -> bytes:
    try:
        return value.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError as exc:
        raise ProtocolError(f"{what} {value!r} cannot be encoded: {exc.reason}") from None


def _u16_string(out: bytearray, value: str, what: str) -> None:
    raw = _encode(value, what)
    if len(raw) > 0xFFFF:
        raise ProtocolError(f"TTHeader {what} of {len(raw)} bytes; at most 65535 fit")
    out += _U16.pack(len(raw))
    out += raw


def _varint(out: bytearray, value: int) -> None:
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)


def _pad(out: bytearray) -> bytes:
    out += bytes(-len(out) % 4)
    return bytes(out)


def _ttheader_header(
    protocol_id: int,
    str_info: Mapping[str, str],
    int_info: Mapping[int, str],
    acl_token: str | None,
) -> bytes:
    out = bytearray((protocol_id, 0))
    if acl_token is not None:
        out.append(TT_INFO_ACL_TOKEN)
        _u16_string(out, acl_token, "ACL token")
    if str_info:
        out.append(TT_INFO_KEY_VALUE)
        out += _U16.pack(len(str_info))
        for key, value in str_info.items():
            _u16_string(out, key, "key")
            _u16_string(out, value, "string value")
    if int_info:
        out.append(TT_INFO_INT_KEY_VALUE)
        out += _U16.pack(len(int_info))
        for key_id, value in int_info.items():
            if not 0 <= key_id <= 0xFFFF:
                raise ProtocolError(f"TTHeader integer key must fit 16 bits, got {key_id}")
            out += _U16.pack(key_id)
            _u16_string(out, value, "integer value")
    return _pad(out)


def _theader_header(
    protocol_id: int, str_info: Mapping[str, str], transforms: tuple[int, ...]
) -> bytes:
    out = bytearray()
    _varint(out, protocol_id)
    _varint(out, len(transforms))
    for transform in transforms:
        _varint(out, transform)
    if str_info:
        _varint(out, TH_INFO_KEY_VALUE)
        _varint(out, len(str_info))
        for key, value in str_info.items():
            for raw in (_encode(key, "key"), _encode(value, "value")):
                _varint(out, len(raw))
                out += raw
    return _pad(out)
