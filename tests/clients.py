"""Real Thrift clients for tests: thriftpy2's, and Apache Thrift's as an independent one."""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterator
from typing import Any

from thriftpy2.protocol import TCompactProtocolFactory, TCyBinaryProtocolFactory
from thriftpy2.rpc import make_client
from thriftpy2.transport import TCyBufferedTransportFactory, TCyFramedTransportFactory

WIRES = [
    ("binary", "buffered"),
    ("binary", "framed"),
    ("compact", "buffered"),
    ("compact", "framed"),
]
"""Every protocol/transport combination kitegreen detects."""


@contextlib.contextmanager
def thriftpy2_client(
    service: Any,
    address: Any,
    protocol: str = "binary",
    transport: str = "buffered",
    timeout: float = 5.0,
) -> Iterator[Any]:
    """A thriftpy2 client for ``address`` ((host, port) or a Unix socket path)."""
    proto = TCyBinaryProtocolFactory() if protocol == "binary" else TCompactProtocolFactory()
    trans = (
        TCyBufferedTransportFactory() if transport == "buffered" else TCyFramedTransportFactory()
    )
    if isinstance(address, str):
        client = make_client(
            service,
            unix_socket=address,
            proto_factory=proto,
            trans_factory=trans,
            timeout=int(timeout * 1000),
        )
    else:
        host, port = address
        client = make_client(
            service,
            host,
            port,
            proto_factory=proto,
            trans_factory=trans,
            timeout=int(timeout * 1000),
        )
    try:
        yield client
    finally:
        client.close()


@contextlib.contextmanager
def apache_client(
    address: Any, protocol: str = "binary", transport: str = "buffered", timeout: float = 5.0
) -> Iterator[Any]:
    """An Apache Thrift (``thrift`` package) client, from stubs made by the thrift compiler."""
    from testsvc import TestService  # tests/gen_apache
    from thrift.protocol import TBinaryProtocol, TCompactProtocol
    from thrift.transport import TSocket, TTransport

    if isinstance(address, str):
        sock = TSocket.TSocket(unix_socket=address)
    else:
        sock = TSocket.TSocket(address[0], address[1])
    sock.setTimeout(timeout * 1000)
    trans = (
        TTransport.TBufferedTransport if transport == "buffered" else TTransport.TFramedTransport
    )(sock)
    proto = (
        TBinaryProtocol.TBinaryProtocol
        if protocol == "binary"
        else TCompactProtocol.TCompactProtocol
    )(trans)
    client = TestService.Client(proto)
    trans.open()
    try:
        yield client
    finally:
        trans.close()


def read_exactly(sock: socket.socket, n: int) -> bytes:
    """``n`` bytes from a plain socket; EOFError if the peer closes first."""
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise EOFError(f"closed after {len(data)} of {n} bytes")
        data += chunk
    return data
