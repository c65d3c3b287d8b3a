"""Worker recycling: ``max_requests`` (+ ``max_requests_jitter``) and ``max_worker_memory``.

A worker that has answered its share of requests, or whose resident memory passed the limit,
asks the arbiter to retire it (``{"type": "retire"}`` on its control channel) and keeps
serving. The arbiter replaces it new-first: it starts a replacement, and only once that is
ready does it stop the retiring worker, so the instance never has fewer ready workers than
wanted. The retiring worker's stop hands each of its connections to a live worker at a message
boundary (``handoff.py``): keep-alive clients see no close.

gunicorn's meaning for the count: each worker retires after ``max_requests +
randint(0, max_requests_jitter)`` requests, drawn once per worker, so that workers started
together do not all retire at once. Unlike gunicorn, the worker is not stopped at once: it
serves on until its replacement is ready, so it may answer more than its count.
"""

from __future__ import annotations

import os
import random
import resource
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import gevent

from kitegreen.workers.process import READY, WorkerProcess

if TYPE_CHECKING:
    from kitegreen.config import Config
    from kitegreen.rpc.engine import Engine

MIB = 1024 * 1024


def request_limit(config: Config, rng: random.Random | None = None) -> int:
    """This worker's request count before it retires (0: never): ``max_requests`` plus a
    random ``0..max_requests_jitter``."""
    if not config.max_requests:
        return 0
    jitter = config.max_requests_jitter
    return config.max_requests + ((rng or random).randint(0, jitter) if jitter else 0)


def resident_bytes() -> int:
    """This process's resident memory now (``/proc/self/statm``); where there is none, its
    peak (``ru_maxrss``), which only grows, so a limit still trips once passed."""
    try:
        with open("/proc/self/statm", "rb") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024


class Recycler:
    """Decides when one worker retires, and says so once.

    Args:
        config: the worker's settings (``max_requests``, ``max_requests_jitter``,
            ``max_worker_memory``).
        retire: called once with the reason and its figures (the worker tells the arbiter).
        interval: seconds between two memory checks (the heartbeat's interval).
        rss: returns the resident memory in bytes (injectable for tests).
    """

    def __init__(
        self,
        config: Config,
        retire: Callable[..., object],
        interval: float,
        *,
        rss: Callable[[], int] = resident_bytes,
    ) -> None:
        self.request_limit = request_limit(config)
        self.memory_limit = config.max_worker_memory * MIB
        self.interval = interval
        self._retire = retire
        self._rss = rss
        self.retiring: str | None = None
        """Why this worker asked to retire; None until it did."""
        self._greenlet: gevent.Greenlet | None = None

    def start(self, engine: Engine) -> None:
        """Count ``engine``'s requests and watch the memory; idempotent."""
        if self.request_limit:
            engine.retire_after(
                self.request_limit,
                lambda: self.request("max_requests", requests=self.request_limit),
            )
        if self.memory_limit and self._greenlet is None:
            self._greenlet = gevent.spawn(self._watch)

    def stop(self) -> None:
        """Stop watching the memory; idempotent."""
        greenlet, self._greenlet = self._greenlet, None
        if greenlet is not None:
            greenlet.kill(block=False)

    def check_memory(self) -> bool:
        """Ask to retire if the resident memory passed the limit; whether it has."""
        rss = self._rss()
        if self.memory_limit and rss > self.memory_limit:
            self.request("max_worker_memory", rss_mib=round(rss / MIB, 1))
            return True
        return False

    def request(self, reason: str, **figures: Any) -> None:
        """Ask to retire, once."""
        if self.retiring is None:
            self.retiring = reason
            self._retire(reason, **figures)

    def _watch(self) -> None:
        while self.retiring is None:
            gevent.sleep(self.interval)
            self.check_memory()


def plan_recycling(
    retiring: Sequence[WorkerProcess],
    fresh: Sequence[WorkerProcess],
    live: Sequence[WorkerProcess],
    wanted: int,
) -> tuple[int, list[WorkerProcess]]:
    """The arbiter's next step with workers retiring: how many to spawn, which to stop.

    New first: a replacement is spawned for each retiring worker, and a retiring worker is
    stopped only while the workers ready without it still number ``wanted``.

    Args:
        retiring: the live workers that asked to be recycled, oldest first.
        fresh: the live workers that did not.
        live: every live worker (booting or ready).
        wanted: the number of workers wanted.

    Returns:
        ``(spawn, stop)``: workers to spawn, workers to stop (oldest first).
    """
    ready = sum(1 for w in live if w.state == READY)
    stop = []
    for worker in retiring:
        if worker.state != READY:
            continue
        if ready - 1 < wanted:
            break
        stop.append(worker)
        ready -= 1
    return max(wanted - len(fresh), 0), stop
