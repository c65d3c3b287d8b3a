"""The server in-process, against real servers on loopback, with thriftpy2's and Apache Thrift's
clients and, for what no well-behaved client does (stall, pipeline, send garbage), a bare socket.
"""

from __future__ import annotations

import contextlib
import gc
import os
import random
import socket
import stat
import struct
import time
import weakref
from collections.abc import Iterator
from typing import Any

import gevent
import pytest
from clients import WIRES, apache_client, thriftpy2_client
from conftest import can_connect, loopback_config, testsvc_thrift, wait_until
from thrift.protocol import TBinaryProtocol as ApacheBinary
from thrift.protocol import TCompactProtocol as ApacheCompact
from thrift.Thrift import TApplicationException as ApacheAppError
from thrift.Thrift import TMessageType as ApacheMessageType
from thrift.Thrift import TType as ApacheType
from thrift.transport import TSocket as ApacheSocket
from thrift.transport import TTransport as ApacheTransport
from thrift.transport.TTransport import TTransportException as ApacheTransportError
from thriftpy2.protocol.binary import TBinaryProtocol  # pure Python: reads from any object
from thriftpy2.protocol.compact import TCompactProtocol
from thriftpy2.rpc import make_client
from thriftpy2.thrift import TApplicationException, TMessageType
from thriftpy2.transport import TMemoryBuffer, TTransportException

import kitegreen
from kitegreen.observability.hubwatch import HubWatch

TestService = testsvc_thrift.TestService

# -- helpers ---------------------------------------------------------------------------------


def encode_call(
    method: str,
    *,
    protocol: str = "binary",
    framed: bool = False,
    seqid: int = 1,
    mtype: int = TMessageType.CALL,
    **kwargs: Any,
) -> bytes:
    """The bytes a client sends to call ``method`` of TestService with ``kwargs``."""
    buf = TMemoryBuffer()
    proto = TBinaryProtocol(buf) if protocol == "binary" else TCompactProtocol(buf)
    proto.write_message_begin(method, mtype, seqid)
    proto.write_struct(getattr(TestService, f"{method}_args")(**kwargs))
    proto.write_message_end()
    data = buf.getvalue()
    return struct.pack("!i", len(data)) + data if framed else data


class RawClient:
    """A bare socket speaking Thrift by hand."""

    def __init__(self, address: tuple[str, int], source: str = "") -> None:
        self.sock = socket.create_connection(
            address, timeout=5.0, source_address=(source, 0) if source else None
        )

    def __enter__(self) -> RawClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.sock.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def read(self, n: int) -> bytes:
        """Exactly ``n`` bytes (the transport interface thriftpy2's pure protocols read from)."""
        data = b""
        while len(data) < n:
            chunk = self.sock.recv(n - len(data))
            if not chunk:
                raise EOFError(f"connection closed after {len(data)} of {n} bytes")
            data += chunk
        return data

    def read_message(self, protocol: str = "binary", framed: bool = False) -> tuple[Any, ...]:
        """Read one reply: ``(name, message type, seqid, result or TApplicationException)``."""
        if framed:
            (size,) = struct.unpack("!i", self.read(4))
            source: Any = TMemoryBuffer(self.read(size))
        else:
            source = self
        proto = TBinaryProtocol(source) if protocol == "binary" else TCompactProtocol(source)
        name, mtype, seqid = proto.read_message_begin()
        payload: Any = (
            TApplicationException()
            if mtype == TMessageType.EXCEPTION
            else getattr(TestService, f"{name}_result")()
        )
        proto.read_struct(payload)
        proto.read_message_end()
        return name, mtype, seqid, payload

    def call(
        self, method: str, protocol: str = "binary", framed: bool = False, **kwargs: Any
    ) -> Any:
        """Call ``method`` and return its result's ``success`` value (None for void)."""
        self.send(encode_call(method, protocol=protocol, framed=framed, **kwargs))
        _, mtype, _, payload = self.read_message(protocol, framed)
        assert mtype == TMessageType.REPLY, payload
        return getattr(payload, "success", None)

    def closed_by_peer(self, timeout: float = 5.0) -> bool:
        """Wait up to ``timeout`` for the server to close; discard what it still sends."""
        deadline = time.monotonic() + timeout
        try:
            while (remaining := deadline - time.monotonic()) > 0:
                self.sock.settimeout(remaining)
                if not self.sock.recv(65536):
                    return True
        except (ConnectionResetError, BrokenPipeError):
            return True
        except TimeoutError:
            return False
        return False


def has_ipv6_loopback() -> bool:
    """Whether this machine can bind ::1 (containers without IPv6 cannot)."""
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as sock:
            sock.bind(("::1", 0))
    except OSError:
        return False
    return True


@contextlib.contextmanager
def apache_protocol(
    address: Any, protocol: str = "binary", transport: str = "buffered"
) -> Iterator[Any]:
    """An open Apache Thrift protocol on one connection, to write messages by hand."""
    sock = ApacheSocket.TSocket(address[0], address[1])
    sock.setTimeout(5000)
    trans = (
        ApacheTransport.TBufferedTransport
        if transport == "buffered"
        else ApacheTransport.TFramedTransport
    )(sock)
    proto = (
        ApacheBinary.TBinaryProtocol if protocol == "binary" else ApacheCompact.TCompactProtocol
    )(trans)
    trans.open()
    try:
        yield proto
    finally:
        trans.close()


def both_clients(
    address: Any, protocol: str = "binary", transport: str = "buffered"
) -> Iterator[tuple[Any, Any]]:
    """Yield a thriftpy2 client, then an Apache Thrift one, each with its module of types."""
    from testsvc import ttypes as apache_types  # tests/gen_apache

    with thriftpy2_client(TestService, address, protocol, transport) as client:
        yield client, testsvc_thrift
    with apache_client(address, protocol, transport) as client:
        yield client, apache_types


APP_ERRORS = (TApplicationException, ApacheAppError)
CLIENT_DISCONNECTED = (TTransportException, ApacheTransportError, OSError, EOFError)


def slow_call(address: Any, seconds: float, message: str) -> Any:
    """Call ``slow`` on a fresh connection; return the reply, or the exception the client raised."""
    try:
        with thriftpy2_client(TestService, address, timeout=10.0) as client:
            return client.slow(seconds, message)
    except Exception as exc:
        return exc


def open_connections(server: kitegreen.RpcServer) -> int:
    return int(server.overload()["conn_now"])


# -- wire formats ----------------------------------------------------------------------------


@pytest.mark.parametrize(("protocol", "transport"), WIRES)
class TestWireFormats:
    def test_calls_with_arguments(self, server, protocol, transport):
        """Every protocol/transport combination serves calls from both clients."""
        for client, _ in both_clients(server.address, protocol, transport):
            client.ping()
            assert client.echo("héllo, wörld") == "héllo, wörld"
            assert client.add(2, -3) == -1
            assert client.add(2**31 - 1, 0) == 2**31 - 1

    def test_struct_roundtrip(self, server, protocol, transport):
        """A nested struct with a list and a map comes back equal."""
        for client, types in both_clients(server.address, protocol, transport):
            item_cls = types.Item
            item = item_cls(
                id=7,
                name="parent",
                tags=["a", "b", "ünïcode"],
                counts={"x": 1, "big": 2**62},
                child=item_cls(id=8, name="child", tags=[], counts={}),
            )
            assert client.roundtrip(item) == item

    def test_binary_data(self, server, protocol, transport):
        """Binary data, every byte value and the empty value, comes back byte for byte."""
        payload = bytes(range(256)) * 300
        for client, _ in both_clients(server.address, protocol, transport):
            assert client.echo_binary(payload) == payload
            assert client.echo_binary(b"") == b""

    def test_many_calls_on_one_connection(self, server, protocol, transport):
        """A kept-alive connection serves request after request."""
        for client, _ in both_clients(server.address, protocol, transport):
            for i in range(50):
                assert client.add(i, i) == 2 * i


# -- real_ip -----------------------------------------------------------------------------------


class TestRealIp:
    def test_ipv4(self, server):
        """Over IPv4 the handler sees the caller's address."""
        for client, _ in both_clients(server.address):
            assert client.client_ip() == "127.0.0.1"

    def test_ipv6(self, make_server):
        """Over IPv6 the handler sees the caller's IPv6 address."""
        if not has_ipv6_loopback():
            pytest.skip("this machine has no IPv6 loopback")
        server = make_server(host="::1")
        host, port = server.address
        assert host == "::1"
        client = make_client(TestService, "::1", port, timeout=5000, socket_family=socket.AF_INET6)
        try:
            assert client.client_ip() == "::1"
        finally:
            client.close()
        with apache_client(("::1", port)) as apache:
            assert apache.client_ip() == "::1"

    def test_none_on_unix_socket(self, make_server, tmp_path):
        """On a Unix socket there is no IP: real_ip() is None."""
        server = make_server(unix_socket=str(tmp_path / "kg.sock"))
        for client, _ in both_clients(server.address):
            assert client.client_ip() == ""

    def test_off_when_get_real_ip_is_false(self, make_server):
        """With get_real_ip off, handlers see None."""
        server = make_server(get_real_ip=False)
        for client, _ in both_clients(server.address):
            assert client.client_ip() == ""

    def test_each_connection_sees_its_own_peer(self, server):
        """Concurrent connections from different source addresses each see their own."""
        with (
            RawClient(server.address, source="127.0.0.2") as a,
            RawClient(server.address, source="127.0.0.3") as b,
        ):
            assert a.call("client_ip") == "127.0.0.2"
            assert b.call("client_ip") == "127.0.0.3"
            assert a.call("client_ip") == "127.0.0.2"


# -- listening ---------------------------------------------------------------------------------


class TestUnixSocket:
    def test_serves_on_a_path(self, make_server, tmp_path):
        """A server on a Unix socket path serves both clients; address is the path."""
        path = str(tmp_path / "kg.sock")
        server = make_server(unix_socket=path)
        assert server.address == path
        assert server.describe_address() == f"unix:{path}"
        for client, _ in both_clients(path):
            assert client.echo("over unix") == "over unix"

    def test_socket_mode_lets_clients_connect(self, make_server, tmp_path):
        """The socket file is a socket with mode 0o666."""
        path = tmp_path / "kg.sock"
        make_server(unix_socket=str(path))
        st = os.stat(path)
        assert stat.S_ISSOCK(st.st_mode)
        assert stat.S_IMODE(st.st_mode) == 0o666

    def test_socket_file_is_removed_on_stop(self, make_server, tmp_path):
        """stop() removes the socket file it created."""
        path = tmp_path / "kg.sock"
        server = make_server(unix_socket=str(path))
        assert path.exists()
        assert server.stop() is True
        assert not path.exists()

    def test_stale_socket_file_is_replaced(self, make_server, tmp_path):
        """A socket file left by a dead process is replaced and the server serves on it."""
        path = tmp_path / "kg.sock"
        dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        dead.bind(str(path))
        dead.close()  # no unlink: what a crashed process leaves behind
        assert stat.S_ISSOCK(os.lstat(path).st_mode)
        server = make_server(unix_socket=str(path))
        with thriftpy2_client(TestService, server.address) as client:
            assert client.echo("replaced") == "replaced"

    def test_regular_file_is_never_deleted(self, handler, tmp_path):
        """A regular file at the path is left alone and start() says why it cannot listen."""
        path = tmp_path / "important.txt"
        path.write_text("do not delete me")
        server = kitegreen.RpcServer(TestService, handler, loopback_config(unix_socket=str(path)))
        with pytest.raises(kitegreen.ListenError, match="not a socket") as info:
            server.start()
        assert str(path) in str(info.value)
        assert path.read_text() == "do not delete me"
        assert server.stop() is True

    def test_path_where_another_server_listens(self, make_server, handler, tmp_path):
        """A path another live server listens on is refused; that server keeps serving."""
        path = str(tmp_path / "kg.sock")
        first = make_server(unix_socket=path)
        second = kitegreen.RpcServer(TestService, handler, loopback_config(unix_socket=path))
        with pytest.raises(kitegreen.ListenError, match="another process is listening") as info:
            second.start()
        assert path in str(info.value)
        with thriftpy2_client(TestService, first.address) as client:
            assert client.echo("still mine") == "still mine"


class TestTcpListen:
    def test_address_is_read_back(self, server):
        """With port 0 the bound port is read back from address."""
        host, port = server.address
        assert host == "127.0.0.1"
        assert port > 0
        assert server.describe_address() == f"127.0.0.1:{port}"

    def test_a_start_that_fails_undoes_itself_and_can_be_retried(self, handler, monkeypatch):
        """When a part of the server fails to start (here the hub watchdog's thread, as when
        the process is out of threads), start() raises, nothing is left accepting on the port,
        and a later start() serves."""
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        server = kitegreen.RpcServer(
            TestService, handler, loopback_config(port=port, hub_block_threshold=1.0)
        )

        def no_thread(self: Any) -> None:
            raise RuntimeError("can't start new thread")

        monkeypatch.setattr(HubWatch, "start", no_thread)
        with pytest.raises(RuntimeError, match="new thread"):
            server.start()
        assert not server.started
        assert not can_connect(("127.0.0.1", port))
        monkeypatch.undo()
        server.start()
        try:
            with thriftpy2_client(TestService, server.address) as client:
                assert client.echo("retried") == "retried"
        finally:
            assert server.stop(timeout=2.0)

    def test_address_in_use(self, server, handler):
        """A port another server holds raises ListenError naming the address."""
        port = server.address[1]
        second = kitegreen.RpcServer(TestService, handler, loopback_config(port=port))
        with pytest.raises(kitegreen.ListenError, match="in use") as info:
            second.start()
        assert f"127.0.0.1:{port}" in str(info.value)
        assert isinstance(info.value, OSError)
        with thriftpy2_client(TestService, server.address) as client:
            assert client.echo("first") == "first"

    def test_unresolvable_host(self, handler):
        """A host that does not resolve raises ListenError naming it."""
        server = kitegreen.RpcServer(
            TestService, handler, loopback_config(host="no-such-host.invalid")
        )
        with pytest.raises(kitegreen.ListenError, match=r"no-such-host\.invalid"):
            server.start()

    def test_address_before_start_is_an_error(self, handler):
        """Asking for the address of a server that has not started is a clear error."""
        server = kitegreen.RpcServer(TestService, handler, loopback_config())
        with pytest.raises(RuntimeError, match="start"):
            _ = server.address


# -- errors ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("protocol", "transport"), WIRES)
class TestUnknownMethod:
    def test_unknown_method_answers_and_keeps_serving(self, server, protocol, transport):
        """A method not in the IDL gets UNKNOWN_METHOD; the connection then serves a real call."""
        with apache_protocol(server.address, protocol, transport) as proto:
            proto.writeMessageBegin("no_such_method", ApacheMessageType.CALL, 41)
            proto.writeStructBegin("no_such_method_args")
            proto.writeFieldBegin("x", ApacheType.I32, 1)  # an argument the server must skip
            proto.writeI32(5)
            proto.writeFieldEnd()
            proto.writeFieldStop()
            proto.writeStructEnd()
            proto.writeMessageEnd()
            proto.trans.flush()
            name, mtype, seqid = proto.readMessageBegin()
            error = ApacheAppError()
            error.read(proto)
            proto.readMessageEnd()
            assert (name, mtype, seqid) == ("no_such_method", ApacheMessageType.EXCEPTION, 41)
            assert error.type == ApacheAppError.UNKNOWN_METHOD
            assert "no_such_method" in error.message

            from testsvc import TestService as ApacheService  # tests/gen_apache

            assert ApacheService.Client(proto).echo("after") == "after"


class TestNotACall:
    def test_message_that_is_not_a_call(self, server):
        """A message that is not a call gets INVALID_MESSAGE_TYPE; the connection serves on."""
        with RawClient(server.address) as raw:
            raw.send(encode_call("echo", seqid=9, mtype=TMessageType.REPLY, message="x"))
            name, mtype, seqid, error = raw.read_message()
            assert (name, mtype, seqid) == ("echo", TMessageType.EXCEPTION, 9)
            assert error.type == TApplicationException.INVALID_MESSAGE_TYPE
            assert raw.call("echo", message="after") == "after"


class TestHandlerErrors:
    @pytest.mark.parametrize(("protocol", "transport"), WIRES)
    def test_undeclared_exception_is_internal_error(self, server, protocol, transport):
        """An undeclared exception reaches the client as INTERNAL_ERROR; the connection goes on."""
        for client, _ in both_clients(server.address, protocol, transport):
            with pytest.raises(APP_ERRORS) as info:
                client.raise_undeclared("boom")
            assert info.value.type == TApplicationException.INTERNAL_ERROR
            assert "raise_undeclared" in info.value.message
            assert client.echo("same connection") == "same connection"

    def test_declared_exception_arrives_with_its_fields(self, server):
        """A declared exception arrives as Declared with its fields; the connection serves on."""
        for client, types in both_clients(server.address):
            with pytest.raises(types.Declared) as info:
                client.raise_declared("bad input", 422)
            assert info.value.message == "bad input"
            assert info.value.code == 422
            assert client.add(1, 1) == 2

    def test_a_declared_exception_is_freed_once_answered(self, handler, make_server, monkeypatch):
        """The declared exception a handler raises, and with it the frames its traceback holds
        (the request's arguments and bytes), is freed once answered, with the cyclic GC off:
        a connection keeps no request alive after its reply."""
        refs: list[weakref.ref[BaseException]] = []

        def raise_declared(message: str, code: int) -> None:
            exc = testsvc_thrift.Declared(message=message, code=code)
            refs.append(weakref.ref(exc))
            raise exc

        monkeypatch.setattr(handler, "raise_declared", raise_declared)
        server = make_server()
        gc.disable()
        try:
            with thriftpy2_client(testsvc_thrift.TestService, server.address) as client:
                with pytest.raises(testsvc_thrift.Declared):
                    client.raise_declared("bad input", 422)
                wait_until(
                    lambda: refs[0]() is None,
                    timeout=2.0,
                    what="the declared exception to be freed after its reply",
                )
                assert client.add(1, 1) == 2
        finally:
            gc.enable()

    def test_wrong_return_type_is_internal_error(self, server):
        """A result the IDL cannot encode gets INTERNAL_ERROR; the connection serves on."""
        for client, _ in both_clients(server.address):
            with pytest.raises(APP_ERRORS) as info:
                client.wrong_return()
            assert info.value.type == TApplicationException.INTERNAL_ERROR
            assert client.echo("next") == "next"

    def test_wrong_return_leaves_no_partial_reply(self, server):
        """After a reply that could not be encoded, the next reply on the wire is well formed."""
        with RawClient(server.address) as raw:
            raw.send(
                encode_call("wrong_return", seqid=1) + encode_call("echo", seqid=2, message="ok")
            )
            _, mtype, seqid, error = raw.read_message()
            assert (mtype, seqid, error.type) == (
                TMessageType.EXCEPTION,
                1,
                TApplicationException.INTERNAL_ERROR,
            )
            _, mtype, seqid, result = raw.read_message()
            assert (mtype, seqid, result.success) == (TMessageType.REPLY, 2, "ok")


class TestOneway:
    def test_notify_is_delivered(self, server):
        """oneway calls reach the handler; a later call on the same connection sees them."""
        for client, types in both_clients(server.address):
            tag = f"tag-{types.__name__}"
            client.notify(tag)
            client.notify(tag)
            assert client.notified(tag) == 2

    @pytest.mark.parametrize(("protocol", "transport"), WIRES)
    def test_notify_gets_no_reply(self, server, protocol, transport):
        """A oneway call sends nothing back: the first reply is the next call's."""
        framed = transport == "framed"
        with RawClient(server.address) as raw:
            raw.send(
                encode_call(
                    "notify",
                    protocol=protocol,
                    framed=framed,
                    seqid=1,
                    mtype=TMessageType.ONEWAY,
                    tag="raw",
                )
                + encode_call("notified", protocol=protocol, framed=framed, seqid=2, tag="raw")
            )
            name, mtype, seqid, result = raw.read_message(protocol, framed)
            assert (name, mtype, seqid) == ("notified", TMessageType.REPLY, 2)
            assert result.success == 1


# -- timeouts ----------------------------------------------------------------------------------


class TestTimeouts:
    def test_idle_timeout_closes_an_idle_connection(self, make_server):
        """A connection idle between requests longer than idle_timeout is closed."""
        server = make_server(idle_timeout=0.3)
        with RawClient(server.address) as raw:
            assert raw.call("echo", message="hi") == "hi"
            start = time.monotonic()
            assert raw.closed_by_peer(timeout=5.0)
            assert time.monotonic() - start >= 0.25

    def test_busy_connection_outlives_idle_timeout(self, make_server):
        """Requests closer together than idle_timeout keep the connection open."""
        server = make_server(idle_timeout=0.5)
        with thriftpy2_client(TestService, server.address) as client:
            deadline = time.monotonic() + 1.2
            while time.monotonic() < deadline:
                assert client.slow(0.1, "busy") == "busy"

    def test_stalled_request_is_cut_off(self, make_server):
        """A client that sends a request's first bytes then stalls is cut off; others are served."""
        server = make_server(read_write_timeout=0.3)
        request = encode_call("echo", message="x" * 200)
        with RawClient(server.address) as stalled:
            stalled.send(request[:12])
            start = time.monotonic()
            with thriftpy2_client(TestService, server.address) as other:
                assert other.echo("served meanwhile") == "served meanwhile"
            assert stalled.closed_by_peer(timeout=3.0)
            assert time.monotonic() - start >= 0.25

    def test_stalled_second_request_is_cut_off(self, make_server):
        """A kept-alive connection that stalls half-way through its next request is cut off."""
        server = make_server(read_write_timeout=0.3)
        request = encode_call("echo", message="x" * 200)
        with RawClient(server.address) as stalled:
            assert stalled.call("echo", message="first") == "first"
            stalled.send(request[:12])
            start = time.monotonic()
            assert stalled.closed_by_peer(timeout=3.0)
            assert time.monotonic() - start >= 0.25

    def test_client_that_never_reads_is_cut_off(self, make_server):
        """A client sending requests with big replies and never reading them is cut off."""
        server = make_server(read_write_timeout=0.3)
        payload = b"\xab" * (1024 * 1024)
        request = encode_call("echo_binary", data=payload)
        count = 24
        with RawClient(server.address) as hog:
            hog.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)

            def flood() -> BaseException | None:
                try:
                    for _ in range(count):
                        hog.send(request)
                except OSError as exc:
                    return exc
                return None

            sender = gevent.spawn(flood)
            try:
                wait_until(lambda: open_connections(server) == 1, timeout=2.0)
                # Cut off while we still have not read a byte.
                wait_until(lambda: open_connections(server) == 0, timeout=5.0)
                with thriftpy2_client(TestService, server.address) as other:
                    assert other.echo("others still served") == "others still served"
                sent_error = sender.get(timeout=5.0)
                assert sent_error is None or isinstance(
                    sent_error, (ConnectionError, BrokenPipeError)
                )
                received = 0
                with contextlib.suppress(ConnectionResetError):
                    hog.sock.settimeout(5.0)
                    while chunk := hog.sock.recv(1 << 20):
                        received += len(chunk)
                assert received < count * len(payload)
            finally:
                sender.kill()


# -- bounds and hostile input ----------------------------------------------------------------


LIMIT = 256 * 1024


class TestMaxFrameSize:
    def test_framed_length_over_the_limit_is_refused(self, make_server):
        """A frame whose length field exceeds max_frame_size closes the connection at once."""
        server = make_server(max_frame_size=LIMIT, read_write_timeout=30.0)
        body = encode_call("echo", message="x")
        with RawClient(server.address) as raw:
            raw.send(struct.pack("!i", 1 << 30) + body)
            assert raw.closed_by_peer(timeout=3.0)
        with thriftpy2_client(TestService, server.address, transport="framed") as client:
            assert client.echo("fine") == "fine"

    @pytest.mark.parametrize("after_a_call", [False, True], ids=["first-request", "after-a-call"])
    def test_framed_request_over_the_limit_is_refused(self, make_server, after_a_call):
        """A whole frame larger than max_frame_size is refused; the server serves on."""
        server = make_server(max_frame_size=LIMIT, read_write_timeout=30.0)
        with RawClient(server.address) as raw:
            if after_a_call:
                assert raw.call("echo", framed=True, message="small") == "small"
            with contextlib.suppress(ConnectionResetError, BrokenPipeError):
                raw.send(encode_call("echo", framed=True, message="x" * (LIMIT + 1000)))
            assert raw.closed_by_peer(timeout=3.0)
        with thriftpy2_client(TestService, server.address, transport="framed") as client:
            assert client.echo("fine") == "fine"

    def test_huge_string_length_is_refused(self, make_server):
        """A buffered binary request announcing a huge string is refused without waiting for it."""
        server = make_server(max_frame_size=LIMIT, read_write_timeout=30.0)
        request = bytearray(encode_call("echo", message="abcd"))
        at = request.index(b"abcd") - 4
        request[at : at + 4] = struct.pack("!i", 0x7FFFFFF0)
        with RawClient(server.address) as raw:
            raw.send(bytes(request))
            assert raw.closed_by_peer(timeout=3.0)
        with thriftpy2_client(TestService, server.address) as client:
            assert client.echo("fine") == "fine"

    @pytest.mark.parametrize(("protocol", "transport"), WIRES)
    def test_request_within_the_limit_is_served(self, make_server, protocol, transport):
        """Requests up to max_frame_size are served, however small the limit is set."""
        server = make_server(max_frame_size=8192)
        for client, _ in both_clients(server.address, protocol, transport):
            assert client.echo("y" * 7000) == "y" * 7000


def _garbage(seed: int) -> bytes:
    rng = random.Random(seed)
    return rng.randbytes(rng.randrange(1, 2048))


class TestHostileInput:
    @pytest.mark.parametrize(
        "data",
        [
            b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n",
            b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(32),  # a TLS ClientHello
            b"\x80\x02\x00\x01",  # a binary header of an unknown version
            b"\x00\x00\x00\x10\x16\x03\x01\x00",  # a frame of something that is not Thrift
        ],
        ids=["http", "tls", "binary-version", "framed-not-thrift"],
    )
    def test_non_thrift_start_is_closed_at_once(self, make_server, data):
        """A connection that does not start like Thrift is closed at once; the server serves on."""
        server = make_server(read_write_timeout=30.0, idle_timeout=30.0)
        with RawClient(server.address) as raw:
            raw.send(data)
            assert raw.closed_by_peer(timeout=3.0)
        assert server.started
        for client, _ in both_clients(server.address):
            assert client.echo("still up") == "still up"

    @pytest.mark.parametrize("seed", range(12))
    @pytest.mark.parametrize(
        "prefix",
        [b"", b"\x80\x01\x00\x01", b"\x82\x21", b"\x00\x00\x01\x00\x80\x01"],
        ids=["bare", "binary", "compact", "framed-binary"],
    )
    def test_random_garbage_is_closed(self, make_server, seed, prefix):
        """Random bytes, bare or after a Thrift header, end with the connection closed."""
        # Garbage after a valid header may read as the start of a request that never
        # completes; the timeouts close those.
        server = make_server(read_write_timeout=0.5, idle_timeout=0.5)
        with RawClient(server.address) as raw:
            with contextlib.suppress(ConnectionResetError, BrokenPipeError):
                raw.send(prefix + _garbage(seed))
            assert raw.closed_by_peer(timeout=4.0)
        wait_until(lambda: open_connections(server) == 0, timeout=3.0)
        with thriftpy2_client(TestService, server.address) as client:
            assert client.echo("still up") == "still up"


# -- stop ----------------------------------------------------------------------------------------


class TestStop:
    def test_in_flight_call_finishes_and_new_connections_are_refused(self, make_server, handler):
        """During stop, a call in flight gets its reply while new connections are refused."""
        server = make_server(exit_wait_time=5.0)
        address = server.address
        call = gevent.spawn(slow_call, address, 1.0, "finished")
        try:
            wait_until(lambda: handler.in_flight == 1, timeout=3.0)
            stopper = gevent.spawn(server.stop)
            wait_until(lambda: not can_connect(address), timeout=0.5)
            assert handler.in_flight == 1  # refused while the call was still running
            assert call.get(timeout=5.0) == "finished"
            assert stopper.get(timeout=5.0) is True
        finally:
            call.kill()

    def test_idle_connection_is_closed(self, make_server):
        """An idle kept-alive connection is closed by stop, without waiting for exit_wait_time."""
        server = make_server(exit_wait_time=5.0, close_linger=0.1)
        with RawClient(server.address) as raw:
            assert raw.call("ping") is None
            start = time.monotonic()
            assert server.stop() is True
            assert time.monotonic() - start < 2.0
            assert raw.closed_by_peer(timeout=2.0)

    def test_requests_waiting_behind_a_call_are_answered_before_the_fin(self, make_server, handler):
        """A request that reached the server (pipelined behind a slow call) when stop began is
        answered too: a connection is closed only when nothing waits in it, and with a FIN,
        so the client reads both replies, then end-of-stream, never a reset."""
        server = make_server(exit_wait_time=5.0, close_linger=0.1)
        with RawClient(server.address) as raw:
            raw.send(encode_call("slow", seconds=0.5, message="first"))
            raw.send(encode_call("echo", message="second"))
            wait_until(lambda: handler.in_flight == 1, timeout=3.0)
            stopper = gevent.spawn(server.stop)
            replies = [raw.read_message()[3].success for _ in range(2)]
            assert replies == ["first", "second"]
            assert raw.sock.recv(1) == b""  # a FIN: recv would raise on a reset
            assert stopper.get(timeout=5.0) is True

    def test_idle_connection_sees_end_of_stream_before_any_reply_byte(self, make_server):
        """An idle keep-alive connection is ended with a FIN, so a client whose next request
        crosses the stop reads end-of-stream without a byte of reply: the call was never
        handled and can be retried."""
        server = make_server(exit_wait_time=5.0, close_linger=0.1)
        with RawClient(server.address) as raw:
            assert raw.call("ping") is None
            assert server.stop() is True
            with contextlib.suppress(BrokenPipeError):
                raw.send(encode_call("ping"))
            assert raw.sock.recv(64) == b""

    def test_a_first_request_sent_just_after_the_stop_began_is_answered(self, make_server):
        """A client that connected before the stop and sends its first request only after it
        began (a loaded client takes a moment between the two) gets the reply, then a FIN:
        a connection that has sent nothing yet is spared for a moment, not ended at once."""
        server = make_server(exit_wait_time=5.0)
        address = server.address
        with RawClient(address) as raw:
            wait_until(lambda: open_connections(server) == 1)
            stopper = gevent.spawn(server.stop)
            wait_until(lambda: not can_connect(address), timeout=2.0)
            raw.send(encode_call("echo", message="late"))
            assert raw.read_message()[3].success == "late"
            assert raw.sock.recv(1) == b""
            assert stopper.get(timeout=5.0) is True

    def test_stop_is_idempotent(self, server):
        """stop() may be called again, and concurrently; each call reports the same outcome."""
        address = server.address
        first = gevent.spawn(server.stop)
        second = gevent.spawn(server.stop)
        assert first.get(timeout=5.0) is True
        assert second.get(timeout=5.0) is True
        assert server.stop() is True
        assert not server.started
        assert not can_connect(address)

    def test_stop_before_start(self, handler):
        """stop() on a server that never started returns True."""
        server = kitegreen.RpcServer(TestService, handler, loopback_config())
        assert server.stop() is True

    def test_stopped_server_cannot_restart(self, server):
        """A stopped server refuses to start again."""
        server.stop()
        with pytest.raises(RuntimeError, match="cannot restart"):
            server.start()

    def test_context_manager(self, handler):
        """The server is a context manager: started inside, stopped after."""
        with kitegreen.RpcServer(TestService, handler, loopback_config()) as server:
            assert server.started
            address = server.address
            with thriftpy2_client(TestService, address) as client:
                assert client.echo("inside") == "inside"
        assert not server.started
        assert not can_connect(address)

    def test_returns_false_when_exit_wait_time_passes(self, make_server, handler):
        """A call still running when exit_wait_time passes is cut off and stop returns False."""
        server = make_server(exit_wait_time=0.3)
        call = gevent.spawn(slow_call, server.address, 3.0, "too late")
        try:
            wait_until(lambda: handler.in_flight == 1, timeout=3.0)
            start = time.monotonic()
            assert server.stop() is False
            assert time.monotonic() - start < 2.0
            assert isinstance(call.get(timeout=5.0), CLIENT_DISCONNECTED)
            assert handler.in_flight == 0
        finally:
            call.kill()

    def test_timeout_argument_overrides_exit_wait_time(self, make_server, handler):
        """stop(timeout=...) bounds the drain instead of exit_wait_time."""
        server = make_server(exit_wait_time=30.0)
        call = gevent.spawn(slow_call, server.address, 3.0, "too late")
        try:
            wait_until(lambda: handler.in_flight == 1, timeout=3.0)
            start = time.monotonic()
            assert server.stop(timeout=0.3) is False
            assert time.monotonic() - start < 2.0
        finally:
            call.kill()


class TestHandlerCheck:
    def test_handler_missing_a_method(self):
        """A handler that lacks a method of the service is refused at construction, naming it."""

        class Partial:
            def ping(self) -> None:
                return None

        with pytest.raises(kitegreen.HandlerError, match="echo"):
            kitegreen.RpcServer(TestService, Partial(), loopback_config())
