"""Telling a connection's wire format from its first bytes.

==========================  =======================================================
first bytes                 protocol / transport
==========================  =======================================================
``80 01 ..``                binary, buffered (strict binary message header)
``82 ..``                   compact, buffered (compact protocol id)
``LL LL LL LL 80 01 ..``    binary, framed (4-byte big-endian frame length first)
``LL LL LL LL 82 ..``       compact, framed
``LL LL LL LL 10 00 ..``    TTHeader (Kitex, kite): binary or compact inside
``LL LL LL LL 0F FF ..``    THeader (Apache Thrift, fbthrift): binary or compact inside
``LL LL LL LL MM MM MM MM   THeader inside a framed frame (MMMMMMMM = LLLLLLLL - 4):
0F FF ..``                  Apache's cross-test pairs the ``header`` protocol with the
                            ``framed`` transport, and the reply goes back the same way
==========================  =======================================================

Anything else (HTTP, TLS, non-strict binary) is refused.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from kitegreen.codec._thrift import BINARY, COMPACT
from kitegreen.codec.headers import header_kind
from kitegreen.exceptions import ProtocolError

BINARY_MAGIC = 0x80
BINARY_VERSION = 0x01
COMPACT_MAGIC = 0x82
DETECT_BYTES = 10
"""The most bytes :func:`detect` needs to decide (a THeader inside a framed frame; six tell
every other wire)."""

_NAMES = {BINARY: "binary", COMPACT: "compact"}


@dataclass(frozen=True, slots=True)
class Wire:
    """A detected protocol/transport combination.

    A class with slots, not a NamedTuple: the request loop reads its fields several times a
    request, and CPython's specializing interpreter reads a slot without a lookup, a
    NamedTuple's field through a generic one (~120 instructions each).
    """

    protocol: int
    """The codec's protocol id: ``_thrift.BINARY`` or ``_thrift.COMPACT``. A header frame
    names its own, per message."""
    framed: bool
    header: str | None = None
    """``"ttheader"`` or ``"theader"`` for header frames (always framed), else None."""
    nested: bool = False
    """A THeader frame inside a framed frame: each message's frame holds a whole THeader
    frame, its own length included, and each reply is framed the same way."""
    message_framed: bool = field(init=False, repr=False, compare=False)
    """Whether a reply's Thrift message takes a 4-byte length of its own: on a framed wire,
    not in a header frame (whose own fields say where the message ends)."""
    length_skipped: int = field(init=False, repr=False, compare=False)
    """Bytes of a frame's start that are not the message the request loop reads: the 4-byte
    length of a framed message or of a nested THeader frame's outer frame; none of a header
    frame, which the header parser reads whole, its length included."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "message_framed", bool(self.framed and self.header is None))
        skipped = 4 if self.framed and (self.header is None or self.nested) else 0
        object.__setattr__(self, "length_skipped", skipped)

    def describe(self) -> str:
        """For logs and metrics labels: ``binary/buffered``, ``compact/framed``, ``ttheader``,
        ``theader/framed`` (nested)."""
        if self.header:
            return f"{self.header}/framed" if self.nested else self.header
        return f"{_NAMES[self.protocol]}/{'framed' if self.framed else 'buffered'}"


def detect(head: bytes, max_frame_size: int) -> Wire | None:
    """Tell the wire format from a connection's first bytes.

    Args:
        head: the bytes received so far (at least one).
        max_frame_size: the largest frame accepted; a first byte that no frame length within it
            can start with is refused at once.

    Returns:
        The format, or None when more bytes are needed to tell (at most :data:`DETECT_BYTES`).

    Raises:
        ProtocolError: the bytes are not a Thrift message this server speaks.
    """
    first = head[0]
    if first == BINARY_MAGIC:
        if len(head) < 2:
            return None
        if head[1] != BINARY_VERSION:
            raise ProtocolError(f"unsupported binary protocol version 0x80{head[1]:02x}")
        return Wire(BINARY, framed=False)
    if first == COMPACT_MAGIC:
        return Wire(COMPACT, framed=False)
    if len(head) < 5:
        if first > max_frame_size >> 24:
            # Not the first byte of a frame length we would accept, nor a message header
            # (b"GET ", b"\x16\x03" TLS, ...): refuse now rather than wait for more bytes.
            raise ProtocolError(f"not a Thrift message: starts with {bytes(head[:4])!r}")
        return None
    marker = head[4]
    if marker == BINARY_MAGIC:
        return Wire(BINARY, framed=True)
    if marker == COMPACT_MAGIC:
        return Wire(COMPACT, framed=True)
    # A THeader frame inside a framed frame starts with its own length, 4 less than the outer.
    outer = int.from_bytes(head[0:4], "big")
    inner = (outer - 4).to_bytes(4, "big") if outer >= 4 else b""
    nested = inner.startswith(bytes(head[4:8]))
    if len(head) < 6:
        if marker in (0x10, 0x0F) or nested:
            return None
    elif (header := header_kind(head)) is not None:
        return Wire(BINARY, framed=True, header=header)
    elif nested:
        if len(head) < 10:
            return None
        if head[8] == 0x0F and head[9] == 0xFF:
            return Wire(BINARY, framed=True, header="theader", nested=True)
    raise ProtocolError(f"not a Thrift message: starts with {bytes(head[:10])!r}")
