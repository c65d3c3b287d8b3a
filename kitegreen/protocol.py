"""Wire formats: detecting a connection's protocol and reading from its socket under deadlines.

A Thrift connection announces itself in its first bytes:

==========================  =======================================================
first bytes                 protocol / transport
==========================  =======================================================
``80 01 ..``                binary, buffered (strict binary message header)
``82 ..``                   compact, buffered (compact protocol id)
``LL LL LL LL 80 01 ..``    binary, framed (4-byte big-endian frame length first)
``LL LL LL LL 82 ..``       compact, framed
==========================  =======================================================

Anything else (HTTP, TLS, non-strict binary, THeader) is refused by closing the connection.
"""

from __future__ import annotations

import contextlib
import struct
import time
from typing import Any, NamedTuple

import gevent
from thriftpy2.protocol.compact import TCompactProtocol

# thriftpy2's Cython codecs ship without type information, hence the ignores.
from thriftpy2.protocol.cybin import TCyBinaryProtocol  # type: ignore[attr-defined]
from thriftpy2.thrift import TType
from thriftpy2.transport.buffered import TCyBufferedTransport  # type: ignore[attr-defined]
from thriftpy2.transport.framed import TCyFramedTransport  # type: ignore[attr-defined]
from thriftpy2.transport.memory import TCyMemoryBuffer  # type: ignore[attr-defined]

from kitegreen.exceptions import FrameTooLarge, ProtocolError

BINARY_MAGIC = 0x80
BINARY_VERSION = 0x01
COMPACT_MAGIC = 0x82
RECV_SIZE = 64 * 1024
"""Upper bound on one recv: a peer announcing a huge length cannot make us reserve it."""
BUFFER_SIZE = 4096

_FRAME_HEADER = struct.Struct("!i")


class Wire(NamedTuple):
    """A detected protocol/transport combination."""

    protocol: str
    """``binary`` or ``compact``."""
    framed: bool

    def describe(self) -> str:
        """For logs and metrics labels: ``binary/buffered``, ``compact/framed``, ..."""
        return f"{self.protocol}/{'framed' if self.framed else 'buffered'}"


def detect(head: bytes) -> Wire | None:
    """Tell the wire format from a connection's first bytes.

    Args:
        head: the bytes received so far (at least one).

    Returns:
        The format, or None when more bytes are needed to tell (at most five are).

    Raises:
        ProtocolError: the bytes are not a Thrift message this server speaks.
    """
    first = head[0]
    if first == BINARY_MAGIC:
        if len(head) < 2:
            return None
        if head[1] != BINARY_VERSION:
            raise ProtocolError(f"unsupported binary protocol version 0x80{head[1]:02x}")
        return Wire("binary", framed=False)
    if first == COMPACT_MAGIC:
        return Wire("compact", framed=False)
    if len(head) < 5:
        if first != 0:
            # A frame length starts with 0x00 below 16 MiB; anything else is not Thrift we speak
            # (b"GET ", b"\x16\x03" TLS, ...): refuse now rather than wait for more bytes.
            raise ProtocolError(f"not a Thrift message: starts with {bytes(head[:4])!r}")
        return None
    marker = head[4]
    if marker == BINARY_MAGIC:
        return Wire("binary", framed=True)
    if marker == COMPACT_MAGIC:
        return Wire("compact", framed=True)
    raise ProtocolError(f"not a Thrift message: starts with {bytes(head[:5])!r}")


class IdleTimeout(TimeoutError):
    """Raised into a connection's greenlet when it has waited longer than ``idle_timeout``."""


class SocketReader:
    """A connection's socket: the byte source under thriftpy2's Cython transports, and the
    sink of replies, enforcing kitegreen's bounds.

    It drives a plain non-blocking socket with two gevent io watchers instead of gevent's
    cooperative socket: between requests it waits for readability first and then reads, so
    the common case costs one ``recv`` and no ``BlockingIOError``, and no gevent ``Timeout``
    is armed per wait (the server's idle sweeper enforces ``idle_timeout`` for all connections).

    The transports call :meth:`read` only when their buffer runs dry. The first byte of a
    request starts a deadline of ``read_write_timeout`` for the whole request, however it
    trickles in. Every request may consume at most ``max_frame_size`` bytes, and a transport
    that asks for more than that at once (a frame or string length field that large) is
    refused before a byte of it is read.
    """

    __slots__ = (
        "budget",
        "deadline",
        "frame_header",
        "frame_left",
        "framed",
        "hub",
        "idle",
        "idle_since",
        "last_read",
        "max_frame_size",
        "pending",
        "raw",
        "rw_timeout",
        "rwatch",
        "wwatch",
    )

    def __init__(self, raw: Any, *, rw_timeout: float, max_frame_size: int) -> None:
        self.raw = raw
        self.hub = gevent.get_hub()
        fd = raw.fileno()
        self.rwatch = self.hub.loop.io(fd, 1)
        self.wwatch = self.hub.loop.io(fd, 2)
        self.rw_timeout = rw_timeout
        self.max_frame_size = max_frame_size
        self.deadline: float | None = None
        self.budget = max_frame_size
        self.pending = b""
        self.idle = False
        """True while blocked waiting for the next request: the only state stop() may cut."""
        self.idle_since = 0.0
        self.framed = False
        """Set once the wire is known to be framed: frame headers are then checked here."""
        self.frame_left = 0
        self.frame_header = b""
        self.last_read = 0.0

    def start_request(self) -> None:
        """Forget the previous request's deadline and byte budget.

        On a framed wire a frame that is under way arrived with the previous request's bytes:
        its deadline runs from that read. (A buffered wire has no boundaries to tell.)
        """
        self.budget = self.max_frame_size
        if self.framed and (self.frame_left or self.frame_header):
            self.deadline = self.last_read + self.rw_timeout
        else:
            self.deadline = None

    def close(self) -> None:
        """Release the watchers; call before the socket is closed."""
        self.rwatch.close()
        self.wwatch.close()

    def read(self, n: int) -> bytes:
        """Return up to ``n`` bytes (at least one, or ``b""`` at end of stream)."""
        if n > self.max_frame_size + BUFFER_SIZE:
            # The transport grew its buffer to hold one field of n bytes: a length field over
            # the limit. Refuse before reading it.
            raise FrameTooLarge(
                f"peer announced {n} bytes, max_frame_size is {self.max_frame_size}"
            )
        if self.pending:
            # The bytes protocol detection read: they are the start of the first request.
            data, self.pending = self.pending[:n], self.pending[n:]
            if self.deadline is None:
                self.deadline = time.monotonic() + self.rw_timeout
        elif self.deadline is None:
            data = self._read_idle(RECV_SIZE if n > RECV_SIZE else n)
        else:
            data = self._read_within_deadline(RECV_SIZE if n > RECV_SIZE else n)
        self.budget -= len(data)
        if self.budget < 0 and data:
            raise FrameTooLarge(f"request exceeds max_frame_size ({self.max_frame_size} bytes)")
        if self.framed:
            self._check_frames(data)
        return data

    def _check_frames(self, data: bytes) -> None:
        """Check every frame header in ``data`` before the framed transport sees it.

        thriftpy2's framed transport allocates a frame's announced length as soon as it has
        read the header; checking here refuses a bad length before that, at any size.
        """
        i, size, left = 0, len(data), self.frame_left
        while i < size:
            if left:
                step = min(left, size - i)
                left -= step
                i += step
                continue
            need = 4 - len(self.frame_header)
            self.frame_header += data[i : i + need]
            i += need
            if len(self.frame_header) < 4:
                break
            (length,) = _FRAME_HEADER.unpack(self.frame_header)
            self.frame_header = b""
            if length <= 0:
                raise ProtocolError(f"frame length must be positive, got {length}")
            if length > self.max_frame_size:
                raise FrameTooLarge(
                    f"frame of {length} bytes, max_frame_size is {self.max_frame_size}"
                )
            left = length
        self.frame_left = left

    def _read_idle(self, n: int) -> bytes:
        # Between requests the peer has usually not sent the next one yet: wait, then read.
        self.idle_since = time.monotonic()
        self.idle = True
        try:
            self.hub.wait(self.rwatch)
        finally:
            self.idle = False
        while True:
            try:
                data: bytes = self.raw.recv(n)
                break
            except BlockingIOError:  # a spurious wake-up
                self.hub.wait(self.rwatch)
        if data:
            self.last_read = time.monotonic()
            self.deadline = self.last_read + self.rw_timeout
        return data

    def _read_within_deadline(self, n: int) -> bytes:
        assert self.deadline is not None
        while True:
            try:
                data: bytes = self.raw.recv(n)
            except BlockingIOError:
                pass
            else:
                self.last_read = time.monotonic()
                return data
            self._wait(self.rwatch, "request not received within read_write_timeout")

    def _wait(self, watcher: Any, what: str) -> None:
        assert self.deadline is not None
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(what)
        with gevent.Timeout(remaining, TimeoutError(what)):
            self.hub.wait(watcher)

    def send(self, data: bytes) -> None:
        """Send a whole reply within ``read_write_timeout``.

        One ``send`` covers a reply that fits the socket buffer, which is nearly all of them.

        Raises:
            TimeoutError: the peer did not take the reply in time (it is not reading).
        """
        size = len(data)
        try:
            sent = self.raw.send(data)
        except BlockingIOError:
            sent = 0
        if sent == size:
            return
        self.deadline = time.monotonic() + self.rw_timeout
        view = memoryview(data)
        while sent < size:
            self._wait(self.wwatch, "reply not sent within read_write_timeout")
            with contextlib.suppress(BlockingIOError):
                sent += self.raw.send(view[sent:])


INPUT_BUFFER_SIZE = 1024
"""The input transport's buffer (thriftpy2's minimum). It also allocates an output buffer of
the same size that kitegreen never uses: 4096 would cost 6 KiB more per idle connection, and
the buffer grows by itself for a field that needs more."""


class ReplyEncoder:
    """Encodes replies for every connection of one server into one memory buffer.

    Replies are built in memory and sent in one piece, so a reply that fails to encode (a
    handler returning the wrong type) never leaves half a message on the wire. One buffer is
    enough for all connections: encoding never yields to another greenlet, and the bytes are
    copied out before the send. Per connection it would cost 4 KiB of every idle connection.
    """

    def __init__(self) -> None:
        self._out = TCyMemoryBuffer()
        self._binary = TCyBinaryProtocol(self._out)
        self._compact = TCompactProtocol(self._out)

    def encode(self, wire: Wire, name: str, mtype: int, seqid: int, payload: Any) -> bytes:
        """One whole message, framed if ``wire`` is.

        Raises:
            Exception: whatever the codec raises for a payload that does not match its spec;
                the buffer is left empty.
        """
        out = self._out
        oprot = self._binary if wire.protocol == "binary" else self._compact
        try:
            oprot.write_message_begin(name, mtype, seqid)
            oprot.write_struct(payload)
            oprot.write_message_end()
            data: bytes = out.getvalue()
        finally:
            out.clean()
        if wire.framed:
            return _FRAME_HEADER.pack(len(data)) + data
        return data


class GuardedCompactProtocol(TCompactProtocol):
    """thriftpy2's compact protocol, refusing lengths no valid message can hold.

    Every length (string, binary, container) passes through ``_read_size``, which refuses one
    over ``max_frame_size`` before anything is allocated for it. thriftpy2 skips a container
    by looping over its announced size, and skipping a STOP element reads nothing: a 20-byte
    message announcing 2**31 STOP elements would hold the hub for minutes, so a container of
    STOP elements is refused too (every other element takes at least one byte).
    """

    def __init__(self, trans: Any, max_size: int) -> None:
        super().__init__(trans)
        self._max_size = max_size

    def _read_size(self) -> int:
        size: int = super()._read_size()
        if size > self._max_size:
            raise FrameTooLarge(f"length of {size}, max_frame_size is {self._max_size}")
        return size

    def _read_collection_begin(self) -> tuple[int, int]:
        etype, size = super()._read_collection_begin()
        if size and etype == TType.STOP:
            raise ProtocolError(f"container of {size} elements of type STOP")
        return etype, size

    def _read_map_begin(self) -> tuple[int, int, int]:
        ktype, vtype, size = super()._read_map_begin()
        if size and TType.STOP in (ktype, vtype):
            raise ProtocolError(f"map of {size} entries of type STOP")
        return ktype, vtype, size


def make_input_protocol(wire: Wire, reader: SocketReader) -> Any:
    """The protocol that decodes requests from ``reader`` in ``wire``'s format."""
    trans: Any = (TCyFramedTransport if wire.framed else TCyBufferedTransport)(
        reader, INPUT_BUFFER_SIZE
    )
    if wire.protocol == "binary":
        return TCyBinaryProtocol(trans)
    return GuardedCompactProtocol(trans, reader.max_frame_size)


def is_disconnect(exc: BaseException) -> bool:
    """Whether ``exc`` is a peer going away or timing out, which closes quietly."""
    # socket.timeout is TimeoutError, and BrokenPipeError is a ConnectionError.
    return isinstance(exc, (TimeoutError, ConnectionError))
