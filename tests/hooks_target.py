"""A server whose hooks are given in code, as callables on its Config (``tests/hooks_record.py``
records each); run as ``python -m kitegreen tests/hooks_target.py:server [-w 2]``."""

from __future__ import annotations

import hooks_record
from service import LoggingHandler, testsvc_thrift

import kitegreen

server = kitegreen.RpcServer(
    testsvc_thrift.TestService,
    LoggingHandler(),
    kitegreen.Config(
        service_name="hooks-test",
        host="127.0.0.1",
        port=0,
        exit_wait_time=5.0,
        on_starting=hooks_record.on_starting,
        post_fork=hooks_record.post_fork,
        post_worker_init=hooks_record.post_worker_init,
        when_ready=hooks_record.when_ready,
        on_reload=hooks_record.on_reload,
        worker_exit=hooks_record.worker_exit,
        on_exit=hooks_record.on_exit,
    ),
)
