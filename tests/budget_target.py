"""A server for the memory-budget tests, run by the launcher so that its memory is its own:
``python -m kitegreen tests/budget_target.py:server`` (settings from its flags)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gevent
import thriftpy2

import kitegreen

budget_thrift = thriftpy2.load(
    str(Path(__file__).parent / "idl" / "budget.thrift"), module_name="budget_thrift"
)


class BudgetHandler:
    def ping(self) -> None:
        pass

    def count(self, items: list[Any]) -> int:
        return len(items)

    def hold(self, items: list[Any], seconds: float) -> int:
        gevent.sleep(seconds)
        return len(items)

    def total(self, values: list[int]) -> int:
        return sum(values) % 2**63

    def length(self, text: str) -> int:
        return len(text)

    def echo(self, items: list[Any]) -> list[Any]:
        return items


server = kitegreen.RpcServer(
    budget_thrift.Budget,
    BudgetHandler(),
    kitegreen.Config(service_name="budget-test", host="127.0.0.1", port=0, exit_wait_time=1.0),
)
