"""Handing a connection from a retiring worker to a live one, so that its client sees no close.

A recycled worker (``recycle.py``), or an old one a rolling reload stops, does not end its
keep-alive connections: at each one's next message boundary (idle, or right after a reply) it
sends the socket's descriptor to another worker of the instance with ``SCM_RIGHTS``, together
with what only it knows of the connection: the peer's address, the wire detected on it, and
the bytes it had received and not handed out yet (the start of a pipelined request). The other
worker's engine adopts it (:meth:`~kitegreen.rpc.engine.Engine.adopt`) and serves it from
there; the client's next request is read by the new worker, in order, on the same connection.

Worker to worker, not through the arbiter: each worker listens on a Unix ``SOCK_SEQPACKET``
socket named after the arbiter's pid and its board slot (Linux's abstract namespace: no file to
clean up, gone with the process), and the sender picks its receiver from the board (accepting,
not retiring, heartbeat fresh, fewest connections: :meth:`~kitegreen.workers.board.Board.adopter`).
So the arbiter's loop never carries a descriptor or waits on a worker, a hand-off costs one
hop, and a failure is known to the process that still holds the connection, which keeps it and
ends it with a FIN at a reply boundary as any stop does.

One hand-off, on a connection of its own to the receiver:

1. sender -> receiver: one datagram, ``len(state) (4 bytes) + state (JSON) + pending bytes``,
   with the descriptor attached;
2. receiver -> sender: ``b"\\x01"`` (it will serve it) or ``b"\\x00"`` (it will not: stopping,
   malformed); the receiver does not read the connection yet;
3. sender -> receiver: ``b"\\x01"``, sent once the sender has let go (it will never read the
   connection again); only then does the receiver serve it. Without it (the sender gave up
   waiting for the answer, or died) the receiver closes its copy: the two never both read.

What does not travel, and why that is right: the idle timer (the adopted connection waits for
its next request from the moment it is adopted), TTHeader state (each frame carries its own
headers; nothing is kept between requests), the client's address as a proxy claimed it (the
``rip`` header is read again from each frame; between frames the real IP is the peer's).
"""

from __future__ import annotations

import _socket
import contextlib
import json
import os
import socket
import struct
import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import gevent
from gevent.pool import Group

from kitegreen.codec.wire import Wire
from kitegreen.exceptions import describe
from kitegreen.workers.board import Board, Slot

if TYPE_CHECKING:
    from kitegreen.rpc.loop import Connection

SUPPORTED = sys.platform.startswith("linux") and hasattr(socket, "send_fds")
"""Abstract Unix socket names and ``SCM_RIGHTS`` with ``socket.send_fds``: Linux only.
Elsewhere a recycled worker ends its connections with a FIN, as a stop does."""
MAX_PENDING = 64 * 1024
"""Largest unread tail handed over with a connection (one datagram carries it); a connection
holding more waits for its next boundary."""
MAX_STATE = 4096
ANSWER_TIMEOUT = 2.0
"""Seconds a sender waits for the receiver's answer before it keeps the connection."""
RELEASE_TIMEOUT = 5.0
"""Seconds a receiver waits for the sender to let go before it drops its copy."""
HANDOFF_GRACE = ANSWER_TIMEOUT + 0.5
"""The longest one hand-off lasts in the sender (its wait for the answer, then the release):
how long a retiring worker's stop deadline waits for those in progress."""
_LENGTH = struct.Struct("!I")
_YES = b"\x01"
_NO = b"\x00"

Adopt = Callable[[Any, Any, "Wire | None", bytes], bool]
"""Serve a connection: ``(socket, address, wire, pending)``; False to refuse it."""


def handoff_name(arbiter: int, slot: int) -> str:
    """The abstract socket name of the worker in board slot ``slot`` of arbiter ``arbiter``."""
    return f"\0kitegreen-handoff-{arbiter}-{slot}"


def encode(address: Any, wire: Wire | None, pending: bytes) -> bytes:
    """One hand-off datagram's bytes (the descriptor travels beside them)."""
    state = json.dumps(
        {
            "address": list(address) if isinstance(address, tuple) else address,
            "wire": (
                [wire.protocol, wire.framed, wire.header, wire.nested] if wire is not None else None
            ),
        },
        separators=(",", ":"),
    ).encode()
    return _LENGTH.pack(len(state)) + state + pending


def decode(data: bytes) -> tuple[Any, Wire | None, bytes]:
    """``(address, wire, pending)`` from a hand-off datagram.

    Raises:
        ValueError: the datagram is not one :func:`encode` made.
    """
    if len(data) < _LENGTH.size:
        raise ValueError("hand-off datagram too short")
    (size,) = _LENGTH.unpack_from(data)
    if size > MAX_STATE or _LENGTH.size + size > len(data):
        raise ValueError("hand-off state length out of bounds")
    state = json.loads(data[_LENGTH.size : _LENGTH.size + size])
    address = state["address"]
    wire = state["wire"]
    return (
        tuple(address) if isinstance(address, list) else address,
        Wire(int(wire[0]), bool(wire[1]), wire[2], bool(wire[3]) if len(wire) > 3 else False)
        if wire is not None
        else None,
        data[_LENGTH.size + size :],
    )


class HandoffReceiver:
    """A worker's hand-off socket: takes connections other workers hand over and has its
    engine adopt them.

    Args:
        name: the socket's name (:func:`handoff_name`).
        adopt: serves a connection, or refuses it (False).
        log: a structlog logger.
        ready: whether the engine serves (a stopping one answers no, and the sender keeps
            its connection): :meth:`Engine.expect_adoption`.
        settled: called once for each hand-off ``ready`` said yes to, when it is over
            (adopted, refused as malformed, or never released): :meth:`Engine.adoption_settled`.
    """

    def __init__(
        self,
        name: str,
        adopt: Adopt,
        log: Any,
        *,
        ready: Callable[[], bool] = lambda: True,
        settled: Callable[[], object] = lambda: None,
    ) -> None:
        self.name = name
        self._adopt = adopt
        self._ready = ready
        self._settled = settled
        self.log = log
        self._sock: Any = None
        self._peers = Group()
        self._peer_socks: set[Any] = set()
        """Sockets of senders being served: closed at stop, even by a greenlet killed before
        it ran."""
        self._greenlet: gevent.Greenlet | None = None
        self.adopted = 0

    def start(self) -> None:
        """Listen and take hand-offs; idempotent.

        Raises:
            OSError: the socket could not be bound.
        """
        if self._sock is not None:
            return
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            sock.bind(self.name)
            sock.listen(64)
        except OSError:
            sock.close()
            raise
        self._sock = sock
        self._greenlet = gevent.spawn(self._accept)

    def stop(self) -> None:
        """Stop taking hand-offs and close the socket; idempotent."""
        greenlet, self._greenlet = self._greenlet, None
        if greenlet is not None:
            greenlet.kill(block=False)
        self._peers.kill(block=False)
        for peer in list(self._peer_socks):
            peer.close()
        self._peer_socks.clear()
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()

    def _accept(self) -> None:
        while True:
            try:
                peer, _ = self._sock.accept()
            except OSError as exc:
                self.log.warning("hand-off socket failed", error=describe(exc))
                return
            self._peer_socks.add(peer)
            self._peers.spawn(self._take, peer)

    def _take(self, peer: Any) -> None:
        try:
            self._take_one(peer)
        finally:
            self._peer_socks.discard(peer)
            peer.close()

    def _take_one(self, peer: Any) -> None:
        try:
            data, fds, flags, _ = socket.recv_fds(peer, _LENGTH.size + MAX_STATE + MAX_PENDING, 1)
        except OSError:
            return
        if not fds:
            return
        for extra in fds[1:]:
            with contextlib.suppress(OSError):
                os.close(extra)
        raw = _socket.socket(fileno=fds[0])
        served = False
        try:
            served = self._serve(peer, raw, data, flags)
        finally:
            if not served:
                # The sender keeps its copy (no FIN reaches the client), or the connection
                # is ended as this worker's stop ends any other.
                raw.close()

    def _serve(self, peer: Any, raw: Any, data: bytes, flags: int) -> bool:
        if not self._ready():
            with contextlib.suppress(OSError):
                peer.send(_NO)
            return False
        try:
            return self._serve_expected(peer, raw, data, flags)
        finally:
            self._settled()

    def _serve_expected(self, peer: Any, raw: Any, data: bytes, flags: int) -> bool:
        """:meth:`_serve` once the engine expects the connection."""
        try:
            if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
                raise ValueError("hand-off datagram truncated")
            address, wire, pending = decode(data)
        except (ValueError, KeyError, TypeError, IndexError) as exc:
            self.log.error("malformed hand-off refused", error=describe(exc))
            with contextlib.suppress(OSError):
                peer.send(_NO)
            return False
        try:
            peer.send(_YES)
            with gevent.Timeout(RELEASE_TIMEOUT, TimeoutError):
                released = peer.recv(1) == _YES
        except OSError:
            released = False
        if not released:
            # The sender kept the connection (or died): it must never be read twice.
            return False
        raw.setblocking(False)
        if not self._adopt(raw, address, wire, pending):
            # The engine's stop is past waiting for connections (the sender let go, so no one
            # else will serve it): a FIN, though any request already sent is lost.
            self.log.warning("handed-over connection ended: this worker's stop is over")
            with contextlib.suppress(OSError):
                raw.shutdown(socket.SHUT_WR)
            return False
        self.adopted += 1
        return True


class HandoffSender:
    """Hands a worker's connections to the others (:meth:`Engine.hand_off_connections`).

    Args:
        board: the instance's board.
        slot: this worker's slot (never its own receiver).
        arbiter: the arbiter's pid (part of every receiver's name).
        stale_after: seconds after which a heartbeat is too old for a receiver.
        log: a structlog logger.
    """

    def __init__(self, board: Board, slot: Slot, arbiter: int, stale_after: float, log: Any):
        self._board = board
        self._slot = slot
        self._arbiter = arbiter
        self._stale_after = stale_after
        self.log = log
        self.handed = 0
        self._kept: set[Connection] = set()
        """The connections offered and taken by no worker, so far: each is offered again at
        its next boundary until the stop's deadline."""
        self._unseen: dict[int, tuple[float, int]] = {}
        """Per receiver: its published count when last read, and the connections handed (or
        being handed) to it since. A receiver publishes its count with its heartbeat, so a
        burst of hand-offs (a whole worker's connections, at once) would otherwise all go to
        the receiver that had the fewest when the burst began."""

    def __call__(self, connection: Connection) -> bool:
        """Hand ``connection`` over; True if another worker took it (this one must then close
        its copy without a FIN and never read it again)."""
        if self._hand(connection):
            self.handed += 1
            self._kept.discard(connection)
            return True
        self._kept.add(connection)
        return False

    @property
    def kept(self) -> int:
        """Connections no worker took (each counted once however often it was offered)."""
        return len(self._kept)

    def _hand(self, connection: Connection) -> bool:
        stream = connection.stream
        pending = stream.pending()
        if len(pending) > MAX_PENDING:
            return False
        target = self._board.adopter(
            self._slot.index, time.monotonic(), self._stale_after, self._unseen
        )
        if target is None:
            return False
        self._count(target, 1)
        handed = False
        try:
            handed = self._send(target, connection, pending)
        finally:
            if not handed:
                self._count(target, -1)
        return handed

    def _count(self, target: int, change: int) -> None:
        """Count a hand-off to ``target`` in or out of what its published count lacks."""
        published = self._board.open_count(target)
        seen, handed = self._unseen.get(target, (published, 0))
        if seen != published:
            handed = 0  # it published since: its count includes what it took
        self._unseen[target] = (published, max(handed + change, 0))

    def _send(self, target: int, connection: Connection, pending: bytes) -> bool:
        stream = connection.stream
        data = encode(connection.address, stream.wire, pending)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        with contextlib.closing(sock):
            try:
                with gevent.Timeout(ANSWER_TIMEOUT, TimeoutError):
                    sock.connect(handoff_name(self._arbiter, target))
                    socket.send_fds(sock, [data], [stream.raw.fileno()])
                    answer = sock.recv(1)
            except OSError as exc:  # a timeout included
                self.log.debug("connection not handed over", to=target, error=describe(exc))
                return False
            if answer != _YES:
                return False
            try:
                # Let go: the receiver serves it from now on.
                sock.send(_YES)
            except OSError:
                return False
        return True
