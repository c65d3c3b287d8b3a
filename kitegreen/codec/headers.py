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
* Parsing and building are compiled (``_headers.c``); this module holds the layout, the key
  names and the zlib transform, which stays in Python behind :func:`_inflate`.
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
* Only the Thrift binary (id 0) and compact protocols are served. Compact is id 2 in THeader;
  TTHeader peers send 2 (Apache-derived) or 3 (gopkg's ``ProtocolIDThriftCompactV2``; gopkg's
  decoder refuses 2), so both are read, and a reply repeats the request's id. Kitex sends id 0
  for Kitex protobuf too (kitex ``pkg/remote/codec/header_codec.go``, ``getProtocolID``), so
  id 0 does not prove a Thrift payload: the message codec still checks the message's first
  bytes.
* Kitex's ``TTHeaderFramed`` transport puts a 4-byte length before the message, inside the
  TTHeader payload (kitex ``pkg/remote/codec/default_codec.go``, ``checkPayload``). It is
  recognised (payload byte 4 starts a message, the first four bytes give the rest's length),
  removed, and recorded in :attr:`HeaderFrame.payload_framed` so that the reply can mirror it.
"""

from __future__ import annotations

import enum
import zlib
from collections.abc import Mapping
from typing import Final, Literal

import gevent

from kitegreen.codec import _headers, _thrift
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
tens of thousands of strings per request.
"""
MAX_INFO_BLOCKS: Final = 16
"""Most info blocks one frame may carry. Senders write one per kind (three at most); the bound
keeps a header of empty blocks (two or three bytes each) from costing a loop step per couple of
bytes.
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
PROTOCOL_COMPACT_V2: Final = 3
"""TTHeader's id for Thrift compact (gopkg ``ProtocolIDThriftCompactV2``): gopkg's decoder
accepts 3 and refuses 2, so a TTHeader reply repeats the id its request used."""
_PROTOCOL_IDS: Final[dict[str, int]] = {"binary": PROTOCOL_BINARY, "compact": PROTOCOL_COMPACT}

TRANSFORM_ZLIB: Final = 1

TT_INFO_PADDING: Final = 0x00
TT_INFO_KEY_VALUE: Final = 0x01
TT_INFO_INT_KEY_VALUE: Final = 0x10
TT_INFO_ACL_TOKEN: Final = 0x11
TH_INFO_KEY_VALUE: Final = 1
TH_INFO_PERSISTENT_KEY_VALUE: Final = 2


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
    """Where gopkg files the 0x11 ACL token among the string key-values. kitegreen keeps it in
    :attr:`HeaderFrame.acl_token`; ``request_info()`` shows it as gopkg's decoder would, in
    ``headers`` under this key and in ``transit`` as ``gdpr-token``."""
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


HeaderFrame = _headers.HeaderFrame
"""One parsed request frame: its header, and the Thrift message it carries (a compiled type;
its attributes are documented in ``_headers.pyi``).

The parser validates every key-value but reads them into :attr:`~HeaderFrame.int_info` and
:attr:`~HeaderFrame.str_info` only when one of those is first used: a request whose handler
never looks pays for the walk over the header alone. :meth:`~HeaderFrame.int_value` reads one
integer key-value without the rest (the log id and the timeout, which the parse notes where
they are, without a walk); :attr:`~HeaderFrame.log_id`, which the request loop reads for every
request, is decoded by the parse itself. :meth:`~HeaderFrame.reply` builds the reply frame, and
:meth:`~HeaderFrame.answer` the one the request loop sends.
"""
_parse = _headers.parse
_build = _headers.build
assert (_headers.MAX_HEADER_ENTRIES, _headers.MAX_INFO_BLOCKS) == (
    MAX_HEADER_ENTRIES,
    MAX_INFO_BLOCKS,
)
# HeaderFrame.codec_protocol numbers protocols as the codec does.
assert (_headers.CODEC_BINARY, _headers.CODEC_COMPACT) == (_thrift.BINARY, _thrift.COMPACT)


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
    frame: bytes | bytearray | memoryview,
    *,
    max_frame_size: int,
    max_memory: int | None = None,
    start: int = 0,
    end: int | None = None,
) -> HeaderFrame:
    """Parse one TTHeader or THeader frame.

    Args:
        frame: the whole frame, its 4-byte LENGTH included, and nothing after it; or a buffer
            that holds it at ``frame[start:end]``.
        max_frame_size: the largest LENGTH accepted, and the largest payload a transform may
            inflate to.
        max_memory: the memory the message may take; a transform inflates to no more.
        start: where the frame begins in ``frame``.
        end: where it ends; the end of ``frame`` by default.

    Returns:
        The header and the Thrift message it carries, transforms undone.

    Raises:
        FrameTooLarge: LENGTH exceeds ``max_frame_size``, or the payload inflates past it.
        MemoryBudgetExceeded: the payload inflates past ``max_memory``.
        ProtocolError: anything else wrong; the message says what and where.
    """
    if type(frame) is memoryview and (frame.ndim != 1 or frame.itemsize != 1):
        frame = frame.cast("B")
    parsed = _parse(frame, start, len(frame) if end is None else end, max_frame_size)
    return inflated(parsed, max_frame_size, max_memory) if parsed.transforms else parsed


def inflated(frame: HeaderFrame, max_frame_size: int, max_memory: int | None = None) -> HeaderFrame:
    """``frame`` with its THeader transforms undone (zlib, the only one accepted, at most once:
    the parser refuses the rest), inflating to at most ``max_frame_size`` bytes and no more
    than ``max_memory``, the memory the message may take.

    The request loop calls the compiled ``_headers.parse`` itself, and this for the rare frame
    whose ``transforms`` are not empty.
    """
    payload = _inflate(frame.payload, inflate_limit(max_frame_size, max_memory), max_frame_size)
    if not payload:
        raise ProtocolError("THeader frame carries no message after its header")
    return frame.with_payload(payload)


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
    if kind not in ("ttheader", "theader"):
        raise ProtocolError(f"header kind must be 'ttheader' or 'theader', got {kind!r}")
    protocol_id = _PROTOCOL_IDS.get(protocol)
    if protocol_id is None:
        raise ProtocolError(f"protocol must be 'binary' or 'compact', got {protocol!r}")
    if kind == "theader" and transforms == (TRANSFORM_ZLIB,):
        payload = zlib.compress(payload)
    return _build(
        kind,
        seqid,
        protocol_id,
        payload,
        flags,
        str_info,
        int_info,
        acl_token,
        tuple(transforms),
        payload_framed,
    )


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
