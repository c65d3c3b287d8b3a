"""A TTHeader codec of the tests' own, written from the published layout, not from kitegreen's.

The layout, as cloudwego/gopkg ``protocol/ttheader`` (``encode.go``, ``decode.go``) writes and
reads it; all integers big-endian::

    LENGTH u32 (bytes after it) | MAGIC 0x1000 u16 | FLAGS u16 | SEQID i32
    | HEADER SIZE u16 (in 4-byte words, counted from here on)
    | PROTOCOL ID u8 | NUM TRANSFORMS u8 | TRANSFORM ID u8 ...
    | info blocks: 0x11 ACL token (u16 length, bytes)
                   0x01 string key-values (u16 count; u16 length + key, u16 length + value)
                   0x10 integer key-values (u16 count; u16 key, u16 length + value)
                   0x00 padding, up to the HEADER SIZE boundary
    | payload

Keys and values are bytes here, so that tests can send what no well-behaved client would.
:func:`assemble` wraps any header bytes, THeader's included, in the fixed part.
"""

from __future__ import annotations

import io
import struct
from dataclasses import dataclass, field

MAGIC = 0x1000


@dataclass
class TTHeader:
    """One TTHeader frame, field by field."""

    payload: bytes
    seqid: int = 0
    flags: int = 0
    protocol_id: int = 0
    transform_ids: bytes = b""
    str_kv: dict[bytes, bytes] = field(default_factory=dict)
    int_kv: dict[int, bytes] = field(default_factory=dict)
    acl_token: bytes | None = None


def _sized(data: bytes) -> bytes:
    return struct.pack(">H", len(data)) + data


def encode(frame: TTHeader) -> bytes:
    """The frame's bytes, blocks in gopkg's order (ACL token, strings, integers)."""
    header = io.BytesIO()
    header.write(bytes([frame.protocol_id, len(frame.transform_ids)]) + frame.transform_ids)
    if frame.acl_token is not None:
        header.write(b"\x11" + _sized(frame.acl_token))
    if frame.str_kv:
        header.write(b"\x01" + struct.pack(">H", len(frame.str_kv)))
        for key, value in frame.str_kv.items():
            header.write(_sized(key) + _sized(value))
    if frame.int_kv:
        header.write(b"\x10" + struct.pack(">H", len(frame.int_kv)))
        for key_id, value in frame.int_kv.items():
            header.write(struct.pack(">H", key_id) + _sized(value))
    raw = header.getvalue()
    raw += b"\x00" * ((4 - len(raw) % 4) % 4)
    return assemble(MAGIC, raw, frame.payload, seqid=frame.seqid, flags=frame.flags)


def assemble(
    magic: int,
    header: bytes,
    payload: bytes,
    *,
    seqid: int = 0,
    flags: int = 0,
    words: int | None = None,
    length: int | None = None,
) -> bytes:
    """``header`` and ``payload`` behind the fixed part, whose sizes may be overridden to lie."""
    if words is None:
        words = len(header) // 4
    body = struct.pack(">HHiH", magic, flags, seqid, words) + header + payload
    if length is None:
        length = len(body)
    return struct.pack(">I", length) + body


def decode(data: bytes) -> TTHeader:
    """Read a frame as gopkg's decoder does (a 0x00 info id is one byte of padding)."""
    stream = io.BytesIO(data)

    def read(n: int) -> bytes:
        chunk = stream.read(n)
        if len(chunk) != n:
            raise ValueError(f"truncated: wanted {n} bytes, got {len(chunk)}")
        return chunk

    def u16() -> int:
        return int(struct.unpack(">H", read(2))[0])

    (length,) = struct.unpack(">I", read(4))
    if length != len(data) - 4:
        raise ValueError(f"LENGTH {length}, {len(data) - 4} bytes follow")
    magic, flags, seqid, words = struct.unpack(">HHiH", read(10))
    if magic != MAGIC:
        raise ValueError(f"magic 0x{magic:04x}")
    header = io.BytesIO(read(4 * words))
    stream, outer = header, stream
    frame = TTHeader(payload=b"", seqid=seqid, flags=flags)
    frame.protocol_id = read(1)[0]
    frame.transform_ids = read(read(1)[0])
    while info := header.read(1):
        if info == b"\x00":
            continue
        if info == b"\x11":
            frame.acl_token = read(u16())
        elif info == b"\x01":
            for _ in range(u16()):
                key = read(u16())
                frame.str_kv[key] = read(u16())
        elif info == b"\x10":
            for _ in range(u16()):
                key_id = u16()
                frame.int_kv[key_id] = read(u16())
        else:
            raise ValueError(f"info id 0x{info[0]:02x}")
    frame.payload = outer.read()
    return frame


def texts(kv: dict[bytes, bytes]) -> dict[str, str]:
    """String key-values as text (UTF-8, with ``surrogateescape`` for anything else)."""
    return {
        key.decode("utf-8", "surrogateescape"): value.decode("utf-8", "surrogateescape")
        for key, value in kv.items()
    }
