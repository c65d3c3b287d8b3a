"""Slow HTTP clients and a kubelet-style health probe, for the debug server's limits tests (in
this process and against a launched arbiter)."""

from __future__ import annotations

import contextlib
import socket
import time

import gevent

SLOW_REQUEST = b"GET /runtime/kite HTTP/1.1\r\nHost: debug\r\nUser-Agent: trickle\r\n\r\n"


class Tricklers:
    """``count`` clients that each send :data:`SLOW_REQUEST` one byte every ``interval``
    seconds, and connect again whenever the server closes them: the slowloris shape, which
    holds a slot for as long as the server lets it. A context manager; leaving it stops them.

    Attributes:
        connects: connections made so far.
        closed_by_server: connections the server closed (EOF or reset) while they trickled.
        answered: connections that got any reply byte (the server served a slow request).
    """

    def __init__(self, address: tuple[str, int], count: int, interval: float = 1.0) -> None:
        self.address = address
        self.interval = interval
        self.connects = 0
        self.closed_by_server = 0
        self.answered = 0
        self._greenlets = [gevent.spawn(self._run) for _ in range(count)]

    def __enter__(self) -> Tricklers:
        return self

    def __exit__(self, *exc: object) -> None:
        gevent.killall(self._greenlets, timeout=5.0)

    def _run(self) -> None:
        while True:
            try:
                sock = socket.create_connection(self.address, timeout=5.0)
            except OSError:
                gevent.sleep(self.interval)
                continue
            self.connects += 1
            with sock:
                self._trickle(sock)

    def _trickle(self, sock: socket.socket) -> None:
        sock.settimeout(self.interval)
        for i in range(len(SLOW_REQUEST)):
            try:
                sock.sendall(SLOW_REQUEST[i : i + 1])
                if sock.recv(1):
                    self.answered += 1
                    return
                self.closed_by_server += 1
                return
            except TimeoutError:
                continue  # the interval passed with nothing from the server: next byte
            except OSError:
                self.closed_by_server += 1
                return


def probe_health(address: tuple[str, int], timeout: float = 1.0) -> tuple[int | None, float]:
    """``GET /health`` as a kubelet sends it (a new connection, the request in one write,
    ``Connection: close``, a one-second timeout): the status (None: no answer in time, or the
    connection closed without one) and the seconds it took."""
    started = time.monotonic()
    request = (
        b"GET /health HTTP/1.1\r\nHost: debug\r\nUser-Agent: kube-probe/1.30\r\n"
        b"Accept: */*\r\nConnection: close\r\n\r\n"
    )
    reply = b""
    with (
        contextlib.suppress(OSError),
        socket.create_connection(address, timeout=timeout) as sock,
    ):
        sock.settimeout(max(timeout - (time.monotonic() - started), 0.01))
        sock.sendall(request)
        while b"\r\n" not in reply and time.monotonic() - started < timeout:
            chunk = sock.recv(256)
            if not chunk:
                break
            reply += chunk
    took = time.monotonic() - started
    parts = reply.split(b" ", 2)
    if len(parts) < 2 or not parts[1].isdigit() or took > timeout:
        return None, took
    return int(parts[1]), took
