"""A server for the workers' tests: ``python -m kitegreen tests/workers_target.py:server -w 2``.

It imports quickly (no pytest, no conftest): a worker imports the application with its hub
blocked, so the import counts against ``worker_timeout``, and the tests keep that short.
"""

from __future__ import annotations

from service import LoggingHandler, testsvc_thrift

import kitegreen

server = kitegreen.RpcServer(
    testsvc_thrift.TestService,
    LoggingHandler(),
    kitegreen.Config(service_name="workers-test", host="127.0.0.1", port=0, exit_wait_time=5.0),
)
