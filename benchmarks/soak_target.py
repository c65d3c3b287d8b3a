"""The server ``soak.py`` hammers: ``python -m kitegreen benchmarks/soak_target.py:make_server``.

It serves ``soak.thrift`` (strings, binary, nested structs, containers, declared and
undeclared exceptions, a result that does not match the IDL, oneway) so that well-behaved
clients and fuzzers reach every decoding path. Every handler call is bounded: a fuzzer that
happens to turn a call into ``slow(1e300)`` measures the server, not the handler.

The service has the shape of the tests' ``TestService``; the benchmarks keep their own copy of
it (this handler and ``soak.thrift``) so that they import nothing from ``tests/``.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import gevent
import thriftpy2

MAX_HANDLER_SECONDS = 0.05
MAX_NOTIFIED_TAGS = 1000

soaksvc = thriftpy2.load(str(Path(__file__).with_name("soak.thrift")), module_name="soaksvc_thrift")


def load_testsvc() -> Any:
    """The thriftpy2 module of the soak IDL."""
    return soaksvc


def _capped(seconds: float) -> float:
    return min(max(seconds, 0.0), MAX_HANDLER_SECONDS)


class SoakHandler:
    """Implements ``TestService``, each call bounded by :data:`MAX_HANDLER_SECONDS`."""

    def __init__(self) -> None:
        self.notified_tags: dict[str, int] = {}

    def ping(self) -> None:
        return None

    def echo(self, message: str) -> str:
        return message

    def echo_binary(self, data: bytes) -> bytes:
        return data

    def roundtrip(self, item: Any) -> Any:
        return item

    def add(self, a: int, b: int) -> int:
        return (a + b + 2**31) % 2**32 - 2**31  # i32 arithmetic: any two i32 give an i32

    def client_ip(self) -> str:
        import kitegreen

        return kitegreen.real_ip() or ""

    def slow(self, seconds: float, message: str) -> str:
        gevent.sleep(_capped(seconds))
        return message

    def raise_declared(self, message: str, code: int) -> None:
        raise soaksvc.Declared(message=message, code=code)

    def raise_undeclared(self, message: str) -> None:
        raise RuntimeError(message)

    def wrong_return(self) -> Any:
        return 12345  # the IDL says string

    def notify(self, tag: str) -> None:
        # Bounded: fuzzers send endless distinct tags.
        if tag in self.notified_tags or len(self.notified_tags) < MAX_NOTIFIED_TAGS:
            self.notified_tags[tag] = self.notified_tags.get(tag, 0) + 1

    def notified(self, tag: str) -> int:
        return self.notified_tags.get(tag, 0)

    def block_hub(self, seconds: float) -> None:
        end = time.perf_counter() + _capped(seconds)
        while time.perf_counter() < end:
            pass


def make_server() -> Any:
    """The server: loopback, an ephemeral port, the debug server on an ephemeral port.

    The soak script's flags (read_write_timeout, limits, log level) override these.
    """
    import kitegreen

    return kitegreen.RpcServer(
        soaksvc.TestService,
        SoakHandler(),
        kitegreen.Config(
            service_name="soak", host="127.0.0.1", port=0, enable_debug_server=True, debug_port=0
        ),
    )
