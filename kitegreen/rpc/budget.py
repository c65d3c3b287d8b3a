"""What requests may cost in memory and in hub time: the per-process memory budget and the lane
that decodes large messages off the hub.

A message's size says little about what decoding it costs: one wire byte (an empty struct) is
one Python object of about 80 bytes. The codec estimates the cost of every object before it
builds it and stops as soon as the estimate passes the allowance it was given
(``read_args_within``); this module decides the allowance and keeps the account.

* **Per message**: at most ``max_message_memory``, a zlib-inflated payload included. Past it the
  request is answered ``PROTOCOL_ERROR`` naming the setting.
* **Per process**: the requests in flight hold their cost until they are done (reply sent,
  arguments freed), and together at most ``max_inflight_memory``. A request whose cost would
  pass what is left is refused with ``LOADSHEDDING`` (fbthrift's overload answer, which clients
  retry), not queued: a queue of decoded requests is the memory this bounds. So N connections
  cannot multiply ``max_message_memory``.
* **Hub time**: a large message would stop every connection while it is decoded, while its reply
  is encoded and while its arguments are freed. A message over :data:`OFFLOAD_SIZE` bytes is
  decoded in gevent's threadpool, one at a time per process (:class:`DecodeLane`), by a decoder
  that lets go of the GIL every :data:`SLICE` objects; a reply of more than
  :data:`ENCODE_ON_HUB` values is encoded there too, letting go of the GIL as often
  (:func:`encode`); large arguments are freed a slice at a time (:func:`release`). Waiting
  for the lane is bounded by the caller's deadline or ``read_write_timeout``; one decode at a
  time also means at most one partly built message.

Why a thread and not a resumable decoder (a C decoder with an explicit stack that returns to
the hub every N objects): the recursive decoder stays as it is, the change is a counter and a
release point, and it meets the target (another connection waited at most ~40-60 ms while 1M
structs were decoded and echoed, on a loaded 2-core machine; 324 ms before). Python code that a
struct class runs when it is built (a custom ``__init__`` or ``__setattr__``) runs in the
worker thread for such a message.
"""

from __future__ import annotations

import gc
import sys
from collections.abc import Callable
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


def _decode_into(into: list[Any], args: tuple[Any, ...]) -> None:
    """In a worker thread: the result goes into ``into``, not back through the threadpool,
    whose worker may hold on to a returned value until its next task, and the caller must be
    the arguments' only holder to let go of them piecemeal."""
    into.append(_read_args_within(*args))


def pause() -> None:
    """Let the hub run a whole loop iteration: poll the sockets, fire timers. ``sleep(0)``
    only queues this greenlet behind the others ready to run, and gevent runs up to 50 such
    callbacks between polls: 40 ms without a poll when each slice takes 0.8 ms."""
    gevent.sleep(0.0001)


class MemoryBudget:
    """The memory the requests in flight in one process hold, against two limits.

    The request loop does what :meth:`allowance`, :meth:`hold` and :meth:`release` do inline
    for each message it decodes on the hub (three method calls a request cost ~1,200
    instructions): keep these three the reference, and the loop's copy in step with them.

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
        # Per request: comparisons, not min()/max(), which parse keyword arguments on each
        # call (~1,900 instructions a request for the pair under cachegrind, Python 3.11).
        allowance = self.per_message - spent
        left = self.total - self.held
        if left < allowance:  # noqa: PLR1730 - min() costs ~850 instructions here
            allowance = left
        return allowance if allowance > 0 else 0

    def limited_by_process(self, spent: int = 0) -> bool:
        """Whether :meth:`allowance` is the process's limit rather than the message's."""
        return self.total - self.held < self.per_message - spent

    def hold(self, cost: int) -> None:
        self.held += cost

    def release(self, cost: int) -> None:
        self.held -= cost


class DecodeLane:
    """Decodes large messages in gevent's threadpool, one at a time, and keeps what they build
    from the cyclic GC until the request is done with it.

    Why the GC: a decode builds ~1M objects, all in the youngest generation; the first
    collection after it traverses them all (~230 ms for 1M small structs, with no point where
    another greenlet runs). So the collector is off during the decode (decoding never makes a
    cycle), and once it is done the new objects are moved out of the generations with
    ``gc.freeze()``; :meth:`thaw` puts them back (``gc.unfreeze()``) once no large request is
    in flight, by which time they are mostly freed. An application that froze objects itself
    (``gc.freeze()`` before forking) keeps them frozen: the lane then never unfreezes.
    """

    __slots__ = ("_frozen", "_turn", "_unfreeze")

    def __init__(self) -> None:
        self._turn = Semaphore(1)
        self._frozen = 0
        """Requests whose decoded objects are frozen."""
        self._unfreeze = True

    def thaw(self) -> None:
        """A request decoded here is done with its arguments."""
        self._frozen -= 1
        if self._frozen == 0 and self._unfreeze:
            gc.unfreeze()

    def read_args(
        self,
        budget: MemoryBudget,
        spent: int,
        wait: float,
        args: tuple[int, Any, int, int, Any],
    ) -> tuple[tuple[Any, ...], int] | None:
        """Decode ``read_args`` arguments within what ``budget`` allows once it is this
        message's turn; None if the turn did not come within ``wait`` seconds. Once it
        returns arguments, call :meth:`thaw` when the request is done with them."""
        if not self._turn.acquire(timeout=wait):
            return None
        collecting = gc.isenabled()
        gc.disable()
        try:
            allowance = budget.allowance(spent)
            into: list[tuple[tuple[Any, ...], int]] = []
            gevent.get_hub().threadpool.apply(_decode_into, (into, (*args, allowance, SLICE)))
            decoded = into.pop()
            if self._frozen == 0:
                self._unfreeze = gc.get_freeze_count() == 0
            self._frozen += 1
            gc.freeze()
            return decoded
        finally:
            if collecting:
                gc.enable()
            self._turn.release()


RELEASE_COST = 1024 * 1024
"""Arguments estimated over this many bytes are let go of piecemeal (:func:`release`)."""
ENCODE_ON_HUB = 16 * 1024
"""Values a reply may hold to be encoded on the hub: about 1 ms of the costliest shape (small
structs, a value per struct and per field). A larger reply is encoded again in the threadpool;
what the first try spent is the price of not counting values before encoding them."""

_release = _thrift.release
_EncodeBudgetExceeded = _thrift.EncodeBudgetExceeded
_NO_LIMIT = sys.maxsize


def release(holder: list[Any]) -> None:
    """Let go of what ``holder`` holds a slice at a time, yielding to the hub between slices:
    freeing 1M decoded structs at once stops the process for ~140 ms. Put the only reference
    in ``holder`` (what is shared elsewhere is only let go of, not taken apart)."""
    while not _release(holder, SLICE):
        pause()


EncodeBudgetExceeded = _thrift.EncodeBudgetExceeded


def _encode_into(into: list[bytes], write: Callable[..., bytes], args: tuple[Any, ...]) -> None:
    """In a worker thread: see :func:`_decode_into`."""
    into.append(write(*args, _NO_LIMIT, SLICE))


def encode(write: Callable[..., bytes], *args: Any) -> bytes:
    """``write(*args)`` (the codec's ``write_message`` or ``write_result``), its bytes, without
    stopping the hub for long whatever the reply's shape: on the hub if it holds at most
    :data:`ENCODE_ON_HUB` values, otherwise in gevent's threadpool, by an encoder that lets go
    of the GIL every :data:`SLICE` values. Python code a value runs while encoded (a property
    of a struct, a set's ``__iter__``) then runs in the worker thread.

    The request loop makes the first try itself, ``write(*args, ENCODE_ON_HUB, 0)``, and calls
    :func:`encode_off_hub` on :class:`EncodeBudgetExceeded`: the same without this function's
    frame and ``*args`` list per reply (with ``_encode`` called positionally, ~1,900
    instructions less a request under cachegrind, Python 3.11)."""
    try:
        return write(*args, ENCODE_ON_HUB, 0)
    except _EncodeBudgetExceeded:
        pass
    return encode_off_hub(write, args)


def encode_off_hub(write: Callable[..., bytes], args: tuple[Any, ...]) -> bytes:
    """``write(*args)`` in gevent's threadpool (see :func:`encode`): for a reply found to hold
    more than :data:`ENCODE_ON_HUB` values."""
    into: list[bytes] = []
    gevent.get_hub().threadpool.apply(_encode_into, (into, write, args))
    return into.pop()
