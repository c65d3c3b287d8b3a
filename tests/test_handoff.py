"""Handing a live connection from one engine to another (``kitegreen/workers/handoff.py``), in
one process over real sockets: the descriptor over a Unix socket with SCM_RIGHTS, the wire and
the bytes already read beside it, the receiving engine serving it on in order. The same path a
recycled worker's stop takes (``tests/test_recycling.py`` runs it across processes)."""

from __future__ import annotations

import contextlib
import os
import socket
import struct
import time
from collections.abc import Iterator
from typing import Any

import gevent
import pytest
import structlog
import ttheader
import wire
from conftest import wait_until
from service import testsvc_thrift
from thriftpy2.protocol.binary import TBinaryProtocol
from thriftpy2.protocol.compact import TCompactProtocol
from thriftpy2.transport.memory import TMemoryBuffer

from kitegreen.codec import _thrift
from kitegreen.codec.wire import Wire
from kitegreen.config import Config
from kitegreen.workers.board import Board
from kitegreen.workers.handoff import (
    HANDOFF_GRACE,
    SUPPORTED,
    HandoffReceiver,
    HandoffSender,
    decode,
    encode,
    handoff_name,
)
from kitegreen.workers.process import WorkerProcess
from kitegreen.workers.recycle import Recycler, plan_recycling, request_limit

pytestmark = [
    pytest.mark.timeout(30),
    pytest.mark.skipif(not SUPPORTED, reason="hand-over needs Linux"),
]
LOG = structlog.get_logger("kitegreen.tests")


def call(method: str, seqid: int, **args: Any) -> bytes:
    """A compact framed call: a wire the receiver must carry over, not detect afresh."""
    return wire.wrap("framed", wire.encode("compact", method, seqid, **args))


def read_reply(sock: socket.socket) -> tuple[int, Any]:
    """One framed compact reply: ``(seqid, success)``; EOFError on an end-of-stream."""

    def exactly(size: int) -> bytes:
        got = b""
        while len(got) < size:
            chunk = sock.recv(size - len(got))
            if not chunk:
                raise EOFError(len(got))
            got += chunk
        return got

    (length,) = struct.unpack("!i", exactly(4))
    proto = TCompactProtocol(TMemoryBuffer(exactly(length)))
    name, _, seqid = proto.read_message_begin()
    result = getattr(testsvc_thrift.TestService, f"{name}_result")()
    proto.read_struct(result)
    return seqid, result.success


def tt_send(sock: socket.socket, method: str, seqid: int, **args: Any) -> None:
    frame = ttheader.TTHeader(payload=wire.encode("binary", method, seqid, **args), seqid=seqid)
    sock.sendall(ttheader.encode(frame))


def tt_reply(sock: socket.socket, seqid: int) -> tuple[Any, dict[str, str]]:
    """One TTHeader reply: the result and its string headers."""
    head = b""
    while len(head) < 4:
        head += sock.recv(4 - len(head))
    (length,) = struct.unpack("!I", head)
    body = b""
    while len(body) < length:
        chunk = sock.recv(length - len(body))
        if not chunk:
            raise EOFError(len(body))
        body += chunk
    reply = ttheader.decode(head + body)
    proto = TBinaryProtocol(TMemoryBuffer(reply.payload))
    name, _, got = proto.read_message_begin()
    assert got == seqid
    result = getattr(testsvc_thrift.TestService, f"{name}_result")()
    proto.read_struct(result)
    return result.success, ttheader.texts(reply.str_kv)


def tt_call(
    sock: socket.socket, method: str, seqid: int, **args: Any
) -> tuple[Any, dict[str, str]]:
    """One TTHeader call: the result and the reply's string headers."""
    tt_send(sock, method, seqid, **args)
    return tt_reply(sock, seqid)


class Pair:
    """Two servers on loopback; the first hands its connections to the second when it stops."""

    def __init__(
        self,
        make_server: Any,
        *,
        receiver: bool = True,
        answer_after: float = 0.0,
        stop_after_yes: bool = False,
        whole_stop_after_yes: bool = False,
        **config: Any,
    ) -> None:
        folder = config.pop("unix_folder", None)
        if folder is not None:
            self.old = make_server(close_linger=0.2, unix_socket=str(folder / "old.sock"))
            self.new = make_server(close_linger=0.2, unix_socket=str(folder / "new.sock"))
        else:
            self.old = make_server(close_linger=0.2)
            self.new = make_server(close_linger=0.2)
        board = Board(4)
        old_slot, new_slot = board.slot(0), board.slot(1)
        new_slot.set_accepting(receiver)
        self.new_slot = new_slot

        self.new_stop: gevent.Greenlet | None = None

        def ready() -> bool:
            if answer_after:
                gevent.sleep(answer_after)  # a receiver slow to answer: a loaded machine
            expected = self.new.engine.expect_adoption()  # as a worker's receiver asks
            if expected and stop_after_yes:
                # Runs once the receiver has said yes and waits for the sender to let go: a
                # worker told to stop in that window (a reload stopping a worker just ready).
                gevent.spawn(self.new.engine.begin_stop)
            if expected and whole_stop_after_yes:
                # The same, and its whole stop runs in the window (it has no connection of its
                # own to wait for).
                self.new_stop = gevent.spawn(self.new.engine.stop, 5.0)
            return expected

        self.receiver = HandoffReceiver(
            handoff_name(os.getpid(), 1),
            self.new.engine.adopt,
            LOG,
            ready=ready,
            settled=self.new.engine.adoption_settled,
        )
        self.receiver.start()
        self.sender = HandoffSender(board, old_slot, os.getpid(), 60.0, LOG)
        self.old.engine.hand_off_connections(self.sender, grace=HANDOFF_GRACE)

    def close(self) -> None:
        self.receiver.stop()


@pytest.fixture
def pair(make_server: Any) -> Any:
    made = Pair(make_server)
    yield made
    made.close()


@contextlib.contextmanager
def answered_once(pair: Pair) -> Iterator[socket.socket]:
    """A connection to ``pair``'s old engine that has had one call answered; the pair is
    closed afterwards."""
    try:
        with socket.create_connection(pair.old.address, timeout=5.0) as sock:
            sock.sendall(call("echo", 1, message="before"))
            assert read_reply(sock) == (1, "before")
            yield sock
    finally:
        pair.close()


class TestHandOver:
    def test_an_idle_connection_moves_and_its_client_sees_no_close(self, pair):
        with socket.create_connection(pair.old.address, timeout=5.0) as sock:
            sock.sendall(call("echo", 1, message="before"))
            assert read_reply(sock) == (1, "before")
            assert pair.old.stop(timeout=5.0)
            assert pair.sender.handed == 1
            wait_until(lambda: pair.receiver.adopted == 1)
            for seqid in range(2, 6):
                sock.sendall(call("echo", seqid, message=f"after {seqid}"))
                assert read_reply(sock) == (seqid, f"after {seqid}")
            assert pair.new.engine.connections == 1

    def test_a_unix_socket_connection_moves_too(self, make_server, tmp_path):
        pair = Pair(make_server, unix_folder=tmp_path)
        try:
            with socket.socket(socket.AF_UNIX) as sock:
                sock.settimeout(5.0)
                sock.connect(pair.old.address)
                sock.sendall(call("echo", 1, message="before"))
                assert read_reply(sock) == (1, "before")
                assert pair.old.stop(timeout=5.0)
                assert pair.sender.handed == 1
                sock.sendall(call("client_ip", 2))
                assert read_reply(sock) == (2, "")  # no IP on a Unix socket, before or after
        finally:
            pair.close()

    def test_a_pipelined_request_crosses_with_the_connection_in_order(self, pair):
        """A request that arrived behind one in flight is answered, after it, by the new
        engine: the bytes already read travel with the descriptor."""
        with socket.create_connection(pair.old.address, timeout=5.0) as sock:
            sock.sendall(call("echo", 1, message="warm"))
            assert read_reply(sock) == (1, "warm")
            sock.sendall(call("slow", 2, seconds=0.3, message="first") + call("add", 3, a=2, b=3))
            wait_until(lambda: pair.old.engine.overload()["conn_busy"] == 1)
            assert pair.old.stop(timeout=5.0)
            assert read_reply(sock) == (2, "first")
            assert read_reply(sock) == (3, 5)
            assert pair.sender.handed == 1
            sock.sendall(call("echo", 4, message="still"))
            assert read_reply(sock) == (4, "still")

    def test_a_ttheader_connection_moves_without_crrst_and_keeps_its_real_ip(self, pair):
        """A Kitex client must keep a connection that lives on: the reply that crosses the
        stop carries no ``crrst``; the new engine answers the next frames, with the caller's
        address as ``real_ip()``."""
        with socket.create_connection(pair.old.address, timeout=5.0) as sock:
            assert tt_call(sock, "client_ip", 1)[0] == "127.0.0.1"
            tt_send(sock, "slow", 2, seconds=0.3, message="crossing")
            wait_until(lambda: pair.old.engine.overload()["conn_busy"] == 1)
            stopping = gevent.spawn(pair.old.stop, 5.0)
            wait_until(lambda: not pair.old.engine.serving)
            value, headers = tt_reply(sock, 2)
            assert value == "crossing"
            assert "crrst" not in headers
            assert stopping.get(timeout=5.0)
            assert pair.sender.handed == 1
            for seqid in (3, 4):
                value, headers = tt_call(sock, "client_ip", seqid)
                assert value == "127.0.0.1"
                assert "crrst" not in headers
            wait_until(lambda: pair.new.engine.connections == 1)

    def test_the_adopted_connection_starts_a_fresh_idle_timer(self, make_server):
        pair = Pair(make_server)
        try:
            with socket.create_connection(pair.old.address, timeout=5.0) as sock:
                sock.sendall(call("echo", 1, message="x"))
                read_reply(sock)
                time.sleep(0.05)
                assert pair.old.stop(timeout=5.0)
                wait_until(lambda: pair.new.engine.connections == 1)
                (stream,) = list(pair.new.engine._ctx.streams)
                idle = stream.idle_for(time.monotonic())
                assert idle is not None
                assert idle < 0.05
        finally:
            pair.close()

    def test_without_a_live_receiver_the_connection_ends_with_a_fin(self, make_server):
        """No worker ever takes it: the connection is offered until the stop's deadline,
        then ends with a clean end-of-stream, as any stop ends it."""
        pair = Pair(make_server, receiver=False)
        with answered_once(pair) as sock:
            assert pair.old.stop(timeout=1.0)
            assert (pair.sender.handed, pair.sender.kept) == (0, 1)
            assert sock.recv(1) == b""  # a FIN, not a reset

    def test_a_connection_no_worker_took_is_offered_again_until_one_does(self, make_server):
        """No live receiver when the stop begins (the replacement of a recycled worker not
        ready yet, the other worker recycling too): the connection is not ended but offered
        again, and handed over once a receiver is ready; the client's next call is answered
        there and it never sees a close."""
        pair = Pair(make_server, receiver=False)
        with answered_once(pair) as sock:
            stopping = gevent.spawn(pair.old.stop, 5.0)
            wait_until(lambda: pair.sender.kept == 1, what="a first offer that no worker took")
            pair.new_slot.set_accepting(True)
            wait_until(lambda: pair.receiver.adopted == 1, what="the hand-over")
            assert stopping.get(timeout=10.0)
            assert (pair.sender.handed, pair.sender.kept) == (1, 0)
            sock.sendall(call("echo", 2, message="after"))
            assert read_reply(sock) == (2, "after")

    def test_a_hand_off_in_progress_at_the_deadline_is_let_finish(self, make_server):
        """The receiver answers after the stop's deadline (exit_wait_time 0.1 s, answer after
        0.6 s), and the client has already sent its next request: the stop waits for the
        hand-off rather than cut it midway (both copies closed with that request unread: a
        reset), and the new engine answers the request."""
        pair = Pair(make_server, answer_after=0.6)
        with answered_once(pair) as sock:
            stopping = gevent.spawn(pair.old.stop, 0.1)
            wait_until(lambda: pair.old.engine._ctx.handing_off == 1)
            sock.sendall(call("echo", 2, message="sent during the hand-off"))
            assert read_reply(sock) == (2, "sent during the hand-off")
            assert stopping.get(timeout=5.0)
            assert (pair.sender.handed, pair.sender.kept) == (1, 0)
            assert pair.receiver.adopted == 1

    def test_a_receiver_that_begins_stopping_after_it_said_yes_still_takes_it(self, make_server):
        """The receiver said yes, then began stopping before the sender let go: it serves the
        connection all the same, and its own stop ends it later with a FIN at a boundary,
        instead of closing it at once with the client's next request unread (a reset)."""
        pair = Pair(make_server, stop_after_yes=True)
        with answered_once(pair) as sock:
            assert pair.old.stop(timeout=5.0)
            assert pair.sender.handed == 1
            wait_until(lambda: pair.receiver.adopted == 1)
            assert not pair.new.engine.serving
            sock.sendall(call("echo", 2, message="after"))
            assert read_reply(sock) == (2, "after")
            assert pair.new.stop(timeout=5.0)
            assert sock.recv(1) == b""  # a FIN, not a reset

    def test_a_receiver_whose_whole_stop_runs_before_the_release_still_takes_the_connection(
        self, make_server
    ):
        """The receiver said yes, then its whole stop ran (it had no connection of its own)
        before the sender let go: the stop waits for the connection it said yes to and ends it
        as it ends any other (here a FIN at a boundary), rather than finishing first and
        refusing it once the sender has let go (the connection ended unread, and a request
        the client sent meanwhile lost)."""
        pair = Pair(make_server, whole_stop_after_yes=True)
        with answered_once(pair) as sock:
            assert pair.old.stop(timeout=5.0)
            assert pair.sender.handed == 1
            wait_until(lambda: pair.receiver.adopted == 1)
            assert pair.new_stop is not None
            pair.new_stop.join(timeout=10.0)
            assert pair.new_stop.value is True  # no request cut off
            assert sock.recv(1) == b""  # a FIN, not a reset

    def test_a_burst_of_hand_offs_is_shared_out_by_count(self, make_server):
        """A stopping engine's connections, handed over at once, go to the receivers as their
        counts say, the ones handed meanwhile counted: the board's counts are published only
        with each worker's heartbeat (here: never), so without that the whole burst went to
        the receiver with the fewest when it began."""
        old = make_server(close_linger=0.2)
        receivers_engines = [make_server(close_linger=0.2) for _ in range(2)]
        board = Board(4)
        old_slot = board.slot(0)
        receivers = []
        for index, (server, published) in enumerate(
            zip(receivers_engines, (4, 0), strict=True), start=1
        ):
            slot = board.slot(index)
            slot.set_accepting(True)
            slot.set_open(published)
            receiver = HandoffReceiver(handoff_name(os.getpid(), index), server.engine.adopt, LOG)
            receiver.start()
            receivers.append(receiver)
        try:
            old.engine.hand_off_connections(
                HandoffSender(board, old_slot, os.getpid(), 60.0, LOG), grace=HANDOFF_GRACE
            )
            socks = [socket.create_connection(old.address, timeout=5.0) for _ in range(12)]
            with contextlib.ExitStack() as stack:
                for seqid, sock in enumerate(socks, start=1):
                    stack.enter_context(sock)
                    sock.sendall(call("echo", seqid, message="before"))
                    assert read_reply(sock) == (seqid, "before")
                assert old.stop(timeout=5.0)
                wait_until(lambda: sum(r.adopted for r in receivers) == 12)
                # 4 + 4 and 0 + 8: even once the one that had 4 is counted.
                assert [r.adopted for r in receivers] == [4, 8]
                for seqid, sock in enumerate(socks, start=100):
                    sock.sendall(call("echo", seqid, message="after"))
                    assert read_reply(sock) == (seqid, "after")
        finally:
            for receiver in receivers:
                receiver.stop()

    def test_a_stopping_receiver_refuses_and_the_sender_keeps_the_connection(self, make_server):
        pair = Pair(make_server)
        pair.new.engine.begin_stop()
        with answered_once(pair) as sock:
            assert pair.old.stop(timeout=1.0)
            assert (pair.sender.handed, pair.sender.kept) == (0, 1)
            assert sock.recv(1) == b""


class TestParts:
    def test_state_round_trips(self):
        state = encode(("127.0.0.1", 4242), Wire(_thrift.COMPACT, True, None), b"\x00\x01")
        assert decode(state) == (
            ("127.0.0.1", 4242),
            Wire(_thrift.COMPACT, True, None),
            b"\x00\x01",
        )
        assert decode(encode("", None, b"")) == ("", None, b"")
        # A THeader frame inside a framed frame keeps its outer framing across the hand-off.
        nested = Wire(_thrift.BINARY, True, "theader", True)
        assert decode(encode(("::1", 1, 0, 0), nested, b""))[1] == nested
        with pytest.raises(ValueError, match="out of bounds"):
            decode(struct.pack("!I", 1 << 20) + b"{}")

    def test_a_receiver_is_accepting_not_retiring_fresh_and_least_loaded(self):
        board = Board(4)
        slots = [board.slot(i) for i in range(4)]
        for slot, opened in zip(slots, (1, 5, 2, 0), strict=True):
            slot.set_accepting(True)
            slot.set_open(opened)
        slots[3].set_retiring()
        now = time.monotonic()
        assert board.adopter(0, now, 5.0) == 2
        slots[2].set_accepting(False)
        assert board.adopter(0, now, 5.0) == 1
        assert board.adopter(1, now + 10.0, 5.0) is None  # every heartbeat stale
        # Handed since the counts were read: added while a count still reads the same.
        assert board.adopter(0, now, 5.0, {1: (5.0, 0), 3: (0.0, 9)}) == 1
        slots[2].set_accepting(True)
        assert board.adopter(0, now, 5.0, {2: (2.0, 4)}) == 1  # 2 + 4 > 5
        assert board.adopter(0, now, 5.0, {2: (1.0, 4)}) == 2  # it published since: 2

    def test_request_limit_adds_a_jitter_drawn_once(self):
        import random

        config = Config(workers=2, max_requests=200, max_requests_jitter=50)
        limits = {request_limit(config, random.Random(seed)) for seed in range(200)}
        assert min(limits) >= 200
        assert max(limits) <= 250
        assert len(limits) > 10
        assert request_limit(Config(workers=2)) == 0

    def test_memory_over_the_limit_asks_to_retire_once(self):
        asked: list[tuple[str, dict[str, Any]]] = []
        rss = [100 * 1024 * 1024]
        recycler = Recycler(
            Config(workers=2, max_worker_memory=128),
            lambda reason, **figures: asked.append((reason, figures)),
            1.0,
            rss=lambda: rss[0],
        )
        assert not recycler.check_memory()
        rss[0] = 129 * 1024 * 1024
        assert recycler.check_memory()
        assert recycler.check_memory()
        assert asked == [("max_worker_memory", {"rss_mib": 129.0})]

    def test_plan_spawns_first_and_stops_only_above_the_number_wanted(self):
        def worker(pid: int, ready: bool, retiring: bool) -> WorkerProcess:
            w = WorkerProcess(pid, pid, 0, None, None, None)  # type: ignore[arg-type]
            if ready:
                w.mark_ready()
            if retiring:
                w.mark_retiring("max_requests")
            return w

        a, b = worker(1, True, True), worker(2, True, True)
        # Both retiring, nothing new yet: two replacements, nobody stops.
        assert plan_recycling([a, b], [], [a, b], 2) == (2, [])
        c = worker(3, False, False)
        assert plan_recycling([a, b], [c], [a, b, c], 2) == (1, [])
        c.mark_ready()
        # One replacement ready: one retiring worker may go, the oldest.
        assert plan_recycling([a, b], [c], [a, b, c], 2) == (1, [a])
