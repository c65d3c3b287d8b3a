"""A client connection's socket, read one whole message at a time under its deadlines.

:class:`MessageStream` owns everything about a connection's bytes: the wire detected from its
first bytes, the bytes received and not yet handed out, the deadline of the message being read,
whether it is idle, and how it closes. It knows where a message ends (a frame's length, or the
codec's scanner on a buffered wire) but decodes nothing: the request loop gets the whole
message's bytes and decodes them from memory.

Memory follows the bytes that arrived, never a length a peer announced: a frame header
announcing 16 MiB reserves nothing, the buffer grows as bytes come, and once a message has been
handed out the buffer is dropped, so an idle connection holds no buffer at all.
"""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Callable
from typing import Any

import gevent

from kitegreen.codec import _thrift
from kitegreen.codec.wire import DETECT_BYTES, Wire, detect
from kitegreen.exceptions import FrameTooLarge, ProtocolError
from kitegreen.transport import _sockio

_frame_end = _thrift.frame_end
_scan = _thrift.scan
# The socket's own recv and send, without what CPython's socket methods do around a call that
# cannot block (see _sockio.c): per request, ~2,400 instructions less.
_recv = _sockio.recv
_send = _sockio.send
RECV_SIZE = _sockio.RECV_SIZE
"""Upper bound on one recv (64 KiB)."""
HAND_OVER_RETRY = 0.5
"""Seconds between two offers of an idle connection that no other worker took (none live yet,
as when both of two workers recycle at once): it is offered again until the stop's deadline,
and at 10,000 idle connections an offer every round of the stop's 50 ms wait would keep the
process busy offering."""
CLOSE_LINGER = 1.0
"""Seconds a closing connection keeps reading (and discarding) after it sent its FIN, so that
bytes the peer sent meanwhile never turn the close into a reset."""

_MSG_PEEK_DONTWAIT = socket.MSG_PEEK | socket.MSG_DONTWAIT


class IdleTimeout(TimeoutError):
    """Raised into a connection waiting longer than ``idle_timeout`` for its next request."""


class StopServing(Exception):
    """Raised into an idle connection to end it while the server stops."""


class PeerClosed(ConnectionError):
    """The peer closed its side in the middle of a message."""


class HandOver(StopServing):
    """Raised into an idle connection to hand it to another worker (worker recycling)."""


class MessageStream:
    """One accepted socket, read a whole message at a time.

    It drives a plain non-blocking socket with two gevent io watchers rather than gevent's
    cooperative socket: between messages it waits for readability first, holding no greenlet
    (:meth:`wait_readable`), and then reads, so the common case costs one ``recv``, no
    ``BlockingIOError`` and no gevent ``Timeout`` (an idle sweeper enforces ``idle_timeout``
    for every connection at once).

    Args:
        raw: a connected, non-blocking socket.
        rw_timeout: seconds to receive a whole message from its first byte, and to send a reply.
        max_frame_size: the largest message (or frame) accepted, in bytes.
    """

    __slots__ = (
        "_buf",
        "_done",
        "_fd",
        "_pos",
        "_received_at",
        "_timer",
        "_waiter",
        "hub",
        "idle",
        "idle_since",
        "max_frame_size",
        "offer_again_at",
        "raw",
        "rw_timeout",
        "rwatch",
        "started_at",
        "wire",
        "wwatch",
    )

    def __init__(self, raw: Any, *, rw_timeout: float, max_frame_size: int) -> None:
        self.raw = raw
        self.hub = gevent.get_hub()
        fd = self._fd = raw.fileno()
        """``raw``'s file descriptor while it is open, -1 once closed (see :meth:`cut_off`)."""
        self.rwatch = self.hub.loop.io(fd, 1)
        self.wwatch = self.hub.loop.io(fd, 2)
        self.rw_timeout = rw_timeout
        self.max_frame_size = max_frame_size
        self.wire: Wire | None = None
        """The connection's wire, once its first bytes told it."""
        self._buf: bytes | bytearray = b""
        self._pos = 0
        self._received_at = 0.0
        self._waiter: Any = None
        self._timer: Any = None
        self._done: Callable[[], object] | None = None
        self.idle = False
        """True while waiting for the first byte of a message: the only state a stop or the
        idle sweeper may cut without losing a request."""
        self.idle_since = 0.0
        self.started_at = 0.0
        """When the first byte of the message being read (or last read) arrived."""
        self.offer_again_at = 0.0
        """In a stop that hands connections over: when to offer this one again, after an
        offer no worker took (see :data:`HAND_OVER_RETRY`)."""

    # -- reading ---------------------------------------------------------------------------

    def read_message(self) -> tuple[bytes | bytearray, int, int]:
        """Receive one whole message, beginning with the bytes :meth:`receive` took.

        Returns:
            ``(buffer, start, end)``: the message is ``buffer[start:end]`` (a frame's payload on
            a framed wire; the whole frame, length included, for a header frame), valid until
            the next call.

        Raises:
            TimeoutError: the message did not arrive within ``read_write_timeout`` of its first
                byte (detection included).
            ProtocolError: the bytes are not a message this server accepts (FrameTooLarge when
                it would exceed ``max_frame_size``).
            PeerClosed: the peer closed the connection in the middle of a message.
        """
        # Bytes left over from the previous read came with its last recv: their deadline runs
        # from then, so a pipelined request gets no more time than any other.
        self.started_at = self._received_at
        wire = self.wire
        if wire is None:
            while (wire := self._detect()) is None:
                self._recv_more()
            self.wire = wire
        if wire.framed:
            start, end = self._frame()
            start += wire.length_skipped
        else:
            # _scan's common case, inlined (per request): the message is whole in the buffer.
            start = self._pos
            found = _scan(wire.protocol, self._buf, start, len(self._buf), self.max_frame_size)
            if isinstance(found, int):
                end = found
            else:
                start, end = self._scan_on(found)
        buf = self._buf
        if end == len(buf):
            # Nothing pipelined behind it: the connection drops its buffer until the next
            # message, however large this one was.
            self._buf, self._pos = b"", 0
        else:
            self._pos = end
        return buf, start, end

    def buffered(self) -> bool:
        """Whether received bytes wait to be handed out (a pipelined message's start)."""
        return self._pos < len(self._buf)

    def receive(self) -> bool | None:
        """Once woken by bytes (:meth:`wait_readable`): end the wait and take what arrived,
        with one ``recv`` if nothing was buffered.

        Returns:
            True: bytes are buffered; False: the peer closed the connection between
            messages; None: nothing had arrived after all (a spurious wake-up).
        """
        # _end_wait(), inlined (per request).
        self.rwatch.stop()
        self.idle = False
        self._waiter = None
        if self._pos < len(self._buf):
            return True
        try:
            data = _recv(self._fd)
        except BlockingIOError:
            return None
        if not data:
            return False
        self._received_at = time.monotonic()
        self._buf, self._pos = data, 0
        return True

    def pending(self) -> bytes:
        """The bytes received and not handed out yet (a pipelined request's beginning), for a
        hand-over to another process between messages."""
        return bytes(self._buf[self._pos :])

    def preload(self, data: bytes, wire: Wire | None) -> None:
        """Start from what another process had received on this connection: its wire and
        the bytes it had not handed out; their deadline runs from now."""
        self.wire = wire
        self._buf, self._pos = data, 0
        self._received_at = time.monotonic()

    def unread(self) -> tuple[bytes | bytearray, int, int]:
        """The bytes received of the message being read (after a frame's length), for an error
        reply that names the request a refused message was."""
        wire = self.wire
        start = self._pos + (4 if wire is not None and wire.message_framed else 0)
        end = len(self._buf)
        return self._buf, min(start, end), end

    def _detect(self) -> Wire | None:
        head = bytes(self._buf[self._pos : self._pos + DETECT_BYTES])
        return detect(head, self.max_frame_size)

    def _frame(self) -> tuple[int, int]:
        """The next whole frame, received until it is: where it starts (its length
        included) and ends."""
        try:
            while (
                end := _frame_end(self._buf, self._pos, len(self._buf), self.max_frame_size)
            ) < 0:
                self._recv_more()
        except ProtocolError as exc:
            if not isinstance(exc, FrameTooLarge):
                # A length of 0 or less: nothing after it can be read as a message, so the
                # stream forgets it all (no error reply can name a request from it).
                self._buf, self._pos = b"", 0
            raise
        return self._pos, end

    def _scan_on(self, found: _thrift.Scanner | int) -> tuple[int, int]:
        """The rest of an unframed message ``found`` (the scanner) began: received until whole."""
        while not isinstance(found, int):
            # The scanner keeps its place: each recv costs a walk over the new bytes only.
            scanner = found
            self._recv_more()
            end = scanner.feed(self._buf, self._pos, len(self._buf))
            if end >= 0:
                found = end
        return self._pos, found

    def wait_readable(
        self,
        ready: Callable[[Any], object],
        token: Any,
        wake: Callable[[BaseException], object],
    ) -> None:
        """Between messages: wait for the next one holding no greenlet.

        The read watcher calls ``ready(token)`` from the hub once bytes (or an end-of-stream)
        arrive; the side that serves it calls :meth:`receive` first, which ends the wait. Or
        :meth:`interrupt_if_idle` ends it and calls ``wake(exc)``. Call again to wait again.

        Until :meth:`receive` is called the stream still reads as :attr:`idle`: whoever ends
        idle streams checks :meth:`has_input` too (bytes that arrived are never cut off).
        """
        self.idle_since = time.monotonic()
        self.idle = True
        self._waiter = wake
        # ``ready`` straight from the loop: no Python frame between the watcher and the queue.
        self.rwatch.start(ready, token)

    def _recv_more(self) -> None:
        """Append the next bytes of the message being read, waiting no later than its deadline
        (``read_write_timeout`` from its first byte)."""
        deadline = self.started_at + self.rw_timeout
        buf = self._buf
        if self._pos or not isinstance(buf, bytearray):
            # From here on the buffer grows in place.
            buf = self._buf = bytearray(memoryview(buf)[self._pos :])
            self._pos = 0
        while True:
            try:
                data = _recv(self._fd)
            except BlockingIOError:
                self._wait(self.rwatch, deadline, "request not received within read_write_timeout")
                continue
            if not data:
                raise PeerClosed(f"closed by peer after {len(buf)} bytes of a message")
            self._received_at = time.monotonic()
            buf += data
            return

    def _wait(self, watcher: Any, deadline: float, what: str) -> None:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(what)
        with gevent.Timeout(remaining, TimeoutError(what)):
            self.hub.wait(watcher)

    # -- writing ---------------------------------------------------------------------------

    def send(self, data: bytes) -> None:
        """Send a whole reply within ``read_write_timeout``.

        One ``send`` covers a reply that fits the socket buffer, which is nearly all of them.

        Raises:
            TimeoutError: the peer did not take the reply in time (it is not reading).
        """
        size = len(data)
        try:
            sent = _send(self._fd, data)
        except BlockingIOError:
            sent = 0
        if sent == size:
            return
        deadline = time.monotonic() + self.rw_timeout
        view = memoryview(data)
        while sent < size:
            self._wait(self.wwatch, deadline, "reply not sent within read_write_timeout")
            with contextlib.suppress(BlockingIOError):
                sent += self.raw.send(view[sent:])

    # -- state and closing -----------------------------------------------------------------

    def has_input(self) -> bool:
        """Whether request bytes wait: received and not handed out, or in the kernel's buffer."""
        if self._pos < len(self._buf):
            return True
        try:
            return bool(self.raw.recv(1, _MSG_PEEK_DONTWAIT))
        except BlockingIOError:
            return False
        except OSError:
            return False

    def idle_for(self, now: float) -> float | None:
        """Seconds this stream has waited for its next message at ``now``; None while it is
        in the middle of one."""
        return now - self.idle_since if self.idle else None

    def interrupt_if_idle(self, exc: BaseException) -> bool:
        """Raise ``exc`` into the connection if it is waiting for a message with nothing unread.

        Returns:
            Whether it was idle. The check is made again in the hub just before raising: a
            connection that started a message meanwhile is left alone.
        """
        if not self.idle or self.has_input():
            return False
        self.hub.loop.run_callback(self._interrupt, exc)
        return True

    def _interrupt(self, exc: BaseException) -> None:
        # Runs in the hub, from a loop callback: the dispatcher has run every wake-up queued
        # before it (it hands a whole iteration's queue out before the loop polls again), so
        # still idle means still waiting on the read watcher, and has_input() says whether
        # bytes came meanwhile: nothing can be lost.
        waiter = self._waiter
        if self.idle and waiter is not None and not self.has_input():
            self._end_wait()
            waiter(exc)

    def _end_wait(self) -> None:
        """No longer waiting for a message: the watcher stopped, no one to wake."""
        self.rwatch.stop()
        self.idle = False
        self._waiter = None

    def close(self, linger: float = CLOSE_LINGER, done: Callable[[], object] | None = None) -> None:
        """Close with a FIN, never a reset; call ``done()`` once the socket is closed.

        Closing a socket with unread bytes makes the kernel send a reset, which can destroy a
        reply still in flight to the peer. So the write side is shut first (the peer reads
        end-of-stream after whatever it was sent), then whatever the peer still sends is read
        and discarded until it closes too or ``linger`` seconds pass. That wait holds no
        greenlet: the read watcher and a timer finish it from the hub, so this returns at once.
        """
        self._done = done
        self._end_wait()
        self._buf = b""
        if linger > 0:
            try:
                self.raw.shutdown(socket.SHUT_WR)
            except OSError:
                pass
            else:
                self._timer = self.hub.loop.timer(linger)
                self._timer.start(self.cut_off)
                self._discard()
                return
        self.cut_off()

    def _discard(self) -> None:
        while True:
            try:
                if _recv(self._fd):
                    continue
            except BlockingIOError:
                # Wait for more, or the peer's FIN; the timer ends the wait.
                if not self.rwatch.active:
                    self.rwatch.start(self._discard)
                return
            except OSError:
                pass
            self.cut_off()
            return

    @property
    def lingering(self) -> bool:
        """Whether :meth:`close` is waiting for the peer's FIN."""
        return self._timer is not None

    def cut_off(self) -> None:
        """Close the socket now, a linger in progress included; idempotent."""
        timer, self._timer = self._timer, None
        if timer is not None:
            timer.close()
        self._end_wait()
        self._buf = b""
        self.rwatch.close()
        self.wwatch.close()
        # Forgotten before the socket closes: the kernel may give its number to the next
        # connection accepted, which must never be read or written through this stream.
        self._fd = -1
        if self.raw.fileno() >= 0:
            self.raw.close()
        done, self._done = self._done, None
        if done is not None:
            done()
