"""The echo example: ``python -m kitegreen examples/echo/service.py:server``."""

from __future__ import annotations

from pathlib import Path

import structlog
import thriftpy2

import kitegreen

IDL = Path(__file__).with_name("echo.thrift")
echo_thrift = thriftpy2.load(str(IDL), module_name="echo_thrift")
log = structlog.get_logger("echo")


class EchoHandler:
    """Implements every method of ``Echo``."""

    def echo(self, message: str) -> str:
        if not message:
            raise echo_thrift.EchoError(message="empty message", code=400)
        return message

    def whoami(self) -> str:
        return kitegreen.real_ip() or "unix socket"

    def ping(self) -> None:
        return None

    def notify(self, message: str) -> None:
        log.info("notified", message=message)


# The launcher layers --config, KITE_* variables and flags over this; 127.0.0.1 keeps the
# example off the network.
server = kitegreen.RpcServer(
    echo_thrift.Echo,
    EchoHandler(),
    kitegreen.Config(service_name="echo", host="127.0.0.1", port=8888),
)
