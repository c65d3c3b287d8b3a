"""The debug HTTP server: kite's /runtime/kite and pprof, Prometheus' /metrics, a health check.

Served by gevent's WSGI server in the same hub as the RPC server, bound to loopback unless
configured otherwise. A port that is already taken fails the start as the RPC port would (the
launcher exits 3): probes and scrapes would otherwise fail quietly against whatever holds it.
Marked optional (``debug_optional``) it is a warning instead, and the RPC service runs without
its debug page. The debug server holds few
descriptors: at most ``max_connections`` connections, at most ``max_per_peer`` of them from one
address, each closed once it has sent nothing for ``idle_timeout`` seconds, and each request
(from its first byte to the last byte of its reply) cut off after ``request_timeout``, so that
neither a pile of idle connections nor clients that trickle a byte a second can take the
descriptors the RPC listener needs or hold the slots for as long as they like.

A connection over either cap is not served, but it is not closed at once either: it has
:data:`PROBE_WAIT` seconds to send a complete ``GET /health`` (or ``HEAD``), which is answered
and closed; anything else is closed as soon as its first bytes show it is not a health probe.
This is what a kubelet (or a load balancer) does: a new connection per probe, the whole request
in its first segment, a one-second timeout by default. So slow clients holding every slot make
the debug pages refuse, never the liveness probe, which would restart a healthy process. At
most ``max_connections`` such connections wait at once; past that they are closed at once.

=====================  ==========================================================
``GET /runtime/kite``  JSON: ``overload``, ``remote_configs``, ``events``, ``version``
``GET /metrics``       Prometheus text format
``GET /debug/greenlets``  every greenlet's and thread's stack (kite's pprof goroutines)
``GET /health``        200 ``ok`` while serving, 503 ``stopping`` once stop() begins
=====================  ==========================================================
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any

import gevent
from gevent import pywsgi
from gevent.pool import Pool

from kitegreen.exceptions import ListenError, describe
from kitegreen.signals import format_stacks
from kitegreen.transport.listener import ListenSpec, describe_address, listen

StartResponse = Callable[[str, list[tuple[str, str]]], Any]

_PROMETHEUS_TEXT = "text/plain; version=0.0.4; charset=utf-8"

PROBE_WAIT = 1.0
"""Seconds a connection over the caps has to send a complete health probe: kubelet's default
probe timeout. A probe sends its request in one segment, so it needs microseconds of this."""

PROBE_HEAD_MAX = 4096
"""Bytes a health probe's request head may take (kubelet's is about 150)."""

_PROBE_LINES = (b"GET /health ", b"GET /health?", b"HEAD /health ", b"HEAD /health?")


class DebugServer:
    """Serves the debug endpoints of one :class:`~kitegreen.RpcServer`.

    Args:
        host: interface to bind (loopback by default in Config).
        port: port to bind; 0 for an ephemeral one.
        max_connections: connections served at once; more are only given a chance to be a
            health probe (see the module's docstring).
        max_per_peer: connections served at once from one address (the same rule past it).
        idle_timeout: seconds a connection may send nothing (or not take what it is sent)
            before it is closed.
        request_timeout: seconds one request may take from its first byte to the end of its
            reply, however steadily its client trickles it in.
        runtime: returns the /runtime/kite document.
        metrics: returns the Prometheus exposition, or None when metrics are off.
        healthy: whether the server is serving (not stopping).
        log: a structlog logger.
        optional: whether a port that cannot be had is only a warning (see :meth:`start`).
    """

    def __init__(
        self,
        host: str,
        port: int,
        *,
        max_connections: int,
        idle_timeout: float,
        max_per_peer: int | None = None,
        request_timeout: float | None = None,
        runtime: Callable[[], dict[str, Any]],
        metrics: Callable[[], bytes] | None,
        healthy: Callable[[], bool],
        log: Any,
        optional: bool = False,
    ) -> None:
        self._spec = ListenSpec("tcp", host=host, port=port)
        self._optional = optional
        self._max_connections = max_connections
        self._idle_timeout = idle_timeout
        self._max_per_peer = max_connections if max_per_peer is None else max_per_peer
        self._request_timeout = idle_timeout if request_timeout is None else request_timeout
        self._runtime = runtime
        self._metrics = metrics
        self._healthy = healthy
        self._log = log
        self._server: pywsgi.WSGIServer | None = None
        self.address: tuple[str, int] | None = None
        """``(host, port)`` once listening; None if the port could not be had."""

    def start(self) -> None:
        """Listen and serve.

        Raises:
            ListenError: the port cannot be had, unless the server is optional (then a
                warning is logged and it stays off).
        """
        if self._server is not None:
            return
        try:
            sock = listen(self._spec, backlog=128)
        except ListenError as exc:
            if not self._optional:
                raise ListenError(
                    f"debug server: {exc}; set debug_port to a free port, or debug_optional to "
                    "start without the debug server"
                ) from None
            self._log.warning(
                "debug server not started; the RPC service runs without it", error=str(exc)
            )
            return
        self._server = _CappedWSGIServer(
            sock,
            self._app,
            max_connections=self._max_connections,
            max_per_peer=self._max_per_peer,
            idle_timeout=self._idle_timeout,
            request_timeout=self._request_timeout,
            healthy=self._healthy,
            log=self._log,
        )
        self._server.start()
        host, port = sock.getsockname()[:2]
        self.address = (str(host), int(port))
        self._log.info("debug server listening", address=describe_address((str(host), int(port))))

    def stop(self) -> None:
        """Stop serving; idempotent."""
        server, self._server = self._server, None
        if server is not None:
            server.stop(timeout=1.0)

    def _app(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "/")
        if environ.get("REQUEST_METHOD") not in ("GET", "HEAD"):
            return _reply(start_response, "405 Method Not Allowed", b"GET only\n")
        try:
            if path == "/runtime/kite":
                body = json.dumps(self._runtime(), indent=2, default=str).encode() + b"\n"
                return _reply(start_response, "200 OK", body, "application/json")
            if path == "/metrics":
                if self._metrics is None:
                    return _reply(start_response, "404 Not Found", b"metrics are off\n")
                return _reply(start_response, "200 OK", self._metrics(), _PROMETHEUS_TEXT)
            if path in ("/debug/greenlets", "/debug/pprof/goroutine"):
                body = format_stacks().encode() + b"\n"
                return _reply(start_response, "200 OK", body)
            if path == "/health":
                return _reply(start_response, *_health(self._healthy))
            if path == "/":
                body = b"/runtime/kite\n/metrics\n/debug/greenlets\n/health\n"
                return _reply(start_response, "200 OK", body)
        except Exception as exc:  # noqa: BLE001 - a debug page must not take the server down
            self._log.exception("debug endpoint failed", path=path)
            return _reply(
                start_response,
                "500 Internal Server Error",
                f"{describe(exc)}\n".encode(),
            )
        return _reply(start_response, "404 Not Found", b"unknown path; see /\n")


class _CappedWSGIServer(pywsgi.WSGIServer):  # type: ignore[misc]
    """gevent's WSGI server with caps on connections (in all and per peer), a timeout on idle
    ones, a deadline per request, and a lane for health probes past the caps.

    Over a cap a connection is accepted rather than left unaccepted: gevent's own bounded pool
    stops accepting when full, which lets the kernel backlog fill and makes every later client
    wait for a timeout instead of failing fast (kite's rule for the RPC listener too). It then
    waits in the probe lane (:meth:`_answer_probe`) or, with that full too, is closed at once.
    """

    def __init__(
        self,
        sock: Any,
        app: Any,
        *,
        max_connections: int,
        max_per_peer: int,
        idle_timeout: float,
        request_timeout: float,
        healthy: Callable[[], bool],
        log: Any,
    ) -> None:
        super().__init__(
            sock, app, spawn=Pool(), log=None, error_log=None, handler_class=_QuietHandler
        )
        self._max_connections = max_connections
        self._max_per_peer = max_per_peer
        self._idle_timeout = idle_timeout
        self.request_timeout = request_timeout
        self._healthy = healthy
        self._per_peer: Counter[str] = Counter()
        self._probes = Pool()
        self.kg_log = log

    def do_handle(self, *args: Any) -> None:
        client_socket, address = args[0], args[1]
        peer = _peer(address)
        if len(self.pool) >= self._max_connections:
            self._overflow(client_socket, address, "too many open", self._max_connections)
            return
        if self._per_peer[peer] >= self._max_per_peer:
            self._overflow(client_socket, address, "too many from this peer", self._max_per_peer)
            return
        # Counted until do_close, which gevent calls once the handler returns (or the spawn
        # fails), so a peer's count cannot leak.
        self._per_peer[peer] += 1
        # A socket timeout bounds every wait for the peer, before the request line, between
        # headers, between kept-alive requests and while it takes the reply: the idle timeout.
        client_socket.settimeout(self._idle_timeout)
        super().do_handle(*args)

    def do_close(self, *args: Any) -> None:
        peer = _peer(args[1])
        self._per_peer[peer] -= 1
        if self._per_peer[peer] <= 0:
            del self._per_peer[peer]
        super().do_close(*args)

    def stop(self, timeout: float | None = None) -> None:
        self._probes.kill(block=False)
        super().stop(timeout=timeout)

    def _overflow(self, sock: Any, address: Any, why: str, limit: int) -> None:
        if len(self._probes) >= self._max_connections:
            sock.close()
            self.kg_log.debug(
                f"debug connection refused: {why}, and too many waiting to be a health probe",
                peer=str(address),
                limit=limit,
            )
            return
        self._probes.spawn(self._answer_probe, sock, address, why, limit)

    def _answer_probe(self, sock: Any, address: Any, why: str, limit: int) -> None:
        """Answer a health probe on a connection over a cap, then close it; close anything else.

        Only a whole request head that arrives within :data:`PROBE_WAIT` is answered, and the
        reply is a few bytes, so a slow client holds this lane for a second at most.
        """
        answered = False
        try:
            with gevent.Timeout(PROBE_WAIT, False):
                head = _read_probe(sock)
                if head is not None:
                    status, body = _health(self._healthy)
                    sock.sendall(
                        f"HTTP/1.1 {status}\r\nContent-Type: text/plain; charset=utf-8\r\n"
                        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
                        + (b"" if head.startswith(b"HEAD") else body)
                    )
                    answered = True
        except OSError:
            pass
        finally:
            sock.close()
        if not answered:
            self.kg_log.debug(f"debug connection refused: {why}", peer=str(address), limit=limit)


class _QuietHandler(pywsgi.WSGIHandler):  # type: ignore[misc]
    """pywsgi's handler with a deadline per request, closing a connection that timed out
    without printing a traceback.

    pywsgi treats an error while reading the headers as bad client input and prints its
    traceback unless it is a ValueError; a peer that stopped sending is not news.
    """

    _deadline: gevent.Timeout | None = None

    def handle_one_request(self) -> Any:
        if self.rfile.closed:
            return None
        # The wait for a request's first byte is the idle timeout's (the socket's); from that
        # byte on the whole request, its headers, the page and the reply, has request_timeout,
        # so that a client trickling a byte a second cannot hold its slot past it.
        try:
            if not self.rfile.peek(1):
                return None
        except (OSError, ValueError):
            return None
        self._deadline = deadline = gevent.Timeout(self.server.request_timeout)
        deadline.start()
        try:
            return super().handle_one_request()
        except gevent.Timeout as exc:
            if exc is not deadline:
                raise
            self._past_deadline()
            return None
        finally:
            deadline.close()
            self._deadline = None

    def handle_error(self, kind: Any, value: Any, tb: Any) -> None:
        # pywsgi reports any exception from the page or the reply as a server error with its
        # traceback; the deadline firing there is a slow client, not an error.
        if value is not None and value is self._deadline:
            self.close_connection = True
            self._past_deadline()
            return
        super().handle_error(kind, value, tb)

    def _past_deadline(self) -> None:
        self.server.kg_log.debug(
            "debug connection closed: request past debug_request_timeout",
            peer=str(self.client_address),
            limit=self.server.request_timeout,
        )

    def _handle_client_error(self, ex: BaseException) -> Any:
        if isinstance(ex, OSError):
            return None
        return super()._handle_client_error(ex)


def _peer(address: Any) -> str:
    """The host part of a peer's address (a unix socket's peer has none)."""
    return str(address[0]) if isinstance(address, tuple) and address else str(address)


def _read_probe(sock: Any) -> bytes | None:
    """The head of a health probe read from ``sock``, or None as soon as the bytes read show
    it is not one (or the peer closed). The caller bounds the time."""
    data = b""
    while True:
        line = data.split(b"\r\n", 1)[0]
        if len(data) > PROBE_HEAD_MAX or not any(
            line.startswith(start) if len(line) >= len(start) else start.startswith(line)
            for start in _PROBE_LINES
        ):
            return None
        if b"\r\n\r\n" in data:
            return data
        chunk = sock.recv(PROBE_HEAD_MAX)
        if not chunk:
            return None
        data += chunk


def _health(healthy: Callable[[], bool]) -> tuple[str, bytes]:
    """The status and body of /health."""
    if healthy():
        return "200 OK", b"ok\n"
    return "503 Service Unavailable", b"stopping\n"


def _reply(
    start_response: StartResponse,
    status: str,
    body: bytes,
    content_type: str = "text/plain; charset=utf-8",
) -> list[bytes]:
    start_response(status, [("Content-Type", content_type), ("Content-Length", str(len(body)))])
    return [body]
