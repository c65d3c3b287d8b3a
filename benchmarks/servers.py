"""The servers under test, each runnable as a subprocess on a loopback port and one wire format.

``python benchmarks/servers.py NAME --port N --wire WIRE`` serves ``bench.thrift``'s ``Bench``
with the same handler everywhere; :func:`command` builds the command line ``run.py`` spawns.

=====================  ======================================================================
``kitegreen``          ``python -m kitegreen benchmarks/servers.py:kitegreen_server``, its
                       defaults: connection and QPS limits, metrics and the debug server on
                       (debug port 0 so that runs never collide). Detects the wire itself.
``kitegreen-unlimited`` the same with the connection and QPS limits off: on a fast machine the
                       default 50,000 QPS limit refuses part of the load, and a cell then
                       measures the limit rather than the server.
``gevent-floor``       gevent's ``StreamServer`` + thriftpy2's ``TProcessor`` loop, one greenlet
                       per connection, nothing else: the floor of kitegreen's design.
``thriftpy2-threaded`` ``thriftpy2.rpc.make_server``: ``TThreadedServer``, a thread per
                       connection, with the wire's protocol and transport factories.
``gunicorn-thrift``    gunicorn_thrift's ``thriftpy_gevent`` worker under gunicorn 19.9, one
                       worker, from its own virtualenv (see README.md).
``kitegreen-bare``     (optional) kitegreen with limits, metrics, the debug server and the hub
                       watchdog off: the difference to ``kitegreen`` is what the features cost.
``kitegreen-wN``       kitegreen with ``--workers N`` (``run.py --workers 1,2,...`` makes them).
=====================  ======================================================================

kitegreen reads whole messages and decodes them with its own compiled codec (binary and
compact); the peers use thriftpy2's Cython binary protocol and Cython transports, and
thriftpy2's pure-Python ``TCompactProtocol`` for compact.

This module is imported by ``run.py`` and by the gunicorn virtualenv (which has no kitegreen),
so it imports nothing heavy at module level.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
THRIFT_FILE = HERE / "bench.thrift"
GUNICORN_VENV = HERE / ".venv-gunicorn"

SERVERS = (
    "kitegreen",
    "kitegreen-unlimited",
    "gevent-floor",
    "thriftpy2-threaded",
    "gunicorn-thrift",
)
KITEGREEN = ("kitegreen", "kitegreen-unlimited", "kitegreen-bare")
EXTRA_SERVERS = ("kitegreen-bare",)
"""Not run by default: kitegreen with every optional feature off, to price the features."""
NO_LIMITS_FLAGS = ("--limit-connections", "0", "--limit-qps", "0")
KITEGREEN_BARE_FLAGS = (
    *NO_LIMITS_FLAGS,
    "--no-enable-metrics",
    "--no-enable-debug-server",
    "--hub-block-threshold",
    "0",
)
WIRES = ("binary-buffered", "compact-framed")
EXTRA_WIRES = ("binary-framed", "ttheader", "theader")
"""Not run by default. ``binary-framed`` is the plain baseline of the header wires:
``ttheader`` is a binary ping in a TTHeader carrying what a Kitex client writes (caller service
and method, log id, RPC timeout, transit and persistent metainfo), ``theader`` one in a THeader
with fbthrift and baseplate headers. Only kitegreen serves the header wires."""
HEADER_WIRES = ("ttheader", "theader")
ECHO_SIZE = 1024
RECORDS = 20
"""Structs in a ``records`` call, each with a string, a list of 10 i32 and a map of 3."""


def load_bench() -> Any:
    """The thriftpy2 module of ``bench.thrift``."""
    import thriftpy2

    return thriftpy2.load(str(THRIFT_FILE), module_name="bench_thrift")


class BenchHandler:
    """The handler every server runs: no work beyond the call itself."""

    def ping(self) -> None:
        return None

    def records(self, records: list[Any]) -> list[Any]:
        return records

    def echo(self, msg: str) -> str:
        return msg


def call_values(bench: Any, method: str) -> tuple[Any, Any]:
    """``(args, result)`` of one benchmark call, the same for every server."""
    args = getattr(bench.Bench, f"{method}_args")()
    result = getattr(bench.Bench, f"{method}_result")()
    if method == "echo":
        args.msg = result.success = "x" * ECHO_SIZE
    elif method == "records":
        args.records = result.success = [
            bench.Record(
                name=f"record-{i:02d}",
                values=list(range(i, i + 10)),
                attrs={"a": i, "b": 2, "c": 3},
            )
            for i in range(RECORDS)
        ]
    return args, result


def factories(wire: str) -> tuple[Any, Any]:
    """``(protocol factory, transport factory)`` for ``binary-buffered`` or ``compact-framed``."""
    from thriftpy2.protocol import TCompactProtocolFactory, TCyBinaryProtocolFactory
    from thriftpy2.transport import TCyBufferedTransportFactory, TCyFramedTransportFactory

    if wire == "binary-buffered":
        return TCyBinaryProtocolFactory(), TCyBufferedTransportFactory()
    if wire == "compact-framed":
        return TCompactProtocolFactory(), TCyFramedTransportFactory()
    if wire == "binary-framed" or wire in HEADER_WIRES:
        # A header wire's message inside the header is a plain binary one.
        return TCyBinaryProtocolFactory(), TCyFramedTransportFactory()
    raise ValueError(f"wire must be one of {', '.join(WIRES)}, got {wire!r}")


def factory_paths(wire: str) -> tuple[str, str]:
    """The same factories as ``module:attr`` strings, for gunicorn_thrift's flags."""
    if wire == "binary-buffered":
        return (
            "thriftpy2.protocol:TCyBinaryProtocolFactory",
            "thriftpy2.transport:TCyBufferedTransportFactory",
        )
    if wire == "compact-framed":
        return (
            "thriftpy2.protocol:TCompactProtocolFactory",
            "thriftpy2.transport:TCyFramedTransportFactory",
        )
    if wire == "binary-framed":
        return (
            "thriftpy2.protocol:TCyBinaryProtocolFactory",
            "thriftpy2.transport:TCyFramedTransportFactory",
        )
    raise ValueError(f"wire must be one of {', '.join(WIRES)}, got {wire!r}")


# -- kitegreen ------------------------------------------------------------------------------


def kitegreen_server() -> Any:
    """The kitegreen server, for ``python -m kitegreen benchmarks/servers.py:kitegreen_server``.

    Defaults throughout; only the debug port is fixed to 0 (an ephemeral port) so that a
    benchmark never collides with another server's derived debug port.
    """
    import kitegreen

    bench = load_bench()
    return kitegreen.RpcServer(
        bench.Bench,
        BenchHandler(),
        kitegreen.Config(service_name="bench", host="127.0.0.1", port=0, debug_port=0),
    )


# -- gevent floor ---------------------------------------------------------------------------


def serve_gevent_floor(host: str, port: int, wire: str) -> None:
    """gevent ``StreamServer`` + thriftpy2 ``TProcessor``: one greenlet per connection."""
    from gevent.server import StreamServer
    from thriftpy2.thrift import TProcessor
    from thriftpy2.transport import TSocket, TTransportException

    bench = load_bench()
    processor = TProcessor(bench.Bench, BenchHandler())
    pfactory, tfactory = factories(wire)

    def handle(sock: Any, _address: Any) -> None:
        trans = TSocket()
        trans.set_handle(sock)
        itrans = tfactory.get_transport(trans)
        otrans = tfactory.get_transport(trans)
        iprot = pfactory.get_protocol(itrans)
        oprot = pfactory.get_protocol(otrans)
        try:
            while True:
                processor.process(iprot, oprot)
        except (TTransportException, OSError):
            pass
        finally:
            sock.close()

    StreamServer((host, port), handle, backlog=1024).serve_forever()


# -- thriftpy2 threaded ---------------------------------------------------------------------


def serve_threaded(host: str, port: int, wire: str) -> None:
    """thriftpy2's ``make_server``: ``TThreadedServer``, one OS thread per connection.

    ``client_timeout=0`` switches its 3 s socket timeout off, so idle connections stay open
    as they do on the other servers (kitegreen's idle timeout is 300 s).
    """
    from thriftpy2.rpc import make_server

    bench = load_bench()
    pfactory, tfactory = factories(wire)
    server = make_server(
        bench.Bench,
        BenchHandler(),
        host=host,
        port=port,
        proto_factory=pfactory,
        trans_factory=tfactory,
        client_timeout=0,
    )
    server.trans.backlog = 1024
    server.daemon = True
    server.serve()


# -- gunicorn_thrift ------------------------------------------------------------------------


def gunicorn_app() -> Any:
    """The ``TProcessor`` gunicorn_thrift serves (``servers:gunicorn_processor``)."""
    from thriftpy2.thrift import TProcessor

    bench = load_bench()
    return TProcessor(bench.Bench, BenchHandler())


def __getattr__(name: str) -> Any:
    # gunicorn_thrift loads MODULE:ATTR with getattr and wants the processor itself; build it
    # only when asked, so that importing this module stays cheap.
    if name == "gunicorn_processor":
        return gunicorn_app()
    raise AttributeError(name)


# -- command lines --------------------------------------------------------------------------


def command(name: str, port: int, wire: str, python: str = sys.executable) -> list[str]:
    """The command that serves ``name`` on ``127.0.0.1:port`` with ``wire``.

    kitegreen detects the wire per connection, so ``wire`` does not change its command.
    """
    if name in KITEGREEN or name.startswith("kitegreen-w"):
        if name.startswith("kitegreen-w"):
            extra = ["--workers", name.rsplit("-w", 1)[1]]
        else:
            extra = {
                "kitegreen": [],
                "kitegreen-unlimited": list(NO_LIMITS_FLAGS),
                "kitegreen-bare": list(KITEGREEN_BARE_FLAGS),
            }[name]
        return [
            python,
            "-m",
            "kitegreen",
            f"{HERE / 'servers.py'}:kitegreen_server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--debug-port",
            "0",
            "--log-level",
            "warning",
            *extra,
        ]
    if name in ("gevent-floor", "thriftpy2-threaded"):
        return [python, str(HERE / "servers.py"), name, "--port", str(port), "--wire", wire]
    if name == "gunicorn-thrift":
        proto, trans = factory_paths(wire)
        return [
            str(GUNICORN_VENV / "bin" / "gunicorn_thrift"),
            "servers:gunicorn_processor",
            "--chdir",
            str(HERE),
            "--bind",
            f"127.0.0.1:{port}",
            "--worker-class",
            "thriftpy_gevent",
            "--workers",
            "1",
            "--worker-connections",
            "10000",
            "--backlog",
            "1024",
            "--thrift-protocol-factory",
            proto,
            "--thrift-transport-factory",
            trans,
            "--log-level",
            "warning",
        ]
    raise ValueError(
        f"server must be one of {', '.join(SERVERS + EXTRA_SERVERS)} or kitegreen-wN, got {name!r}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description="Serve bench.thrift with one of the peers.")
    parser.add_argument("name", choices=("gevent-floor", "thriftpy2-threaded"))
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--wire", choices=(*WIRES, "binary-framed"), default="binary-buffered")
    args = parser.parse_args()
    if not args.host.startswith("127."):
        parser.error("benchmarks listen on loopback only")
    if args.name == "gevent-floor":
        serve_gevent_floor(args.host, args.port, args.wire)
    else:
        serve_threaded(args.host, args.port, args.wire)


if __name__ == "__main__":
    main()
