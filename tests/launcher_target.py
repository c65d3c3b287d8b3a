"""A server for the launcher tests: ``python -m kitegreen tests/launcher_target.py:server``."""

from __future__ import annotations

from service import LoggingHandler, testsvc_thrift

import kitegreen

server = kitegreen.RpcServer(
    testsvc_thrift.TestService,
    LoggingHandler(),
    kitegreen.Config(service_name="launcher-test", host="127.0.0.1", port=0, exit_wait_time=5.0),
)
