"""The control channel between the arbiter and one worker: JSON objects, one a line, over a
``socketpair`` made before the fork.

What travels on it (signals carry the rest: SIGUSR1 for the stacks):

=================  ==================================  ==========================================
from               message                             what for
=================  ==================================  ==========================================
worker             ``{"type": "ready"}``               the server accepts; the arbiter counts it
arbiter            ``{"type": "stats", "id": n}``      a scrape of /metrics or /runtime/kite
worker             ``{"reply_to": n, "seq": m, ...}``  counters, histograms, gauges, overload
                                                       figures, numbered by the worker (the
                                                       arbiter keeps the newest)
arbiter            ``{"type": "limits", ...}``         this worker's share of the instance's
                                                       limits
worker             ``{"type": "retire", ...}``         recycle me (``reason``: ``max_requests``
                                                       or ``max_worker_memory``, and figures);
                                                       it serves on until told to stop
arbiter            ``{"type": "stop", ...}``           stop, draining (as on SIGTERM) or not
                                                       (``"graceful": false``, as on SIGQUIT);
                                                       ``"hand_off": true``: hand connections
                                                       to the other workers (``handoff.py``)
worker             ``{"type": "final", ...}``          its last figures (numbered too), once
                                                       stopped, so that the instance's counters
                                                       never go backwards
=================  ==================================  ==========================================

A channel that reads end-of-stream tells its owner: for a worker that means its arbiter is
gone (the worker holds the only other end, see ``fork.py``).
"""

from __future__ import annotations

import collections
import itertools
import json
from collections.abc import Callable
from typing import Any

import gevent
from gevent.event import AsyncResult
from gevent.event import Event as GEvent

from kitegreen.exceptions import describe

MAX_LINE = 1024 * 1024
"""Longest message sent or accepted; both ends are ours, this only bounds a bug. A stats answer
is a few KB, plus about 1 KB per method of the service."""
RECV_SIZE = 65536
SEND_TIMEOUT = 2.0
"""Seconds a message may wait for room in the socket. A worker whose hub is blocked reads
nothing; when a message cannot go out in time the channel is closed, since what was sent of it
would leave half a line that the next message would be read as the end of."""


class Channel:
    """One end of a control channel.

    Sending never blocks: :meth:`send` queues the message and a writer greenlet sends the queue
    in order, so that the arbiter's loop never waits on a worker. Reading happens in a reader
    greenlet that hands each message to ``on_message``, one received batch at a time.

    Args:
        sock: a connected gevent socket (one end of a socketpair).
        on_message: called in the reader greenlet with each message that is not a reply.
        on_closed: called once when the other end has closed (or the socket failed).
        log: a structlog logger.
        send_timeout: see :data:`SEND_TIMEOUT`.
    """

    def __init__(
        self,
        sock: Any,
        on_message: Callable[[dict[str, Any]], None],
        on_closed: Callable[[], None],
        log: Any,
        *,
        send_timeout: float = SEND_TIMEOUT,
    ) -> None:
        self._sock = sock
        self._sock.settimeout(send_timeout)
        self._on_message = on_message
        self._on_closed = on_closed
        self._log = log
        self._ids = itertools.count(1)
        self._waiting: dict[int, AsyncResult] = {}
        self._outbox: collections.deque[bytes] = collections.deque()
        self._queued = GEvent()
        self._sent = GEvent()
        self._sent.set()
        self._reader: gevent.Greenlet | None = None
        self._writer: gevent.Greenlet | None = None
        self.closed = False

    def start(self) -> None:
        """Start reading and writing; idempotent."""
        if self._reader is None and not self.closed:
            self._reader = gevent.spawn(self._read)
            self._writer = gevent.spawn(self._write)

    def send(self, message: dict[str, Any]) -> bool:
        """Queue one message for sending; False if the channel is closed or the message is
        over :data:`MAX_LINE`."""
        if self.closed:
            return False
        data = json.dumps(message, separators=(",", ":")).encode() + b"\n"
        if len(data) > MAX_LINE:
            self._log.error("control message too long; not sent", type=message.get("type"))
            return False
        self._outbox.append(data)
        self._sent.clear()
        self._queued.set()
        return True

    def flush(self, timeout: float) -> bool:
        """Wait up to ``timeout`` for every queued message to be sent; False if some were not
        (or the channel closed first)."""
        return bool(self._sent.wait(timeout)) and not self.closed

    def request(self, message: dict[str, Any], timeout: float) -> dict[str, Any] | None:
        """Send ``message`` with a fresh ``id`` and wait for the reply that names it.

        Returns:
            The reply, or None if none came within ``timeout`` seconds.
        """
        ident = next(self._ids)
        waiter = AsyncResult()
        self._waiting[ident] = waiter
        try:
            if not self.send({**message, "id": ident}):
                return None
            reply: dict[str, Any] | None = waiter.get(timeout=timeout, block=True)
            return reply
        except gevent.Timeout:
            return None
        finally:
            self._waiting.pop(ident, None)

    def join(self, timeout: float) -> None:
        """Wait up to ``timeout`` for the reader to reach end-of-stream."""
        if self._reader is not None:
            self._reader.join(timeout=timeout)

    def close(self) -> None:
        """Stop reading and writing and close the socket, dropping what is still queued;
        idempotent."""
        current = gevent.getcurrent()
        for greenlet in (self._reader, self._writer):
            if greenlet is not None and greenlet is not current:
                greenlet.kill(block=False)
        self._reader = self._writer = None
        self._finish()

    def _finish(self) -> None:
        if self.closed:
            return
        self.closed = True
        self._sock.close()
        self._outbox.clear()
        self._sent.set()
        for waiter in self._waiting.values():
            waiter.set(None)
        self._on_closed()

    def _write(self) -> None:
        try:
            while True:
                self._queued.wait()
                while self._outbox:
                    self._sock.sendall(self._outbox.popleft())
                self._queued.clear()
                self._sent.set()
        except OSError as exc:  # a timeout included: see SEND_TIMEOUT
            self._log.warning("control message not sent; closing the channel", error=describe(exc))
        self.close()

    def _read(self) -> None:
        buffer = bytearray()
        try:
            while True:
                try:
                    chunk = self._sock.recv(RECV_SIZE)
                except TimeoutError:
                    continue  # the socket's timeout bounds sends; reads wait for ever
                if not chunk:
                    return
                # Only the new bytes are searched for line ends: a long message arriving in many
                # chunks costs linear time, not quadratic.
                searched = len(buffer)
                buffer += chunk
                start = 0
                while (end := buffer.find(b"\n", searched)) >= 0:
                    self._dispatch(bytes(buffer[start:end]))
                    start = searched = end + 1
                if start:
                    del buffer[:start]
                if len(buffer) > MAX_LINE:
                    self._log.error("control message too long; closing the channel")
                    return
                # A peer that floods the channel must not starve the other greenlets (the
                # arbiter's loop, the other workers' channels): one batch at a time.
                gevent.sleep(0)
        except OSError as exc:
            self._log.debug("control channel failed", error=describe(exc))
        finally:
            self._finish()

    def _dispatch(self, line: bytes) -> None:
        try:
            message = json.loads(line)
        except ValueError:
            self._log.error("malformed control message", line=line[:200].decode("utf-8", "replace"))
            return
        if not isinstance(message, dict):
            return
        reply_to = message.get("reply_to")
        if reply_to is not None:
            waiter = self._waiting.get(reply_to)
            if waiter is not None:
                waiter.set(message)
            return
        try:
            self._on_message(message)
        except Exception:  # noqa: BLE001 - a bad message must not stop the channel
            self._log.exception("control message failed", type=message.get("type"))
