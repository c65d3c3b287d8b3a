"""Thrift messages built by hand and by thriftpy2's codecs, for the hostile-input tests."""

from __future__ import annotations

import struct
from typing import Any

from service import testsvc_thrift as testsvc
from thriftpy2.protocol.compact import TCompactProtocol
from thriftpy2.protocol.cybin import TCyBinaryProtocol
from thriftpy2.transport.memory import TCyMemoryBuffer

CALL, REPLY, EXCEPTION, ONEWAY = 1, 2, 3, 4
INT32_MAX = 2**31 - 1


def encode(protocol: str, method: str, seqid: int = 1, mtype: int = CALL, **args: Any) -> bytes:
    """A message encoded by thriftpy2's own codec, unframed."""
    out = TCyMemoryBuffer()
    proto = TCyBinaryProtocol(out) if protocol == "binary" else TCompactProtocol(out)
    proto.write_message_begin(method, mtype, seqid)
    proto.write_struct(getattr(testsvc.TestService, f"{method}_args")(**args))
    proto.write_message_end()
    return bytes(out.getvalue())


def wrap(transport: str, message: bytes) -> bytes:
    """``message`` as the transport sends it: behind a 4-byte length when framed."""
    return struct.pack("!i", len(message)) + message if transport == "framed" else message


def varint(n: int) -> bytes:
    """Compact protocol's unsigned varint."""
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def head(protocol: str, name: str, mtype: int = CALL, seqid: int = 1) -> bytes:
    """A message header, by hand: strict binary or compact."""
    raw = name.encode()
    if protocol == "binary":
        return struct.pack("!HHI", 0x8001, mtype, len(raw)) + raw + struct.pack("!i", seqid)
    return bytes([0x82, (mtype << 5) | 1]) + varint(seqid) + varint(len(raw)) + raw


def sample_item() -> Any:
    """A nested Item with a list and a map."""
    child = testsvc.Item(id=8, name="child", tags=[], counts={})
    return testsvc.Item(id=7, name="item", tags=["a", "bc"], counts={"x": 1, "y": -2}, child=child)


def server_wire(data: bytes) -> tuple[str, str] | None:
    """The wire a Thrift peer would take ``data`` for; None if it is not one kitegreen speaks."""
    if data[:2] == b"\x80\x01":
        return ("binary", "buffered")
    if data[:1] == b"\x82":
        return ("compact", "buffered")
    if len(data) >= 5:
        return {0x80: ("binary", "framed"), 0x82: ("compact", "framed")}.get(data[4])
    return None
