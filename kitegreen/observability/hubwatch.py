"""Detect a handler that blocks the gevent hub (CPU-bound work, an unpatched blocking call).

One blocked greenlet stalls every connection of the process, so it is reported with the stack
of the code that blocks. Two signals together, so that neither an overloaded-but-healthy loop
nor a busy connection is mistaken for a block:

- a heartbeat greenlet stamps the time every ``threshold / 4``; if the stamp is older than
  ``threshold``, no greenlet switch reached it: the loop is stalled or lagging;
- a native watchdog thread samples the hub thread's running frame; if the same greenlet (the
  same outermost frame) is running at every sample across the stall, that greenlet is blocking.
  A lagging loop shows different greenlets at different samples and is not reported.
- C code that holds the GIL throughout (thriftpy2's Cython decoder in a long loop) starves the
  watchdog thread too; the heartbeat then reports the stall, without a stack, once it runs.

A stall is not always a block: a process stopped (SIGSTOP, a debugger, a frozen cgroup) or not
given a CPU on a loaded machine stalls too, with whatever code happened to be running on the
stack. So a stall is blamed on code only with evidence that the process ran through it:

- the heartbeat path reports only when the hub thread used at least ``threshold`` of CPU time
  over the stall (``time.thread_time``): C code that held the GIL was running, not waiting;
- the watchdog confirms its suspect only over an interval in which it woke on time itself (a
  stopped or starved process wakes it late) and in which the hub thread either ran for at least
  a quarter of the interval (its CPU clock, ``pthread_getcpuclockid``) or sleeps in a call
  (``time.sleep``, an unpatched socket: state ``S`` or ``D`` in ``/proc``), not waiting to run
  (state ``R`` with no CPU time: starved).

A stall with no such evidence is reported to ``on_starved`` instead: the process did not run,
and no code of it is to blame. A blocking call made while holding the GIL (rare in C code)
looks like that too and is reported as starvation.

gevent's own monitor thread would also do this, but it installs a trace function that runs
on every greenlet switch, a cost on every request; this costs four wake-ups per threshold.
"""

from __future__ import annotations

import contextlib
import sys
import time
import traceback
from collections.abc import Callable
from types import FrameType
from typing import Any

import gevent
from gevent import monkey

from kitegreen.observability.reporter import HUB_BLOCKED, ReportGate

_start_thread = monkey.get_original("_thread", "start_new_thread")
_allocate_lock = monkey.get_original("_thread", "allocate_lock")
_get_ident = monkey.get_original("_thread", "get_ident")
_get_native_id = monkey.get_original("threading", "get_native_id")

STACK_LIMIT = 30
"""Frames of the blocking greenlet's stack kept in a report (innermost last)."""


class HubWatch:
    """Reports greenlets that keep the hub from running longer than ``threshold`` seconds.

    Args:
        threshold: seconds without a switch that count as blocking; must be > 0.
        on_block: called in the hub once the block ends, with the seconds it lasted and the
            formatted stack of the blocking code.
        on_starved: called in the hub after a stall of more than ``threshold`` in which the
            process did not run (stopped, or starved of CPU), with the seconds it lasted and
            the CPU seconds the hub thread used meanwhile; None: not told.
        progress: a count that moves each time the hub hands a greenlet new work (the
            engine's dispatches). A warm worker greenlet serves one request after another, so
            the same greenlet at two samples of a lagging loop is no block if the count moved.
    """

    def __init__(
        self,
        threshold: float,
        on_block: Callable[[float, list[str]], None],
        on_starved: Callable[[float, float], None] | None = None,
        *,
        progress: Callable[[], int] | None = None,
    ) -> None:
        self.threshold = threshold
        self._progress = progress or _no_progress
        self._on_block = on_block
        self._on_starved = on_starved
        self._beat = time.monotonic()
        self._beat_cpu = 0.0
        self._heart: gevent.Greenlet | None = None
        self._stop_lock: Any = None
        self._hub: Any = None
        self._hub_thread = 0
        self._sampled_beat = -1.0

    def start(self) -> None:
        """Start the heartbeat greenlet and the watchdog thread; idempotent."""
        if self._heart is not None:
            return
        self._hub = gevent.get_hub()
        self._hub_thread = _get_ident()
        self._beat = time.monotonic()
        self._beat_cpu = time.thread_time()
        self._heart = gevent.spawn(self._heartbeat)
        self._stop_lock = _allocate_lock()
        self._stop_lock.acquire()
        _start_thread(self._watch, (self._stop_lock, _get_native_id()))

    def stop(self) -> None:
        """Stop both; idempotent. The thread exits at its next wake-up."""
        if self._heart is None:
            return
        self._heart.kill(block=False)
        self._heart = None
        self._stop_lock.release()
        self._stop_lock = None

    def _heartbeat(self) -> None:
        interval = self.threshold / 4
        while True:
            now = time.monotonic()
            cpu = time.thread_time()
            stalled = now - self._beat
            if stalled > self.threshold + interval and self._sampled_beat != self._beat:
                # The watchdog did not report: either C code held the GIL the whole time (a
                # Cython decode loop, say), which ran on this thread's CPU clock, or the
                # process did not run at all (stopped, starved), which did not.
                ran = cpu - self._beat_cpu
                if ran >= self.threshold:
                    self._on_block(stalled, [])
                elif self._on_starved is not None:
                    self._on_starved(stalled, ran)
            self._beat = now
            self._beat_cpu = cpu
            gevent.sleep(interval)

    def _watch(self, stop_lock: Any, hub_native_id: int) -> None:
        """The watchdog thread. Never touches gevent objects but ``run_callback_threadsafe``."""
        interval = self.threshold / 4
        hub_run_code = type(self._hub).run.__code__
        hub = _ThreadState(self._hub_thread, hub_native_id)
        progress = self._progress
        suspect: tuple[int, int] | None = None
        reported: tuple[int, int] | None = None
        woke = time.monotonic()
        hub_cpu = hub.cpu()
        # acquire() returns True only once stop() releases the lock.
        while not stop_lock.acquire(True, interval):
            now = time.monotonic()
            since, woke = now - woke, now
            # Woken late: this thread did not run on time either, so neither did the process
            # (stopped, or starved of CPU). What the hub shows now proves nothing.
            on_time = since <= interval + self.threshold / 2
            hub_cpu, last_cpu = hub.cpu(), hub_cpu
            stalled = now - self._beat
            frame: FrameType | None = sys._current_frames().get(self._hub_thread)
            if frame is None:
                return  # the hub thread is gone
            root: FrameType | None = _outermost(frame)
            assert root is not None
            # The same greenlet on the same piece of work: its outermost frame and the count of
            # work handed out.
            root_id, at_rest = (id(root), progress()), root.f_code is hub_run_code
            # No frame may outlive the sample: a frame held here keeps the locals of a function
            # that has since returned alive (a request's arguments, say), and frees them in this
            # thread, at an unforeseen time, when the next sample replaces it.
            if stalled < self.threshold or at_rest:
                frame = root = None
                suspect = None
                reported = None
                continue
            if suspect != root_id or not on_time:
                # Stalled, but a different greenlet than at the last sample, or a sample that
                # proves nothing: wait and see.
                frame = root = None
                suspect = root_id
                continue
            if reported == root_id:
                frame = root = None
                continue
            if not hub.ran_or_slept(hub_cpu - last_cpu, since):
                frame = root = None
                continue  # the hub thread waited for a CPU: starved, not blocked
            reported = root_id
            stack = traceback.format_stack(frame, limit=STACK_LIMIT)
            frame = root = None
            beat = self._beat
            self._sampled_beat = beat
            self._hub.loop.run_callback_threadsafe(self._report, beat, stack)

    def _report(self, last_beat: float, stack: list[str]) -> None:
        # Runs in the hub after the block: now minus the last beat is how long it lasted.
        self._on_block(time.monotonic() - last_beat, stack)


class _ThreadState:
    """What the kernel says of the hub thread, read from the watchdog thread (Linux; where a
    source is missing every stall counts as a block, as before)."""

    def __init__(self, ident: int, native_id: int) -> None:
        self._clock: int | None = None
        with contextlib.suppress(AttributeError, OSError):
            self._clock = time.pthread_getcpuclockid(ident)
        self._stat = f"/proc/self/task/{native_id}/stat"

    def cpu(self) -> float:
        """The thread's CPU seconds (0.0 when unknown)."""
        if self._clock is None:
            return 0.0
        try:
            return time.clock_gettime(self._clock)
        except OSError:
            self._clock = None
            return 0.0

    def ran_or_slept(self, cpu: float, seconds: float) -> bool:
        """Whether, over the last ``seconds`` in which it used ``cpu`` seconds, the thread ran
        (a quarter of the time at least) or sleeps in a call now, rather than waited to run."""
        if self._clock is None or cpu >= seconds / 4:
            return True
        try:
            with open(self._stat, encoding="ascii") as stat:
                # The state follows the command's name, which may hold spaces and parentheses.
                state = stat.read().rpartition(")")[2].split()[0]
        except (OSError, IndexError):
            return True
        return state != "R"


def _no_progress() -> int:
    return 0


def _outermost(frame: FrameType) -> FrameType:
    while frame.f_back is not None:
        frame = frame.f_back
    return frame


def block_reporter(
    log: Any, reports: ReportGate, count: Callable[[], None]
) -> Callable[[float, list[str]], None]:
    """A :class:`HubWatch`'s ``on_block`` for one process: a warning with the stack, a count
    (``count``, the process's metric), a rate-limited report."""

    def on_block(seconds: float, stack: list[str]) -> None:
        where = (
            stack[-1].strip().splitlines()[0]
            if stack
            else "no stack: C code held the GIL throughout (decoding a very large message, say)"
        )
        log.warning("hub blocked", seconds=round(seconds, 3), where=where, stack="".join(stack))
        count()
        reports.report(HUB_BLOCKED, f"gevent hub blocked for {seconds:.3f}s at {where}")

    return on_block


def starvation_logger(log: Any) -> Callable[[float, float], None]:
    """A :class:`HubWatch`'s ``on_starved``: one info line, no count and no report."""

    def on_starved(seconds: float, cpu_seconds: float) -> None:
        # Not a warning and not a report: nothing in this process is at fault, and on a loaded
        # machine it would cry wolf (an idle server "blocked" in whatever code was running).
        log.info(
            "hub stalled: the process did not run",
            seconds=round(seconds, 3),
            cpu_seconds=round(cpu_seconds, 3),
            why="stopped (SIGSTOP, a debugger, a frozen cgroup) or not given a CPU; "
            "no code of this process blocked the hub",
        )

    return on_starved
