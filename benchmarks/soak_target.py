"""The server ``soak.py`` hammers: ``python -m kitegreen benchmarks/soak_target.py:make_server``.

It serves the test suite's ``TestService`` (``tests/idl/testsvc.thrift``: strings, binary,
nested structs, containers, declared and undeclared exceptions, a result that does not match
the IDL, oneway) so that well-behaved clients and fuzzers reach every decoding path. Handler
calls that could sleep or spin for a caller-chosen time are capped: a fuzzer that happens to
turn a call into ``slow(1e300)`` measures the handler, not the server.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from service import Handler, testsvc_thrift

MAX_HANDLER_SECONDS = 0.05


def load_testsvc() -> Any:
    """The thriftpy2 module of the test IDL."""
    return testsvc_thrift


def make_server() -> Any:
    """The server: loopback, an ephemeral port, the debug server on an ephemeral port.

    The soak script's flags (read_write_timeout, limits, log level) override these.
    """
    import kitegreen

    return kitegreen.RpcServer(
        testsvc_thrift.TestService,
        Handler(max_seconds=MAX_HANDLER_SECONDS),
        kitegreen.Config(
            service_name="soak", host="127.0.0.1", port=0, enable_debug_server=True, debug_port=0
        ),
    )
