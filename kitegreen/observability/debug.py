"""The debug HTTP server: kite's /runtime/kite and pprof, Prometheus' /metrics, a health check.

Served by gevent's WSGI server in the same hub as the RPC server, bound to loopback unless
configured otherwise. A port that is already taken is a warning, not a failure: the RPC
service matters more than its debug page. For the same reason the debug server holds few
descriptors: at most ``max_connections`` connections (more are accepted and closed at once),
each closed once it has sent nothing for ``idle_timeout`` seconds, so that a pile of idle
connections to a debug port cannot take the descriptors the RPC listener needs.

=====================  ==========================================================
``GET /runtime/kite``  JSON: ``overload``, ``remote_configs``, ``events``, ``version``
``GET /metrics``       Prometheus text format
``GET /debug/greenlets``  every greenlet's and thread's stack (kite's pprof goroutines)
``GET /health``        200 ``ok`` while serving, 503 ``stopping`` once stop() begins
=====================  ==========================================================
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from typing import Any

from gevent import pywsgi
from gevent.pool import Pool

from kitegreen.exceptions import ListenError, describe
from kitegreen.signals import format_stacks
from kitegreen.transport.listener import ListenSpec, describe_address, listen

StartResponse = Callable[[str, list[tuple[str, str]]], Any]

_PROMETHEUS_TEXT = "text/plain; version=0.0.4; charset=utf-8"


class DebugServer:
    """Serves the debug endpoints of one :class:`~kitegreen.RpcServer`.

    Args:
        host: interface to bind (loopback by default in Config).
        port: port to bind; 0 for an ephemeral one.
        max_connections: connections served at once; one more is accepted and closed.
        idle_timeout: seconds a connection may send nothing (or not take what it is sent)
            before it is closed.
        runtime: returns the /runtime/kite document.
        metrics: returns the Prometheus exposition, or None when metrics are off.
        healthy: whether the server is serving (not stopping).
        log: a structlog logger.
    """

    def __init__(
        self,
        host: str,
        port: int,
        *,
        max_connections: int,
        idle_timeout: float,
        runtime: Callable[[], dict[str, Any]],
        metrics: Callable[[], bytes] | None,
        healthy: Callable[[], bool],
        log: Any,
    ) -> None:
        self._spec = ListenSpec("tcp", host=host, port=port)
        self._max_connections = max_connections
        self._idle_timeout = idle_timeout
        self._runtime = runtime
        self._metrics = metrics
        self._healthy = healthy
        self._log = log
        self._server: pywsgi.WSGIServer | None = None
        self.address: tuple[str, int] | None = None
        """``(host, port)`` once listening; None if the port could not be had."""

    def start(self) -> None:
        """Listen and serve; on failure, log a warning and stay off."""
        if self._server is not None:
            return
        try:
            sock = listen(self._spec, backlog=128)
        except ListenError as exc:
            self._log.warning(
                "debug server not started; the RPC service runs without it", error=str(exc)
            )
            return
        self._server = _CappedWSGIServer(
            sock,
            self._app,
            max_connections=self._max_connections,
            idle_timeout=self._idle_timeout,
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
                if self._healthy():
                    return _reply(start_response, "200 OK", b"ok\n")
                return _reply(start_response, "503 Service Unavailable", b"stopping\n")
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
    """gevent's WSGI server with a cap on connections and a timeout on idle ones.

    Over the cap a connection is accepted and closed at once rather than left unaccepted:
    gevent's own bounded pool stops accepting when full, which lets the kernel backlog fill
    and makes every later client wait for a timeout instead of failing fast (kite's rule for
    the RPC listener too).
    """

    def __init__(
        self, sock: Any, app: Any, *, max_connections: int, idle_timeout: float, log: Any
    ) -> None:
        super().__init__(
            sock, app, spawn=Pool(), log=None, error_log=None, handler_class=_QuietHandler
        )
        self._max_connections = max_connections
        self._idle_timeout = idle_timeout
        self._kg_log = log

    def do_handle(self, *args: Any) -> None:
        client_socket, address = args[0], args[1]
        if len(self.pool) >= self._max_connections:
            client_socket.close()
            self._kg_log.debug(
                "debug connection refused: too many open",
                peer=str(address),
                limit=self._max_connections,
            )
            return
        # A socket timeout bounds every wait for the peer, before the request line, between
        # headers, between kept-alive requests and while it takes the reply: the idle timeout.
        client_socket.settimeout(self._idle_timeout)
        super().do_handle(*args)


class _QuietHandler(pywsgi.WSGIHandler):  # type: ignore[misc]
    """pywsgi's handler, closing a connection that timed out without printing a traceback.

    pywsgi treats an error while reading the headers as bad client input and prints its
    traceback unless it is a ValueError; a peer that stopped sending is not news.
    """

    def _handle_client_error(self, ex: BaseException) -> Any:
        if isinstance(ex, OSError):
            return None
        return super()._handle_client_error(ex)


def _reply(
    start_response: StartResponse,
    status: str,
    body: bytes,
    content_type: str = "text/plain; charset=utf-8",
) -> list[bytes]:
    start_response(status, [("Content-Type", content_type), ("Content-Length", str(len(body)))])
    return [body]
