"""The server ``soak.py`` hammers: ``python -m kitegreen benchmarks/soak_target.py:make_server``.

It serves the test suite's ``TestService`` (``tests/idl/testsvc.thrift``: strings, binary,
nested structs, containers, declared and undeclared exceptions, a result that does not match
the IDL, oneway) so that well-behaved clients and fuzzers reach every decoding path. Handler
calls that could sleep or spin for a caller-chosen time are capped: a fuzzer that happens to
turn a call into ``slow(1e300)`` measures the handler, not the server.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

IDL = Path(__file__).resolve().parent.parent / "tests" / "idl" / "testsvc.thrift"
MAX_HANDLER_SECONDS = 0.05


def load_testsvc() -> Any:
    """The thriftpy2 module of the test IDL."""
    import thriftpy2

    return thriftpy2.load(str(IDL), module_name="testsvc_thrift")


class SoakHandler:
    """Implements TestService; nothing it does depends on how hostile the caller is."""

    def __init__(self, testsvc: Any) -> None:
        self._testsvc = testsvc
        self._notified: dict[str, int] = {}

    def ping(self) -> None:
        return None

    def echo(self, message: str) -> str:
        return message

    def echo_binary(self, data: bytes) -> bytes:
        return data

    def roundtrip(self, item: Any) -> Any:
        return item

    def add(self, a: int, b: int) -> int:
        return (a + b + 2**31) % 2**32 - 2**31

    def client_ip(self) -> str:
        import kitegreen

        return kitegreen.real_ip() or ""

    def slow(self, seconds: float, message: str) -> str:
        import gevent

        gevent.sleep(min(max(seconds, 0.0), MAX_HANDLER_SECONDS))
        return message

    def raise_declared(self, message: str, code: int) -> None:
        raise self._testsvc.Declared(message=message, code=code)

    def raise_undeclared(self, message: str) -> None:
        raise RuntimeError(message)

    def wrong_return(self) -> Any:
        return 12345  # the IDL says string

    def notify(self, tag: str) -> None:
        if len(self._notified) < 1000:
            self._notified[tag] = self._notified.get(tag, 0) + 1

    def notified(self, tag: str) -> int:
        return self._notified.get(tag, 0)

    def block_hub(self, seconds: float) -> None:
        end = time.perf_counter() + min(max(seconds, 0.0), MAX_HANDLER_SECONDS)
        while time.perf_counter() < end:
            pass


def make_server() -> Any:
    """The server: loopback, an ephemeral port, the debug server on an ephemeral port.

    The soak script's flags (read_write_timeout, limits, log level) override these.
    """
    import kitegreen

    testsvc = load_testsvc()
    return kitegreen.RpcServer(
        testsvc.TestService,
        SoakHandler(testsvc),
        kitegreen.Config(
            service_name="soak", host="127.0.0.1", port=0, enable_debug_server=True, debug_port=0
        ),
    )
