"""The arbiter's handle on one worker process: its pid, channel, board slot and stack file."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from dataclasses import dataclass, field
from typing import IO, Any

from kitegreen.workers.board import Slot
from kitegreen.workers.control import Channel

BOOTING = "booting"
READY = "ready"
STOPPING = "stopping"
EXITED = "exited"

MAX_STACK = 256 * 1024
"""Bytes of a worker's stack dump read back; faulthandler's dumps are a few KB."""


@dataclass(eq=False)
class WorkerProcess:
    """One worker as the arbiter sees it.

    Attributes:
        pid: the process ID.
        age: the spawn sequence number (1 for the first worker ever spawned): a reload
            stops the old generation's oldest first (TTOU stops the highest ``rank``).
        generation: the reload generation it was spawned in (0 until the first SIGHUP).
        channel: the arbiter's end of its control channel.
        slot: its slot on the board (its heartbeat, connections, accepting).
        stack_file: where its watchdog writes its stacks before it ends the worker.
        rank: its number among the instance's workers, 0 to N-1, which its replacement takes
            over: the ``worker`` label of its metrics (its board slot cannot be that: a
            replacement runs beside the worker it replaces).
        spawned_at: monotonic time of the fork.
        ready_at: monotonic time its engine started accepting; None until then
            (:meth:`mark_ready`).
        stop_requested: the arbiter asked it to stop (an exit is then expected).
        retiring: why it asked to be recycled (``max_requests``, ``max_worker_memory``);
            None if it did not. It serves on until a replacement is ready.
        timed_out: its watchdog ended it, or the arbiter killed it, for a stale heartbeat
            (:meth:`mark_timed_out`).
        exited: it has exited and been reaped (by the hub, before the arbiter handles the
            exit): its pid may belong to another process already (:meth:`mark_reaped`).
        exit_status: its wait status once reaped (:meth:`mark_exited`, see
            :meth:`describe_exit`).

    The attributes are read by others and written only by the methods here.
    """

    pid: int
    age: int
    generation: int
    channel: Channel
    slot: Slot
    stack_file: IO[bytes]
    rank: int = 0
    spawned_at: float = field(default_factory=time.monotonic)
    ready_at: float | None = None
    stop_requested: bool = False
    retiring: str | None = None
    timed_out: bool = False
    exited: bool = False
    exit_status: int | None = None

    @property
    def state(self) -> str:
        """``booting``, ``ready``, ``stopping`` or ``exited``."""
        if self.exited:
            return EXITED
        if self.stop_requested or self.timed_out:
            return STOPPING
        return READY if self.ready_at is not None else BOOTING

    @property
    def live(self) -> bool:
        """Booting or ready: neither asked to stop, nor timed out, nor exited."""
        return self.state in (BOOTING, READY)

    def mark_ready(self) -> bool:
        """It said it is ready: record when. False (and nothing recorded) if it has exited or
        was ready already."""
        if self.exited or self.ready_at is not None:
            return False
        self.ready_at = time.monotonic()
        return True

    def mark_retiring(self, reason: str) -> bool:
        """It asked to be recycled; False (nothing recorded) if it is not live or asked
        already."""
        if not self.live or self.retiring is not None:
            return False
        self.retiring = reason
        return True

    def mark_reaped(self) -> None:
        """The hub reaped it: its pid may belong to another process from now on, so nothing
        may signal it any more (its exit status comes with :meth:`mark_exited`)."""
        self.exited = True

    def mark_exited(self, status: int) -> None:
        """Record its wait ``status``; it has exited."""
        self.exit_status = status
        self.exited = True

    def mark_timed_out(self) -> None:
        """Its hub stopped running for ``worker_timeout`` (its watchdog ended it, or the
        arbiter is about to kill it)."""
        self.timed_out = True

    def send_signal(self, signum: signal.Signals) -> bool:
        """Send ``signum``; False if the process is already gone (then nothing is sent: once
        reaped, its pid may have been given to another process)."""
        if self.exited:
            return False
        try:
            os.kill(self.pid, signum)
        except ProcessLookupError:
            return False
        return True

    def stop(self, *, graceful: bool = True, hand_off: bool = False) -> None:
        """Ask it to stop over its control channel: gracefully (it drains its connections, as
        on SIGTERM) or at once (it cuts them off, as on SIGQUIT). With ``hand_off`` its
        connections go to the other workers rather than end (``handoff.py``). A channel
        already closed falls back on the signal."""
        self.stop_requested = True
        message: dict[str, Any] = {"type": "stop", "graceful": graceful}
        if hand_off:
            message["hand_off"] = True
        if not self.channel.send(message):
            self.send_signal(signal.SIGTERM if graceful else signal.SIGQUIT)

    def read_stack(self) -> str:
        """What its watchdog wrote; empty unless the watchdog ended it."""
        with contextlib.suppress(OSError, ValueError):
            return os.pread(self.stack_file.fileno(), MAX_STACK, 0).decode("utf-8", "replace")
        return ""

    def describe_exit(self) -> str:
        """Its exit status in words: ``exit 0``, ``killed by SIGKILL``."""
        status = self.exit_status
        if status is None:
            return "running"
        if os.WIFSIGNALED(status):
            return f"killed by {_signal_name(os.WTERMSIG(status))}"
        return f"exit {os.WEXITSTATUS(status)}"

    @property
    def exit_code(self) -> int | None:
        """The exit code, or None if it was killed by a signal or has not exited."""
        status = self.exit_status
        if status is None or not os.WIFEXITED(status):
            return None
        return os.WEXITSTATUS(status)

    def close(self) -> None:
        """Release the channel and the stack file (once reaped; the arbiter clears the board
        slot as soon as it hears of the exit, for the next spawn to take)."""
        self.channel.close()
        self.stack_file.close()

    def as_dict(self, now: float) -> dict[str, Any]:
        """For /runtime/kite."""
        return {
            "pid": self.pid,
            "worker": self.rank,
            "age": self.age,
            "generation": self.generation,
            "state": self.state,
            "retiring": self.retiring,
            "up_seconds": round(now - self.spawned_at, 3),
            "heartbeat_age": round(self.slot.age(now), 3),
        }


def _signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"
