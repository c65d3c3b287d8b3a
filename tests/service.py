"""The service every test talks to (``tests/idl/testsvc.thrift``) and its handler, shared by the
tests and the launcher and workers targets."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import gevent
import structlog
import thriftpy2

import kitegreen

testsvc_thrift = thriftpy2.load(
    str(Path(__file__).with_name("idl") / "testsvc.thrift"), module_name="testsvc_thrift"
)


class Handler:
    """Implements TestService; records what oneway calls delivered.

    Args:
        max_seconds: a cap on what ``slow`` and ``block_hub`` are asked to take, for servers that
            fuzzers call (a mutated ``slow(1e300)`` should measure the server, not the handler).
    """

    def __init__(self, max_seconds: float | None = None) -> None:
        self.notified_tags: dict[str, int] = {}
        self.in_flight = 0
        self.max_seconds = max_seconds

    def _capped(self, seconds: float) -> float:
        seconds = max(seconds, 0.0)
        return seconds if self.max_seconds is None else min(seconds, self.max_seconds)

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
        return kitegreen.real_ip() or ""

    def slow(self, seconds: float, message: str) -> str:
        self.in_flight += 1
        try:
            gevent.sleep(self._capped(seconds))
        finally:
            self.in_flight -= 1
        return message

    def raise_declared(self, message: str, code: int) -> None:
        raise testsvc_thrift.Declared(message=message, code=code)

    def raise_undeclared(self, message: str) -> None:
        raise RuntimeError(message)

    def wrong_return(self) -> Any:
        return 12345  # the IDL says string

    def notify(self, tag: str) -> None:
        if tag in self.notified_tags or len(self.notified_tags) < 1000:
            self.notified_tags[tag] = self.notified_tags.get(tag, 0) + 1

    def notified(self, tag: str) -> int:
        return self.notified_tags.get(tag, 0)

    def block_hub(self, seconds: float) -> None:
        # Computes for ``seconds`` of this thread's CPU time, not of wall time: on a loaded
        # machine a wall-clock spin gets a fraction of a CPU (0.08 s in 0.5 s at a load of 7
        # on two cores), and the hub watch rightly calls such a stall starvation, not a block.
        end = time.thread_time() + self._capped(seconds)
        while time.thread_time() < end:
            pass


class LoggingHandler(Handler):
    """The test handler, logging ``slow call started`` when ``slow`` begins: a test reading a
    launched server's log then knows the call is in flight before it signals the process."""

    def slow(self, seconds: float, message: str) -> str:
        structlog.get_logger("kitegreen.tests").info("slow call started", seconds=seconds)
        return super().slow(seconds, message)
