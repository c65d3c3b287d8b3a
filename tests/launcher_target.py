"""A server for the launcher tests: ``python -m kitegreen tests/launcher_target.py:server``.

``slow`` logs ``slow call started`` when it begins, so a test reading the log knows the call is
in flight before it signals the process.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gevent
import structlog
import thriftpy2

import kitegreen

testsvc_thrift = thriftpy2.load(
    str(Path(__file__).parent / "idl" / "testsvc.thrift"), module_name="testsvc_thrift"
)
log = structlog.get_logger("launcher_target")


class Handler:
    """Implements TestService."""

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
        return a + b

    def client_ip(self) -> str:
        return kitegreen.real_ip() or ""

    def slow(self, seconds: float, message: str) -> str:
        log.info("slow call started", seconds=seconds)
        gevent.sleep(seconds)
        return message

    def raise_declared(self, message: str, code: int) -> None:
        raise testsvc_thrift.Declared(message=message, code=code)

    def raise_undeclared(self, message: str) -> None:
        raise RuntimeError(message)

    def wrong_return(self) -> Any:
        return 12345

    def notify(self, tag: str) -> None:
        self.notified_tags[tag] = self.notified_tags.get(tag, 0) + 1

    def notified(self, tag: str) -> int:
        return self.notified_tags.get(tag, 0)

    def block_hub(self, seconds: float) -> None:
        return None


server = kitegreen.RpcServer(
    testsvc_thrift.TestService,
    Handler(),
    kitegreen.Config(service_name="launcher-test", host="127.0.0.1", port=0, exit_wait_time=5.0),
)
