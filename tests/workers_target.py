"""A server for the workers' tests: ``python -m kitegreen tests/workers_target.py:server -w 2``.

It imports quickly (no pytest, no conftest): a worker imports the application with its hub
blocked, so the import counts against ``worker_timeout``, and the tests keep that short.

``slow`` logs ``slow call started`` when it begins, so a test reading the log knows the call is
in flight before it signals the process.
"""

from __future__ import annotations

import structlog
from service import Handler, testsvc_thrift

import kitegreen

log = structlog.get_logger("workers_target")


class LoggingHandler(Handler):
    """The test handler, telling the log when a slow call starts."""

    def slow(self, seconds: float, message: str) -> str:
        log.info("slow call started", seconds=seconds)
        return super().slow(seconds, message)


server = kitegreen.RpcServer(
    testsvc_thrift.TestService,
    LoggingHandler(),
    kitegreen.Config(service_name="workers-test", host="127.0.0.1", port=0, exit_wait_time=5.0),
)
