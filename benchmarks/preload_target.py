"""A target whose import allocates ``PRELOAD_MB`` MB (200 by default), for ``--preload``'s
measurement (``benchmarks/preload_memory.py``) and test (``tests/test_preload.py``).

    python -m kitegreen benchmarks/preload_target.py:server -w 4 [--preload]

The memory is a bytearray written page by page, so that it is resident (not merely reserved)
in whichever process imports this module. Each import appends the importing pid to the file
``PRELOAD_IMPORTS`` names, if set. ``echo`` answers ``TAG + message``: a test edits ``TAG`` to
see which code serves.
"""

from __future__ import annotations

import os
from pathlib import Path

import thriftpy2

import kitegreen

TAG = "v1:"
PAGE = 4096
MB = 1024 * 1024

BALLAST = bytearray(int(os.environ.get("PRELOAD_MB", "200")) * MB)
for _offset in range(0, len(BALLAST), PAGE):
    BALLAST[_offset] = 1

if os.environ.get("PRELOAD_IMPORTS"):
    with open(os.environ["PRELOAD_IMPORTS"], "a") as _imports:
        _imports.write(f"{os.getpid()}\n")

bench_thrift = thriftpy2.load(
    str(Path(__file__).with_name("bench.thrift")), module_name="preload_bench_thrift"
)


class Handler:
    """Implements the benchmarks' service."""

    def ping(self) -> None:
        return None

    def echo(self, msg: str) -> str:
        return TAG + msg

    def records(self, records: list[object]) -> list[object]:
        return records


server = kitegreen.RpcServer(
    bench_thrift.Bench,
    Handler(),
    kitegreen.Config(service_name="preload", host="127.0.0.1", port=0, exit_wait_time=2.0),
)
