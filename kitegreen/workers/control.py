"""The control channel between the arbiter and one worker: JSON objects, one a line, over a
``socketpair`` made before the fork.

What travels on it (signals carry everything else: stop, reload, stacks):

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
worker             ``{"type": "final", ...}``          its last figures (numbered too), once
                                                       stopped, so that the instance's counters
                                                       never go backwards
=================  ==================================  ==========================================

A channel that reads end-of-stream tells its owner: for a worker that means its arbiter is
gone (the worker holds the only other end, see ``fork.py``).
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable
from typing import Any

import gevent
from gevent.event import AsyncResult

from kitegreen.exceptions import describe

MAX_LINE = 16 * 1024 * 1024
"""Longest message accepted; both ends are ours, this only bounds a bug."""
SEND_TIMEOUT = 2.0
"""Seconds a send may wait for room in the socket before the message is dropped: a worker whose
hub is blocked reads nothing, and the arbiter must not wait on it."""


class Channel:
    """One end of a control channel.

    Args:
        sock: a connected gevent socket (one end of a socketpair).
        on_message: called in the reader greenlet with each message that is not a reply.
        on_closed: called once when the other end has closed (or the socket failed).
        log: a structlog logger.
    """

    def __init__(
        self,
        sock: Any,
        on_message: Callable[[dict[str, Any]], None],
        on_closed: Callable[[], None],
        log: Any,
    ) -> None:
        self._sock = sock
        self._sock.settimeout(SEND_TIMEOUT)
        self._on_message = on_message
        self._on_closed = on_closed
        self._log = log
        self._ids = itertools.count(1)
        self._waiting: dict[int, AsyncResult] = {}
        self._reader: gevent.Greenlet | None = None
        self.closed = False

    def start(self) -> None:
        """Start reading; idempotent."""
        if self._reader is None and not self.closed:
            self._reader = gevent.spawn(self._read)

    def send(self, message: dict[str, Any]) -> bool:
        """Send one message; False if the channel is closed or the peer does not take it."""
        if self.closed:
            return False
        data = json.dumps(message, separators=(",", ":")).encode() + b"\n"
        try:
            self._sock.sendall(data)
        except OSError as exc:
            self._log.debug("control message not sent", error=describe(exc))
            return False
        return True

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
        """Stop reading and close the socket; idempotent."""
        reader, self._reader = self._reader, None
        if reader is not None and reader is not gevent.getcurrent():
            reader.kill(block=False)
        self._finish()

    def _finish(self) -> None:
        if self.closed:
            return
        self.closed = True
        self._sock.close()
        for waiter in self._waiting.values():
            waiter.set(None)
        self._on_closed()

    def _read(self) -> None:
        buffer = b""
        try:
            while True:
                try:
                    chunk = self._sock.recv(65536)
                except TimeoutError:
                    continue  # the socket's timeout bounds sends; reads wait for ever
                if not chunk:
                    return
                buffer += chunk
                *lines, buffer = buffer.split(b"\n")
                if len(buffer) > MAX_LINE:
                    self._log.error("control message too long; closing the channel")
                    return
                for line in lines:
                    self._dispatch(line)
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
