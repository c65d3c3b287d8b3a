"""Sharing new connections out evenly among workers that accept from one listener.

Every worker waits on the shared listening socket and the kernel wakes all of them for each
new connection; whichever runs first takes it. A worker that has just accepted is already on a
CPU and back in its loop first, so in a burst of connections (a client's pool opening, a load
balancer reconnecting) one worker takes most of them, even with gevent's ``max_accept`` at 1.
Connections are long-lived in Thrift, so connections taken are load taken: in the README's
measurements one worker of four took 64% of a burst with ``max_accept`` 1, and with gevent's
default a worker was left with none of the load generator's 50 connections in every round.

So before each accept a worker compares its open connections with those of the least loaded
other worker that is accepting and alive (its heartbeat is fresh), as read from the board; if it
has more than :data:`SLACK` over that, it leaves the listener to the others for :data:`DEFER`
seconds and then accepts at least one connection before it looks again (nginx's
``accept_disabled`` is the same idea). With the gate no worker of four took over 26% of it. The cost
is bounded: a worker never stops accepting for more than :data:`DEFER` at a time, so if the
others cannot take the connections (blocked, but their heartbeat not yet stale) it still accepts
one every :data:`DEFER` seconds; short-lived connections keep every count near zero and never
trigger it.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from kitegreen.workers.board import Board, Slot

SLACK = 2
"""Connections a worker may have over the least loaded other worker before it defers."""
DEFER = 0.002
"""Seconds a worker leaves the listener to the others when it has more than its share."""


class AcceptBalance:
    """The accept gate of one worker (``RpcServer.start(accept_gate=...)``).

    Args:
        board: the instance's board.
        slot: this worker's slot.
        open_connections: returns this worker's open connections now.
        stale_after: seconds after which another worker's heartbeat counts as stopped.
        clock: a monotonic clock.
    """

    def __init__(
        self,
        board: Board,
        slot: Slot,
        open_connections: Callable[[], int],
        stale_after: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._board = board
        self._slot = slot
        self._open = open_connections
        self._stale_after = stale_after
        self._clock = clock
        self._deferred = False

    def __call__(self) -> float:
        """Seconds to wait before accepting; 0 to accept now."""
        mine = self._open()
        self._slot.set_open(mine)
        if self._deferred:
            self._deferred = False
            return 0.0
        fewest = self.fewest_elsewhere()
        if fewest is not None and mine > fewest + SLACK:
            self._deferred = True
            return DEFER
        return 0.0

    def fewest_elsewhere(self) -> int | None:
        """The fewest connections open in another accepting, live worker; None if none is."""
        return self._board.fewest_open(self._slot.index, self._clock(), self._stale_after)
