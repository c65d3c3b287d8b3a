"""What requests may cost in memory and in hub time: the per-process memory budget and the lane
that decodes large messages off the hub.

A message's size says little about what decoding it costs: one wire byte (an empty struct) is
one Python object of about 80 bytes. The codec estimates the cost of every object before it
builds it and stops as soon as the estimate passes the allowance it was given
(``read_args_within``); this module decides the allowance and keeps the account.

* **Per message**: at most ``max_message_memory``, a zlib-inflated payload included. Past it the
  request is answered ``PROTOCOL_ERROR`` naming the setting.
* **Per process**: the requests in flight (decoded, being handled, answered) hold their cost
  until their reply is sent, and together at most ``max_inflight_memory``. A request whose cost
  would pass what is left is refused with ``LOADSHEDDING`` (fbthrift's overload answer, which
  clients retry), not queued: a queue of decoded requests is the memory this bounds. So N
  connections cannot multiply ``max_message_memory``.
* **Hub time**: a message over :data:`OFFLOAD_SIZE` bytes is decoded in gevent's threadpool,
  one at a time per process (:class:`DecodeLane`), by a decoder that lets go of the GIL every
  :data:`SLICE` objects, so the hub's thread keeps serving other connections. Waiting for the
  lane is bounded by ``read_write_timeout`` (or the caller's deadline); one at a time also means
  at most one partly built message counts against the budget at once.

Why threads and not a resumable decoder (a C decoder with an explicit stack that returns to the
hub every N objects): the recursive decoder stays as it is, the change is a counter and two
macro calls, and the hub waited at most a few ms either way (CPython hands the GIL over within
its 5 ms switch interval once the decoder releases it).
"""

from __future__ import annotations

from typing import Any

import gevent
from gevent.lock import Semaphore

from kitegreen.codec import _thrift

OFFLOAD_SIZE = 128 * 1024
"""Messages over this many bytes are decoded off the hub. 128 KiB of the worst shape (empty
structs, one per byte) take about 10 ms to decode; a thread hand-off costs ~100 us."""
SLICE = 4096
"""Objects decoded between two releases of the GIL: about 0.3 ms of work."""

_read_args_within = _thrift.read_args_within


class MemoryBudget:
    """The memory the requests in flight in one process hold, against two limits.

    Args:
        per_message: ``max_message_memory``.
        total: ``max_inflight_memory``.
    """

    __slots__ = ("held", "per_message", "total")

    def __init__(self, per_message: int, total: int) -> None:
        self.per_message = per_message
        self.total = total
        self.held = 0
        """Bytes (estimated) held by requests in flight."""

    def allowance(self, spent: int = 0) -> int:
        """What one more message may take, ``spent`` of it already held: its own limit, and no
        more than the process has left."""
        return max(0, min(self.per_message - spent, self.total - self.held))

    def limited_by_process(self, spent: int = 0) -> bool:
        """Whether :meth:`allowance` is the process's limit rather than the message's."""
        return self.total - self.held < self.per_message - spent

    def hold(self, cost: int) -> None:
        self.held += cost

    def release(self, cost: int) -> None:
        self.held -= cost


class DecodeLane:
    """Decodes large messages in gevent's threadpool, one at a time."""

    __slots__ = ("_turn",)

    def __init__(self) -> None:
        self._turn = Semaphore(1)

    def read_args(
        self,
        budget: MemoryBudget,
        spent: int,
        wait: float,
        args: tuple[int, Any, int, int, Any],
    ) -> tuple[tuple[Any, ...], int] | None:
        """Decode ``read_args`` arguments within what ``budget`` allows once it is this
        message's turn; None if the turn did not come within ``wait`` seconds."""
        if not self._turn.acquire(timeout=wait):
            return None
        try:
            allowance = budget.allowance(spent)
            return gevent.get_hub().threadpool.apply(  # type: ignore[no-any-return]
                _read_args_within, (*args, allowance, SLICE)
            )
        finally:
            self._turn.release()
