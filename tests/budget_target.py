"""A server for the memory-budget tests, run by the launcher so that its memory is its own:
``python -m kitegreen tests/budget_target.py:server`` (settings from its flags)."""

from __future__ import annotations

import gc
from pathlib import Path
from typing import Any

import gevent
import thriftpy2

import kitegreen

budget_thrift = thriftpy2.load(
    str(Path(__file__).parent / "idl" / "budget.thrift"), module_name="budget_thrift"
)


class BudgetHandler:
    def __init__(self) -> None:
        self.prepared: list[Any] = []
        self.holds = 0
        self.index: dict[int, Any] = {}

    def ping(self) -> None:
        pass

    def count(self, items: list[Any]) -> int:
        return len(items)

    def hold(self, items: list[Any], seconds: float) -> int:
        self.holds += 1
        try:
            gevent.sleep(seconds)
        finally:
            self.holds -= 1
        return len(items)

    def holding(self) -> int:
        return self.holds

    def total(self, values: list[int]) -> int:
        return sum(values) % 2**63

    def length(self, text: str) -> int:
        return len(text)

    def echo(self, items: list[Any]) -> list[Any]:
        return items

    def prepare(self, count: int) -> None:
        # In slices, so that building them does not stop the pings a test measures around.
        small = budget_thrift.Small
        self.prepared, self.index = [], {}
        for begin in range(0, count, 10_000):
            made = [small(id=i) for i in range(begin, min(begin + 10_000, count))]
            self.prepared.extend(made)
            self.index.update(zip(range(begin, begin + len(made)), made, strict=True))
            gevent.sleep(0)
        # Long-lived from now on, as an application's caches are: out of the collector's way,
        # so that the pings measure the encoder, not a full collection traversing them.
        gc.freeze()

    def bundle(self, shape: str) -> Any:
        if shape == "list":
            return budget_thrift.Bundle(items=self.prepared)
        return budget_thrift.Bundle(index=self.index)


server = kitegreen.RpcServer(
    budget_thrift.Budget,
    BudgetHandler(),
    kitegreen.Config(service_name="budget-test", host="127.0.0.1", port=0, exit_wait_time=1.0),
)
