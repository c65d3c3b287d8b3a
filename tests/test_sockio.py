"""The request loop's recv and send (``kitegreen.transport._sockio``) behave as the socket
module's do on a non-blocking socket: the same bytes, the same exceptions; and a closed
connection's stream never reads or writes the file descriptor number a later one gets.

Real sockets throughout (Unix socket pairs, and TCP on loopback for a reset).
"""

from __future__ import annotations

import errno
import socket
import struct
from collections.abc import Iterator

import pytest
from conftest import assert_no_leak

from kitegreen.transport import _sockio
from kitegreen.transport.stream import MessageStream

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    """A connected pair: the first non-blocking (the server's side), the second blocking."""
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    theirs.settimeout(5.0)
    try:
        yield ours, theirs
    finally:
        ours.close()
        theirs.close()


def reset_within_polls(fd: int, polls: int = 1000) -> BaseException | None:
    """What ``recv`` raised once something had arrived (the reset, on loopback, by the first
    poll or so); None if nothing did."""
    for _ in range(polls):
        try:
            _sockio.recv(fd)
        except BlockingIOError:
            continue
        except OSError as exc:
            return exc
    return None


def _send_or_none(fd: int, data: bytes) -> int | None:
    """What ``send`` took; None once the socket takes nothing (BlockingIOError)."""
    try:
        return _sockio.send(fd, data)
    except BlockingIOError:
        return None


class TestRecv:
    def test_returns_exactly_what_arrived(self, pair: tuple[socket.socket, socket.socket]) -> None:
        ours, theirs = pair
        theirs.sendall(b"\x80\x01\x00\x01ping")
        assert _sockio.recv(ours.fileno()) == b"\x80\x01\x00\x01ping"

    def test_takes_at_most_recv_size_and_leaves_the_rest(
        self, pair: tuple[socket.socket, socket.socket]
    ) -> None:
        ours, theirs = pair
        ours.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        data = bytes(range(256)) * (3 * _sockio.RECV_SIZE // 256)
        theirs.sendall(data)
        got = b""
        while len(got) < len(data):
            chunk = _sockio.recv(ours.fileno())
            assert 0 < len(chunk) <= _sockio.RECV_SIZE
            got += chunk
        assert got == data

    def test_nothing_arrived_is_blocking_io_error(
        self, pair: tuple[socket.socket, socket.socket]
    ) -> None:
        ours, _ = pair
        with pytest.raises(BlockingIOError):
            _sockio.recv(ours.fileno())

    def test_end_of_stream_is_empty_bytes(self, pair: tuple[socket.socket, socket.socket]) -> None:
        ours, theirs = pair
        theirs.sendall(b"last")
        theirs.shutdown(socket.SHUT_WR)
        assert _sockio.recv(ours.fileno()) == b"last"
        assert _sockio.recv(ours.fileno()) == b""

    def test_a_reset_is_connection_reset_error(self) -> None:
        listener = socket.create_server(("127.0.0.1", 0))
        with listener:
            client = socket.create_connection(listener.getsockname(), timeout=5.0)
            server, _ = listener.accept()
            with client, server:
                server.setblocking(False)
                # SO_LINGER 0: close() sends a reset instead of a FIN.
                client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                client.close()
                assert isinstance(reset_within_polls(server.fileno()), ConnectionResetError)


class TestSend:
    def test_sends_the_bytes(self, pair: tuple[socket.socket, socket.socket]) -> None:
        ours, theirs = pair
        assert _sockio.send(ours.fileno(), b"reply") == 5
        assert theirs.recv(100) == b"reply"

    def test_a_full_socket_takes_part_then_nothing(
        self, pair: tuple[socket.socket, socket.socket]
    ) -> None:
        ours, theirs = pair
        ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        data = b"x" * (4 << 20)
        sent = _sockio.send(ours.fileno(), data)
        assert 0 < sent < len(data)
        while (taken := _send_or_none(ours.fileno(), data[sent:])) is not None:
            sent += taken
        received = 0
        theirs.setblocking(False)
        while received < sent:
            try:
                received += len(theirs.recv(1 << 20))
            except BlockingIOError:
                break
        assert received == sent

    def test_a_closed_peer_is_an_error_not_a_signal(
        self, pair: tuple[socket.socket, socket.socket]
    ) -> None:
        ours, theirs = pair
        theirs.close()
        with pytest.raises((BrokenPipeError, ConnectionResetError)):
            _sockio.send(ours.fileno(), b"reply")


class TestArguments:
    def test_a_closed_streams_fd_is_ebadf(self) -> None:
        for call in (lambda: _sockio.recv(-1), lambda: _sockio.send(-1, b"x")):
            with pytest.raises(OSError, match="Bad file descriptor") as caught:
                call()
            assert caught.value.errno == errno.EBADF

    @pytest.mark.parametrize("fd", ["3", 3.0, None, 2**70, -(2**40)])
    def test_a_bad_fd_is_refused(self, fd: object) -> None:
        with pytest.raises((TypeError, OverflowError)):
            _sockio.recv(fd)  # type: ignore[arg-type]
        with pytest.raises((TypeError, OverflowError)):
            _sockio.send(fd, b"x")  # type: ignore[arg-type]

    @pytest.mark.parametrize("data", [bytearray(b"x"), memoryview(b"x"), "x", None])
    def test_send_takes_bytes_only(
        self, pair: tuple[socket.socket, socket.socket], data: object
    ) -> None:
        ours, _ = pair
        with pytest.raises(TypeError, match="data must be bytes"):
            _sockio.send(ours.fileno(), data)  # type: ignore[arg-type]

    def test_send_takes_two_arguments(self, pair: tuple[socket.socket, socket.socket]) -> None:
        ours, _ = pair
        with pytest.raises(TypeError, match="2 arguments"):
            _sockio.send(ours.fileno())  # type: ignore[call-arg]

    def test_no_reference_is_leaked(self, pair: tuple[socket.socket, socket.socket]) -> None:
        ours, theirs = pair
        theirs.setblocking(False)

        def work() -> None:
            _sockio.send(ours.fileno(), b"ping" * 8)
            theirs.recv(64)
            theirs.send(b"pong" * 8)
            assert _sockio.recv(ours.fileno()) == b"pong" * 8
            with pytest.raises(BlockingIOError):
                _sockio.recv(ours.fileno())

        assert_no_leak(work)


def test_a_closed_stream_never_reads_the_next_connections_socket() -> None:
    """A stream keeps its socket's fd number for the fast calls; once closed it must not use
    it: the kernel hands the lowest free number to the next socket, another client's."""
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    stream = MessageStream(ours, rw_timeout=5.0, max_frame_size=1 << 20)
    number = ours.fileno()
    stream.cut_off()
    theirs.close()
    newer, other_client = socket.socketpair()
    with newer, other_client:
        # The lowest free numbers go first: one of the two has the closed stream's, and both
        # have a request waiting.
        assert number in (newer.fileno(), other_client.fileno())
        newer.sendall(b"a request")
        other_client.sendall(b"another client's request")
        with pytest.raises(OSError, match="Bad file descriptor") as caught:
            stream.receive()
        assert caught.value.errno == errno.EBADF
        newer.setblocking(False)
        other_client.setblocking(False)
        assert newer.recv(100) == b"another client's request"
        assert other_client.recv(100) == b"a request"
