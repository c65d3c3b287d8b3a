"""A workers target whose ``echo`` leaks: each call keeps 256 KiB for good, as a slow leak in a
monolith would, for ``--max-worker-memory`` (``python -m kitegreen tests/leaking_target.py:server
-w 2 --max-worker-memory MIB``)."""

from __future__ import annotations

from service import LoggingHandler, testsvc_thrift

import kitegreen

LEAK = 256 * 1024
_kept: list[bytes] = []


class LeakingHandler(LoggingHandler):
    def echo(self, message: str) -> str:
        # Touched, not just reserved: the pages count in the resident set.
        _kept.append(b"x" * LEAK)
        return message


server = kitegreen.RpcServer(
    testsvc_thrift.TestService,
    LeakingHandler(),
    kitegreen.Config(service_name="workers-test", host="127.0.0.1", port=0, exit_wait_time=5.0),
)
