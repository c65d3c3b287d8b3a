"""Soak and fuzz a kitegreen server by hand: ``python benchmarks/soak.py [--duration 60]``.

Starts ``python -m kitegreen benchmarks/soak_target.py:make_server`` on loopback (debug server
on), then for ``--duration`` seconds runs, in greenlets of this process:

==================  ================================================================================
well-behaved        thriftpy2 clients, one per wire, calling every method and checking the answers
probe               (a process of its own) a ping every 100 ms on one connection and GET /health
                    every 500 ms: their latencies are the responsiveness
random / mutated    fuzzers: random bytes (bare or behind a wire's header), and valid calls with
                    bit flips, truncations, insertions and deletions; the input is ended (EOF) and
                    the server must close within a bound, having written only whole messages
catalog             the known attacks (absurd lengths, 10,000-deep nesting, wrong versions and
                    message types, ...) on every wire, half ending their input, half waiting
flood               connections opened and dropped 50 at a time: closed, reset, half a request, HTTP
trickle             a request one byte every 50 ms until the server cuts it off
non-reader          echo_binary(256 KiB) requests sent and never read until the server cuts it off
burst               pipelined pings over the QPS limit: the excess must be shed (LOADSHEDDING)
==================  ================================================================================

At the end it prints a summary: connections opened, inputs tried, requests served, outcomes and
errors by kind, the server's file descriptors and resident memory (from /proc/PID) before and
after, and whether it stayed responsive. It exits 1 if an invariant broke: an error seen, the
probe or the debug endpoint failing or slower than ``read_write_timeout + 1 s``, or the server's
fds not back to where they were.

Everything is bounded: the duration, every socket operation, every worker's count; loopback
only; the server is killed in ``finally``. ``--skip-bombs`` adds containers of zero-width
elements (a known thriftpy2 skip-loop issue that stalls the server for seconds).
"""

from __future__ import annotations

from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import collections  # noqa: E402
import contextlib  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import random  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import statistics  # noqa: E402
import struct  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import urllib.error  # noqa: E402
import urllib.request  # noqa: E402
from collections.abc import Callable, Iterator  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import gevent  # noqa: E402
from gevent.event import Event  # noqa: E402
from gevent.pool import Pool  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import soak_target  # noqa: E402 - the benchmarks folder is not a package
from soak_wire import (  # noqa: E402
    EXCEPTION,
    INT32_MAX,
    ONEWAY,
    REPLY,
    encode,
    head,
    sample_item,
    server_wire,
    varint,
    wrap,
)

TARGET = f"{HERE / 'soak_target.py'}:make_server"
START_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0
LOOPBACK = "127.0.0.1"
WIRES = (
    ("binary", "buffered"),
    ("binary", "framed"),
    ("compact", "buffered"),
    ("compact", "framed"),
)
LOADSHEDDING = 11
STOP = b"\x00"

testsvc = soak_target.load_testsvc()


# -- encoding ------------------------------------------------------------------------------------


def valid_calls(protocol: str, transport: str) -> list[bytes]:
    calls = [
        encode(protocol, "ping"),
        encode(protocol, "echo", message="hello, world"),
        encode(protocol, "echo_binary", data=bytes(range(64))),
        encode(protocol, "add", a=2, b=40),
        encode(protocol, "roundtrip", item=sample_item()),
        encode(protocol, "raise_declared", message="no", code=3),
        encode(protocol, "notify", mtype=ONEWAY, tag="t"),
        encode(protocol, "wrong_return"),
    ]
    return [wrap(transport, c) for c in calls]


def catalog(
    protocol: str, transport: str, max_frame_size: int, bombs: bool
) -> list[tuple[str, bytes]]:
    """The known attacks on one wire."""

    def w(message: bytes) -> bytes:
        return wrap(transport, message)

    depth = 10_000
    ping = encode(protocol, "ping")
    if protocol == "binary":
        huge_string = head(protocol, "echo") + struct.pack("!bhi", 11, 1, INT32_MAX) + b"abc"
        huge_list = head(protocol, "add") + struct.pack("!bhbi", 15, 3, 8, INT32_MAX) + bytes(12)
        structs = (
            head(protocol, "roundtrip")
            + struct.pack("!bh", 12, 1)
            + struct.pack("!bh", 12, 5) * (depth - 1)
            + STOP * (depth + 1)
        )
        lists = (
            head(protocol, "ping")
            + struct.pack("!bh", 15, 9)
            + (b"\x0f" + struct.pack("!i", 1)) * (depth - 1)
            + b"\x08"
            + bytes(4)
            + STOP
        )
        version = b"\x80\x02" + ping[2:]
        bomb = head(protocol, "ping") + struct.pack("!bhbi", 15, 9, 0, INT32_MAX) + STOP
    else:
        huge_string = head(protocol, "echo") + b"\x18" + varint(INT32_MAX) + b"abc"
        huge_list = head(protocol, "add") + b"\x39\xf5" + varint(INT32_MAX) + b"\x02" * 12
        structs = head(protocol, "roundtrip") + b"\x1c" + b"\x5c" * (depth - 1) + STOP * (depth + 1)
        lists = head(protocol, "ping") + b"\x99" + b"\x19" * (depth - 1) + b"\x05" + STOP
        version = ping[:1] + bytes([(ping[1] & 0xE0) | 2]) + ping[2:]
        bomb = head(protocol, "ping") + b"\x99\xf0" + varint(1 << 24) + STOP
    whole = w(encode(protocol, "roundtrip", item=sample_item()))
    attacks = [
        ("string length 2**31-1", w(huge_string)),
        ("list of 2**31-1 elements", w(huge_list)),
        ("structs 10000 deep", w(structs)),
        ("lists 10000 deep", w(lists)),
        ("protocol version 2", w(version)),
        ("REPLY sent", w(head(protocol, "ping", REPLY) + STOP)),
        ("message type 7", w(head(protocol, "ping", 7) + STOP)),
        ("unknown method", w(head(protocol, "no_such_method") + STOP)),
        ("half a request", whole[: len(whole) // 2]),
        ("HTTP", b"GET / HTTP/1.1\r\nHost: soak\r\n\r\n"),
    ]
    if transport == "framed":
        attacks += [
            ("frame over max_frame_size", struct.pack("!i", max_frame_size + 1) + ping),
            ("zero frame length", struct.pack("!i", 0) + ping),
        ]
    if bombs:
        attacks.append(("zero-width skip bomb", w(bomb)))
    return attacks


def mutate(rng: random.Random, data: bytes) -> bytes:
    out = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        where = rng.randrange(max(len(out), 1))
        op = rng.choice(("flip", "truncate", "insert", "overwrite", "delete"))
        if op == "flip" and out:
            out[where] ^= 1 << rng.randrange(8)
        elif op == "truncate":
            del out[where:]
        elif op == "insert":
            out[where:where] = rng.randbytes(rng.randint(1, 8))
        elif op == "overwrite":
            chunk = rng.choice((b"\x00", b"\xff", b"\x7f\xff\xff\xff", b"\xff\xff\xff\xff"))
            out[where : where + len(chunk)] = chunk
        else:
            del out[where : where + rng.randint(1, 4)]
    return bytes(out)


def random_input(rng: random.Random) -> bytes:
    body = rng.randbytes(rng.randint(0, 300))
    kind = rng.randrange(4)
    if kind == 0:
        return body or b"\x00"
    if kind == 1:
        return b"\x80\x01" + body
    if kind == 2:
        return b"\x82" + body
    return struct.pack("!i", rng.randint(0, 400)) + rng.choice((b"\x80\x01", b"\x82")) + body


# -- reading replies -------------------------------------------------------------------------------


def message_length(data: bytes, protocol: str) -> int | None:
    """Length of the whole message at the start of ``data``; None if it is not whole yet.

    The header is read by hand, the body skipped by Apache Thrift's codec.

    Raises:
        ValueError: the bytes are not a reply message.
    """
    from thrift.protocol import TBinaryProtocol, TCompactProtocol
    from thrift.Thrift import TType
    from thrift.transport import TTransport

    class Exact(TTransport.TMemoryBuffer):  # type: ignore[misc]
        def read(self, sz: int) -> bytes:
            chunk: bytes = super().read(sz)
            if len(chunk) < sz:
                raise EOFError
            return chunk

    if protocol == "binary":
        if len(data) < 8:
            return None
        version, mtype, size = struct.unpack("!HHi", data[:8])
        if version != 0x8001 or size < 0 or mtype not in (REPLY, EXCEPTION):
            raise ValueError(f"not a binary reply: {data[:8]!r}")
        used = 8 + size + 4
    else:
        if len(data) < 2:
            return None
        if data[0] != 0x82 or data[1] & 0x1F != 1 or data[1] >> 5 not in (REPLY, EXCEPTION):
            raise ValueError(f"not a compact reply: {data[:2]!r}")
        pos, numbers = 2, []
        for _ in range(2):
            value = shift = 0
            while True:
                if pos >= len(data):
                    return None
                byte = data[pos]
                pos += 1
                value |= (byte & 0x7F) << shift
                shift += 7
                if byte < 0x80:
                    break
            numbers.append(value)
        used = pos + numbers[1]
    if len(data) < used:
        return None

    class Lenient:
        # A handler may echo a fuzzer's invalid UTF-8; only the framing is judged here.
        def readString(self) -> str:  # noqa: N802 - Apache Thrift's name
            raw: bytes = self.readBinary()  # type: ignore[attr-defined]
            return raw.decode("utf-8", "replace")

    class Binary(Lenient, TBinaryProtocol.TBinaryProtocol):  # type: ignore[misc]
        pass

    class Compact(Lenient, TCompactProtocol.TCompactProtocol):  # type: ignore[misc]
        pass

    trans = Exact(data, used)
    proto: Any = Binary(trans) if protocol == "binary" else Compact(trans)
    try:
        proto.skip(TType.STRUCT)
    except EOFError:
        return None
    return int(trans.cstringio_buf.tell())


def whole_messages(data: bytes, protocol: str, transport: str) -> tuple[int, bytes]:
    """How many whole reply messages ``data`` starts with, and the bytes after them."""
    count = pos = 0
    while pos < len(data):
        if transport == "framed":
            if len(data) - pos < 4:
                break
            (size,) = struct.unpack_from("!i", data, pos)
            if len(data) - pos - 4 < size:
                break
            if message_length(data[pos + 4 : pos + 4 + size], protocol) != size:
                raise ValueError(f"a {size}-byte frame is not one whole message")
            pos += 4 + size
        else:
            used = message_length(data[pos:], protocol)
            if used is None:
                break
            pos += used
        count += 1
    return count, data[pos:]


# -- the run ---------------------------------------------------------------------------------------


@dataclass
class Stats:
    connections: int = 0
    inputs: collections.Counter[str] = field(default_factory=collections.Counter)
    served: collections.Counter[str] = field(default_factory=collections.Counter)
    outcomes: collections.Counter[str] = field(default_factory=collections.Counter)
    errors: collections.Counter[str] = field(default_factory=collections.Counter)
    probe: list[float] = field(default_factory=list)
    debug: list[tuple[int, float]] = field(default_factory=list)
    cut_after: list[float] = field(default_factory=list)
    rss_kb: list[int] = field(default_factory=list)
    slowest: list[tuple[float, str, bytes]] = field(default_factory=list)
    stuck: list[tuple[str, bytes]] = field(default_factory=list)
    """Hostile inputs the server neither answered nor closed on in time (the first 10)."""
    """The hostile inputs the server took longest to be done with: (seconds, source, bytes)."""


def proc_figures(pid: int) -> tuple[int, int]:
    """(open fds, VmRSS kB) of process ``pid``."""
    fds = len(os.listdir(f"/proc/{pid}/fd"))
    with open(f"/proc/{pid}/status") as status:
        rss = next(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))
    return fds, rss


@contextlib.contextmanager
def connection(
    address: tuple[str, int], timeout: float = 5.0, rcvbuf: int = 0
) -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        if rcvbuf:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.settimeout(timeout)
        sock.connect(address)
        yield sock
    finally:
        sock.close()


def read_until_closed(
    sock: socket.socket, timeout: float, enough: Callable[[bytes], bool] | None = None
) -> tuple[bytes, bool]:
    """What the server sends until it closes (or ``enough`` of it); (data, whether it closed)."""
    deadline = time.monotonic() + timeout
    data = b""
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return data, False
        sock.settimeout(remaining)
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            return data, False
        except ConnectionResetError:
            return data, True
        if not chunk:
            return data, True
        data += chunk
        if enough is not None and enough(data):
            return data, False


def answered(wire: tuple[str, str] | None) -> Callable[[bytes], bool]:
    """Whether the bytes so far hold a whole reply, on ``wire``."""

    def check(data: bytes) -> bool:
        if wire is None:
            return False
        try:
            return whole_messages(data, *wire)[0] > 0
        except ValueError:
            return False

    return check


class Soak:
    def __init__(
        self,
        args: argparse.Namespace,
        address: tuple[str, int],
        debug_address: tuple[str, int],
        pid: int,
    ) -> None:
        self.args = args
        self.address = address
        self.debug_address = debug_address
        self.pid = pid
        self.stats = Stats()
        self.done = Event()
        self.deadline = time.monotonic() + args.duration
        self.rng = random.Random(args.seed)
        self.close_within = args.read_write_timeout + 4.0

    def running(self) -> bool:
        return not self.done.is_set() and time.monotonic() < self.deadline

    def error(self, kind: str) -> None:
        self.stats.errors[kind] += 1

    def hostile(self, source: str, payload: bytes, *, end_input: bool) -> None:
        """Send one hostile input on a new connection and judge what the server does."""
        stats = self.stats
        stats.inputs[source] += 1
        try:
            with connection(self.address) as sock:
                stats.connections += 1
                sent_at = time.monotonic()
                try:
                    sock.sendall(payload)
                    if end_input:
                        sock.shutdown(socket.SHUT_WR)
                except (BrokenPipeError, ConnectionResetError):
                    pass
                # Input not ended: a whole reply is enough (the server may keep the connection).
                enough = None if end_input else answered(server_wire(payload))
                data, closed = read_until_closed(sock, self.close_within, enough)
                took = time.monotonic() - sent_at
        except OSError as exc:
            self.error(f"{source}: {type(exc).__name__} connecting")
            return
        stats.slowest.append((took, source, payload))
        stats.slowest.sort(key=lambda entry: -entry[0])
        del stats.slowest[3:]
        wire = server_wire(payload)
        if not closed:
            if not end_input and wire is not None and data and whole_messages(data, *wire)[0]:
                # Answered, and the connection is kept for the next request: as it should be.
                stats.outcomes["answered, connection kept open"] += 1
                return
            self.error(f"{source}: still open {self.close_within:.0f}s after the input")
            if len(stats.stuck) < 10:
                stats.stuck.append((source, payload))
            return
        if wire is None:
            stats.outcomes["closed, nothing sent" if not data else "replied to non-Thrift"] += 1
            if data:
                self.error(f"{source}: replied to input that is not Thrift")
            return
        try:
            count, leftover = whole_messages(data, *wire)
        except ValueError as exc:
            self.error(f"{source}: undecodable reply ({exc})")
            return
        if leftover:
            self.error(f"{source}: half-written reply")
        stats.outcomes[f"closed after {min(count, 3)}{'+' if count > 3 else ''} replies"] += 1

    # -- workers -------------------------------------------------------------------------------

    def well_behaved(self, protocol: str, transport: str) -> None:
        from thriftpy2.protocol import TCompactProtocolFactory, TCyBinaryProtocolFactory
        from thriftpy2.rpc import make_client
        from thriftpy2.thrift import TApplicationException
        from thriftpy2.transport import TCyBufferedTransportFactory, TCyFramedTransportFactory

        rng = random.Random(self.rng.random())
        name = f"well-behaved {protocol}/{transport}"
        item = sample_item()
        while self.running():
            try:
                client = make_client(
                    testsvc.TestService,
                    self.address[0],
                    self.address[1],
                    proto_factory=TCyBinaryProtocolFactory()
                    if protocol == "binary"
                    else TCompactProtocolFactory(),
                    trans_factory=TCyBufferedTransportFactory()
                    if transport == "buffered"
                    else TCyFramedTransportFactory(),
                    timeout=10_000,
                )
            except OSError as exc:
                self.error(f"{name}: {type(exc).__name__} connecting")
                self.done.wait(0.1)
                continue
            self.stats.connections += 1
            try:
                for _ in range(500):
                    if not self.running():
                        break
                    self.well_behaved_call(name, client, rng, item)
            except TApplicationException as exc:
                self.error(f"{name}: TApplicationException type {exc.type}: {exc.message}")
            except Exception as exc:
                self.error(f"{name}: {type(exc).__name__}: {str(exc)[:80]}")
            finally:
                client.close()

    def one_call(self, client: Any, rng: random.Random, item: Any) -> None:
        from thriftpy2.thrift import TApplicationException

        pick = rng.random()
        if pick < 0.3:
            message = "x" * rng.randint(0, 200)
            if client.echo(message) != message:
                raise AssertionError("echo answered something else")
        elif pick < 0.5:
            a, b = rng.randint(-1000, 1000), rng.randint(-1000, 1000)
            if client.add(a, b) != a + b:
                raise AssertionError("add answered something else")
        elif pick < 0.65:
            if client.roundtrip(item) != item:
                raise AssertionError("roundtrip answered something else")
        elif pick < 0.8:
            data = rng.randbytes(rng.randint(0, 4096))
            if client.echo_binary(data) != data:
                raise AssertionError("echo_binary answered something else")
        elif pick < 0.9:
            client.ping()
        elif pick < 0.95:
            try:
                client.raise_declared("declared", 7)
            except testsvc.Declared as exc:
                if exc.code != 7:
                    raise AssertionError("the declared exception lost its fields") from None
            else:
                raise AssertionError("raise_declared did not raise")
        else:
            try:
                client.wrong_return()
            except TApplicationException as exc:
                if exc.type != TApplicationException.INTERNAL_ERROR:
                    raise
            else:
                raise AssertionError("wrong_return did not fail")

    def well_behaved_call(self, name: str, client: Any, rng: random.Random, item: Any) -> None:
        from thriftpy2.thrift import TApplicationException

        try:
            self.one_call(client, rng, item)
        except TApplicationException as exc:
            if exc.type != LOADSHEDDING:
                raise
            self.stats.outcomes["well-behaved call shed (LOADSHEDDING)"] += 1
        else:
            self.stats.served[name] += 1

    def fuzz(self, source: str, make: Callable[[random.Random], bytes]) -> None:
        rng = random.Random(self.rng.random())
        for _ in range(self.args.max_inputs):
            if not self.running():
                return
            self.hostile(source, make(rng), end_input=True)

    def run_catalog(self) -> None:
        attacks = [
            (f"{p}/{t} {name}", payload)
            for p, t in WIRES
            for name, payload in catalog(p, t, self.args.max_frame_size, self.args.skip_bombs)
        ]
        for i in range(self.args.max_inputs):
            if not self.running():
                return
            _name, payload = attacks[i % len(attacks)]
            self.hostile("catalog", payload, end_input=i % 2 == 0)

    def flood(self) -> None:
        half = encode("binary", "echo", message="x" * 64)[:20]
        pool = Pool(50)

        def one(i: int) -> None:
            try:
                with connection(self.address) as sock:
                    self.stats.connections += 1
                    if i % 4 == 1:
                        sock.sendall(half)
                    elif i % 4 == 2:
                        sock.sendall(b"GET / HTTP/1.1\r\n\r\n")
                    elif i % 4 == 3:
                        linger = struct.pack("ii", 1, 0)
                        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
            except OSError as exc:
                self.error(f"flood: {type(exc).__name__}")
            self.stats.inputs["flood"] += 1

        i = 0
        while self.running() and i < self.args.max_flood:
            for _ in range(200):
                pool.spawn(one, i)
                i += 1
            pool.join(timeout=30)
            self.done.wait(0.2)
        pool.kill()

    def trickle(self) -> None:
        request = encode("binary", "echo", message="x" * 400)
        rw = self.args.read_write_timeout
        while self.running() and self.stats.inputs["trickle"] < self.args.max_inputs:
            self.stats.inputs["trickle"] += 1
            try:
                with connection(self.address) as sock:
                    self.stats.connections += 1
                    start = time.monotonic()
                    cut = None
                    for i in range(len(request)):
                        try:
                            sock.sendall(request[i : i + 1])
                        except (BrokenPipeError, ConnectionResetError):
                            cut = time.monotonic() - start
                            break
                        _data, closed = read_until_closed(sock, 0.05)
                        if closed:
                            cut = time.monotonic() - start
                            break
                        if time.monotonic() - start > rw + 5:
                            break
            except OSError as exc:
                self.error(f"trickle: {type(exc).__name__}")
                continue
            if cut is None:
                self.error("trickle: not cut off")
            else:
                self.stats.cut_after.append(cut)
                self.stats.outcomes["trickle cut off"] += 1

    def non_reader(self) -> None:
        request = encode("binary", "echo_binary", data=bytes(256 * 1024))
        rw = self.args.read_write_timeout
        while self.running() and self.stats.inputs["non-reader"] < self.args.max_inputs:
            self.stats.inputs["non-reader"] += 1
            try:
                with connection(self.address, timeout=2.0, rcvbuf=64 * 1024) as sock:
                    self.stats.connections += 1
                    for _ in range(200):
                        try:
                            sock.sendall(request)
                        except (TimeoutError, BrokenPipeError, ConnectionResetError):
                            break
                    # Long enough for the server's write to time out; then drain to its close.
                    self.done.wait(rw + 1.0)
                    _data, closed = read_until_closed(sock, 10.0)
            except OSError as exc:
                self.error(f"non-reader: {type(exc).__name__}")
                continue
            if closed:
                self.stats.outcomes["non-reader cut off"] += 1
            else:
                self.error("non-reader: not cut off")

    def burst(self) -> None:
        size = self.args.burst
        while self.running():
            data = b"".join(wrap("framed", encode("binary", "ping", seqid=i)) for i in range(size))
            self.stats.inputs["burst"] += 1
            try:
                with connection(self.address, timeout=30) as sock:
                    self.stats.connections += 1
                    sock.sendall(data)
                    sock.shutdown(socket.SHUT_WR)
                    reply, closed = read_until_closed(sock, 30)
            except OSError as exc:
                self.error(f"burst: {type(exc).__name__}")
                continue
            ok = shed = pos = 0
            while len(reply) - pos >= 8:
                (n,) = struct.unpack_from("!i", reply, pos)
                if reply[pos + 7] == REPLY:
                    ok += 1
                else:
                    shed += 1
                pos += 4 + n
            if ok + shed != size or not closed:
                self.error(f"burst: {ok + shed} of {size} pipelined pings answered")
            self.stats.served["burst"] += ok
            self.stats.outcomes["burst ping shed (LOADSHEDDING)"] += shed
            self.done.wait(1.0)

    def sample_memory(self) -> None:
        while self.running():
            with contextlib.suppress(OSError, StopIteration):
                self.stats.rss_kb.append(proc_figures(self.pid)[1])
            self.done.wait(0.5)

    def run(self) -> None:
        workers = [gevent.spawn(self.well_behaved, p, t) for p, t in WIRES]
        workers += [
            gevent.spawn(self.sample_memory),
            gevent.spawn(self.fuzz, "random", random_input),
            gevent.spawn(self.fuzz, "random", random_input),
            gevent.spawn(self.fuzz, "mutated", lambda rng: mutate(rng, rng.choice(self.valid))),
            gevent.spawn(self.fuzz, "mutated", lambda rng: mutate(rng, rng.choice(self.valid))),
            gevent.spawn(self.run_catalog),
            gevent.spawn(self.flood),
            gevent.spawn(self.trickle),
            gevent.spawn(self.trickle),
            gevent.spawn(self.non_reader),
            gevent.spawn(self.burst),
        ]
        try:
            gevent.joinall(workers, timeout=self.args.duration + 5)
        finally:
            self.done.set()
            gevent.joinall(workers, timeout=self.close_within + 15)
            for worker in workers:
                if not worker.dead:
                    self.error("a worker did not finish in time")
                    worker.kill(block=False)
                elif worker.exception is not None:
                    self.error(f"worker crashed: {type(worker.exception).__name__}")

    def take_probe(self, figures: dict[str, Any]) -> None:
        """The probe process's figures."""
        self.stats.probe = list(figures["pings"])
        self.stats.debug = [(int(status), float(t)) for status, t in figures["debug"]]
        self.stats.served["probe"] += len(figures["pings"]) - int(figures["shed"])
        if figures["shed"]:
            self.stats.outcomes["probe ping shed (LOADSHEDDING)"] += int(figures["shed"])
        self.stats.connections += 1
        for kind, count in figures["failures"].items():
            self.stats.errors[kind] += int(count)

    @property
    def valid(self) -> list[bytes]:
        if not hasattr(self, "_valid"):
            self._valid = [c for p, t in WIRES for c in valid_calls(p, t)]
        return self._valid


# -- the probe process ----------------------------------------------------------------------------


def probe_main(address: tuple[str, int], debug_address: tuple[str, int], duration: float) -> int:
    """Ping every 100 ms and GET /health every 500 ms for ``duration``; figures as JSON.

    It runs in its own process so that its latencies are the server's, not those of this
    process's busy hub.
    """
    from thriftpy2.rpc import make_client
    from thriftpy2.thrift import TApplicationException

    deadline = time.monotonic() + duration
    done = Event()
    pings: list[float] = []
    debug: list[tuple[int, float]] = []
    shed = 0
    failures: collections.Counter[str] = collections.Counter()

    def ping_loop() -> None:
        nonlocal shed
        while time.monotonic() < deadline:
            try:
                client = make_client(testsvc.TestService, address[0], address[1], timeout=30_000)
            except OSError as exc:
                failures[f"probe: {type(exc).__name__} connecting"] += 1
                done.wait(0.1)
                continue
            try:
                while time.monotonic() < deadline:
                    sent_at = time.monotonic()
                    try:
                        client.ping()
                    except TApplicationException as exc:
                        if exc.type != LOADSHEDDING:
                            raise
                        shed += 1
                    pings.append(time.monotonic() - sent_at)
                    done.wait(0.1)
            except Exception as exc:
                failures[f"probe: {type(exc).__name__}: {str(exc)[:80]}"] += 1
            finally:
                client.close()

    def debug_loop() -> None:
        host, port = debug_address
        while time.monotonic() < deadline:
            sent_at = time.monotonic()
            try:
                with urllib.request.urlopen(f"http://{host}:{port}/health", timeout=10) as reply:
                    reply.read()
                    status = int(reply.status)
            except urllib.error.HTTPError as exc:
                with exc:
                    status = exc.code
            except OSError as exc:
                failures[f"debug: {type(exc).__name__}"] += 1
                status = 0
            debug.append((status, time.monotonic() - sent_at))
            done.wait(0.5)

    gevent.joinall([gevent.spawn(ping_loop), gevent.spawn(debug_loop)], timeout=duration + 40)
    print(json.dumps({"pings": pings, "shed": shed, "debug": debug, "failures": failures}))
    return 0


def parse_address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


# -- the server process ----------------------------------------------------------------------------


def start_server(
    args: argparse.Namespace, log_path: Path
) -> tuple[subprocess.Popen[bytes], Any, tuple[str, int], tuple[str, int]]:
    """Launch the server; its process, its log file, and its service and debug addresses."""
    command = [
        sys.executable,
        "-m",
        "kitegreen",
        TARGET,
        "--host",
        LOOPBACK,
        "--port",
        "0",
        "--debug-port",
        "0",
        "--read-write-timeout",
        str(args.read_write_timeout),
        "--max-frame-size",
        str(args.max_frame_size),
        "--limit-qps",
        str(args.limit_qps),
        "--limit-connections",
        str(args.limit_connections),
        "--log-level",
        "info",
        "--log-format",
        "json",
    ]
    log = log_path.open("wb")
    process = subprocess.Popen(
        command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=HERE.parent
    )
    address = debug = None
    deadline = time.monotonic() + START_TIMEOUT
    while (address is None or debug is None) and time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(
                f"the server exited with {process.returncode}: {log_path.read_text()[-2000:]}"
            )
        for line in log_path.read_text().splitlines():
            with contextlib.suppress(ValueError):
                event = json.loads(line)
                host, _, port = str(event.get("address", "")).rpartition(":")
                if event.get("event") == "listening":
                    address = (host, int(port))
                elif event.get("event") == "debug server listening":
                    debug = (host, int(port))
        gevent.sleep(0.05)
    if address is None or debug is None:
        raise SystemExit(f"the server did not report its addresses within {START_TIMEOUT}s")
    return process, log, address, debug


def stop_server(process: subprocess.Popen[bytes]) -> int | None:
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(STOP_TIMEOUT)
    return process.returncode


def warm_up(address: tuple[str, int]) -> None:
    from thriftpy2.rpc import make_client

    for protocol, transport in WIRES:
        for _ in range(3):
            with connection(address) as sock:
                sock.sendall(wrap(transport, encode(protocol, "echo", message="warm")))
                sock.shutdown(socket.SHUT_WR)
                read_until_closed(sock, 5.0)
    client = make_client(testsvc.TestService, address[0], address[1], timeout=5000)
    try:
        client.ping()
    finally:
        client.close()


def settle(pid: int, fds: int, timeout: float) -> tuple[int, int]:
    """Poll the server's figures until its fds are back to ``fds`` or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    figures = proc_figures(pid)
    while figures[0] > fds and time.monotonic() < deadline:
        gevent.sleep(0.2)
        figures = proc_figures(pid)
    return figures


def server_log_counts(log_path: Path) -> collections.Counter[str]:
    counts: collections.Counter[str] = collections.Counter()
    for line in log_path.read_text(errors="replace").splitlines():
        try:
            event = json.loads(line)
        except ValueError:
            counts["non-JSON lines"] += 1
            continue
        if event.get("level") in ("warning", "error", "critical"):
            counts[f"{event['level']}: {event.get('event')}"] += 1
    return counts


def summary(
    soak: Soak,
    args: argparse.Namespace,
    before: tuple[int, int],
    after: tuple[int, int],
    log_counts: collections.Counter[str],
    elapsed: float,
) -> bool:
    stats = soak.stats
    rw = args.read_write_timeout
    probe = sorted(stats.probe)
    worst = probe[-1] if probe else float("inf")
    p99 = probe[int(len(probe) * 0.99) - 1] if len(probe) >= 100 else worst
    debug_ok = sum(1 for status, _ in stats.debug if status == 200)
    debug_worst = max((t for _, t in stats.debug), default=float("inf"))
    responsive = (
        bool(probe)
        and worst <= rw + 1.0
        and debug_ok == len(stats.debug) > 0
        and debug_worst <= rw + 1.0
    )
    fds_back = after[0] <= before[0]
    peak = max(stats.rss_kb, default=after[1])
    out = [
        f"kitegreen soak: {elapsed:.1f}s against pid {soak.pid} on "
        f"{soak.address[0]}:{soak.address[1]} (debug :{soak.debug_address[1]}), seed {args.seed}",
        f"  server flags: read_write_timeout {rw}s, max_frame_size {args.max_frame_size}, "
        f"limit_qps {args.limit_qps}, limit_connections {args.limit_connections}",
        f"connections opened      {stats.connections}",
        f"inputs tried            {sum(stats.inputs.values())}  "
        + ", ".join(f"{k} {v}" for k, v in sorted(stats.inputs.items())),
        f"requests served OK      {sum(stats.served.values())}  "
        + ", ".join(f"{k} {v}" for k, v in sorted(stats.served.items())),
        "outcomes of hostile and overload inputs:",
        *[f"  {v:>8}  {k}" for k, v in stats.outcomes.most_common()],
        f"errors seen by kind     {sum(stats.errors.values())}",
        *[f"  {v:>8}  {k}" for k, v in stats.errors.most_common()],
        "server log warnings and errors:",
        *([f"  {v:>8}  {k}" for k, v in log_counts.most_common()] or ["         none"]),
        f"server fds              before {before[0]}, after {after[0]}"
        f"{'' if fds_back else '  (NOT back)'}",
        f"server RSS              before {before[1] / 1024:.1f} MiB, "
        f"after {after[1] / 1024:.1f} MiB, peak sampled {peak / 1024:.1f} MiB",
        "slowest hostile inputs (seconds to the server's close, source, first bytes):",
        *[
            f"  {t:8.2f}  {source}: {payload[:48].hex()}{'...' if len(payload) > 48 else ''}"
            f" ({len(payload)} bytes)"
            for t, source, payload in stats.slowest
        ],
        "hostile inputs neither answered nor closed on in time:",
        *(
            [
                f"  {source}: {payload[:64].hex()}{'...' if len(payload) > 64 else ''}"
                f" ({len(payload)} bytes)"
                for source, payload in stats.stuck
            ]
            or ["  none"]
        ),
        "trickles cut off after  "
        + (
            f"median {statistics.median(stats.cut_after):.2f}s, max {max(stats.cut_after):.2f}s"
            if stats.cut_after
            else "none"
        ),
        f"responsive              {'yes' if responsive else 'NO'}: probe pings {len(probe)}, "
        f"max {worst * 1000:.1f} ms, p99 {p99 * 1000:.1f} ms; debug /health {debug_ok}/"
        f"{len(stats.debug)} OK, max {debug_worst * 1000:.1f} ms",
    ]
    print("\n".join(out))
    return responsive and fds_back and not stats.errors


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of load (60)")
    parser.add_argument("--seed", type=int, default=1, help="random seed (1)")
    parser.add_argument("--read-write-timeout", type=float, default=1.0)
    parser.add_argument("--max-frame-size", type=int, default=4 * 1024 * 1024)
    parser.add_argument("--limit-qps", type=int, default=5000)
    parser.add_argument("--limit-connections", type=int, default=2000)
    parser.add_argument(
        "--max-inputs", type=int, default=200_000, help="cap per fuzzing worker (200000)"
    )
    parser.add_argument(
        "--max-flood", type=int, default=100_000, help="cap on flood connections (100000)"
    )
    parser.add_argument("--burst", type=int, default=8000, help="pings per pipelined burst")
    parser.add_argument("--server-log", metavar="FILE", help="keep the server's log here")
    parser.add_argument(
        "--skip-bombs",
        action="store_true",
        help="also send containers of zero-width elements (stalls the server)",
    )
    parser.add_argument(
        "--probe-only", nargs=2, metavar=("ADDRESS", "DEBUG_ADDRESS"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    if args.probe_only:
        return probe_main(*map(parse_address, args.probe_only), args.duration)
    with tempfile.TemporaryDirectory(prefix="kitegreen-soak-") as tmp:
        log_path = Path(tmp) / "server.log"
        process, log, address, debug = start_server(args, log_path)
        try:
            warm_up(address)
            before = proc_figures(process.pid)
            soak = Soak(args, address, debug, process.pid)
            started = time.monotonic()
            probe = subprocess.Popen(
                [
                    sys.executable,
                    str(HERE / "soak.py"),
                    "--duration",
                    str(args.duration),
                    "--probe-only",
                    f"{address[0]}:{address[1]}",
                    f"{debug[0]}:{debug[1]}",
                ],
                stdout=subprocess.PIPE,
            )
            try:
                soak.run()
                elapsed = time.monotonic() - started
                out, _ = probe.communicate(timeout=60)
            finally:
                if probe.poll() is None:
                    probe.kill()
                    probe.wait(STOP_TIMEOUT)
            soak.take_probe(json.loads(out))
            after = settle(process.pid, before[0], 15.0)
            alive = process.poll() is None
            if not alive:
                soak.error(f"the server exited with {process.returncode}")
        finally:
            code = stop_server(process)
            log.close()
        if alive and code not in (0, -signal.SIGTERM):
            soak.error(f"the server stopped with exit status {code}")
        ok = summary(soak, args, before, after, server_log_counts(log_path), elapsed)
        if args.server_log:
            shutil.copyfile(log_path, args.server_log)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
