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

gevent's own monitor thread would also do this, but it installs a trace function that runs
on every greenlet switch, a cost on every request; this costs four wake-ups per threshold.
"""

from __future__ import annotations

import sys
import time
import traceback
from collections.abc import Callable
from types import FrameType
from typing import Any

import gevent
from gevent import monkey

_start_thread = monkey.get_original("_thread", "start_new_thread")
_allocate_lock = monkey.get_original("_thread", "allocate_lock")
_get_ident = monkey.get_original("_thread", "get_ident")

STACK_LIMIT = 30
"""Frames of the blocking greenlet's stack kept in a report (innermost last)."""


class HubWatch:
    """Reports greenlets that keep the hub from running longer than ``threshold`` seconds.

    Args:
        threshold: seconds without a switch that count as blocking; must be > 0.
        on_block: called in the hub once the block ends, with the seconds it lasted and the
            formatted stack of the blocking code.
    """

    def __init__(self, threshold: float, on_block: Callable[[float, list[str]], None]) -> None:
        self.threshold = threshold
        self._on_block = on_block
        self._beat = time.monotonic()
        self._heart: gevent.Greenlet | None = None
        self._stop_lock: Any = None
        self._hub: Any = None
        self._hub_thread = 0
        self._sampled_beat = -1.0
        self.blocks = 0
        """Blocks reported so far."""

    def start(self) -> None:
        """Start the heartbeat greenlet and the watchdog thread; idempotent."""
        if self._heart is not None:
            return
        self._hub = gevent.get_hub()
        self._hub_thread = _get_ident()
        self._beat = time.monotonic()
        self._heart = gevent.spawn(self._heartbeat)
        self._stop_lock = _allocate_lock()
        self._stop_lock.acquire()
        _start_thread(self._watch, (self._stop_lock,))

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
            stalled = now - self._beat
            if stalled > self.threshold + interval and self._sampled_beat != self._beat:
                # The watchdog could not take a sample: C code held the GIL the whole time
                # (a Cython decode loop, say). Report the stall without a stack.
                self.blocks += 1
                self._on_block(stalled, [])
            self._beat = now
            gevent.sleep(interval)

    def _watch(self, stop_lock: Any) -> None:
        """The watchdog thread. Never touches gevent objects but ``run_callback_threadsafe``."""
        interval = self.threshold / 4
        hub_run_code = type(self._hub).run.__code__
        suspect: int | None = None
        reported: int | None = None
        # acquire() returns True only once stop() releases the lock.
        while not stop_lock.acquire(True, interval):
            stalled = time.monotonic() - self._beat
            frame: FrameType | None = sys._current_frames().get(self._hub_thread)
            if frame is None:
                return  # the hub thread is gone
            root: FrameType | None = _outermost(frame)
            assert root is not None
            root_id, at_rest = id(root), root.f_code is hub_run_code
            # No frame may outlive the sample: a frame held here keeps the locals of a function
            # that has since returned alive (a request's arguments, say), and frees them in this
            # thread, at an unforeseen time, when the next sample replaces it.
            if stalled < self.threshold or at_rest:
                frame = root = None
                suspect = None
                reported = None
                continue
            stack = traceback.format_stack(frame, limit=STACK_LIMIT)
            frame = root = None
            if suspect != root_id:
                # Stalled, but a different greenlet than at the last sample: wait and see.
                suspect = root_id
                continue
            if reported == root_id:
                continue
            reported = root_id
            self.blocks += 1
            beat = self._beat
            self._sampled_beat = beat
            self._hub.loop.run_callback_threadsafe(self._report, beat, stack)

    def _report(self, last_beat: float, stack: list[str]) -> None:
        # Runs in the hub after the block: now minus the last beat is how long it lasted.
        self._on_block(time.monotonic() - last_beat, stack)


def _outermost(frame: FrameType) -> FrameType:
    while frame.f_back is not None:
        frame = frame.f_back
    return frame
