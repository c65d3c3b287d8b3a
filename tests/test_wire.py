"""Telling a connection's wire from its first bytes, and what the request loop reads off it."""

from __future__ import annotations

import dataclasses

import pytest

from kitegreen import ProtocolError
from kitegreen.codec import _thrift
from kitegreen.codec.wire import Wire, detect

LIMIT = 1 << 20


@pytest.mark.parametrize(
    ("head", "described", "message_framed", "length_skipped"),
    [
        # A reply's message is framed on a framed wire only; the loop skips a frame's length
        # before the message, except a header frame's, which the header parser reads whole.
        (b"\x80\x01\x00\x01", "binary/buffered", False, 0),
        (b"\x82\x21\x05", "compact/buffered", False, 0),
        (b"\x00\x00\x00\x20\x80\x01", "binary/framed", True, 4),
        (b"\x00\x00\x00\x20\x82\x21", "compact/framed", True, 4),
        (b"\x00\x00\x00\x20\x10\x00", "ttheader", False, 0),
        (b"\x00\x00\x00\x20\x0f\xff", "theader", False, 0),
        # THeader in a framed frame: the outer length is skipped, the inner one is the
        # header frame's own.
        (b"\x00\x00\x00\x24\x00\x00\x00\x20\x0f\xff", "theader/framed", False, 4),
    ],
)
def test_each_wire_says_how_its_messages_are_framed(
    head: bytes, described: str, message_framed: bool, length_skipped: int
) -> None:
    wire = detect(head, LIMIT)
    assert wire is not None
    assert (wire.describe(), wire.message_framed, wire.length_skipped) == (
        described,
        message_framed,
        length_skipped,
    )


def test_a_wire_is_a_value() -> None:
    """Equal fields, equal wires (a handed-over connection's is rebuilt from its fields); the
    derived fields follow, and no field can be changed."""
    wire = Wire(_thrift.BINARY, True, "theader", True)
    assert wire == Wire(_thrift.BINARY, framed=True, header="theader", nested=True)
    assert hash(wire) == hash(Wire(_thrift.BINARY, True, "theader", True))
    assert wire != Wire(_thrift.BINARY, True, "theader")
    with pytest.raises(dataclasses.FrozenInstanceError):
        wire.framed = False  # type: ignore[misc]


@pytest.mark.parametrize("head", [b"GET / HTTP/1.1", b"\x16\x03\x01\x02\x00", b"\x80\x02"])
def test_what_is_not_thrift_is_refused_at_once(head: bytes) -> None:
    with pytest.raises(ProtocolError, match=r"Thrift|binary protocol version"):
        detect(head, LIMIT)
