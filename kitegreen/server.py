"""``RpcServer``: kite's server lifecycle (Listen, AcceptLoop, Serve, Stop) on gevent.

The stop sequence is fixed: deregister from the registry, stop accepting (the listening socket
closes, so new connections are refused at once), let requests in flight finish and send their
replies, close kept-alive connections as they fall idle, give up on what is left after
``exit_wait_time``, stop background greenlets.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping
from types import TracebackType
from typing import Any

import gevent
import structlog
from gevent.event import Event as GEvent
from gevent.pool import Pool

from kitegreen._version import VERSION
from kitegreen.config import Config, check_endpoint_qps_limits, check_int
from kitegreen.consul_client import ConsulConnection
from kitegreen.debug import DebugServer
from kitegreen.events import Event, EventQueue
from kitegreen.hubwatch import HubWatch
from kitegreen.limiter import Limiter, Limits
from kitegreen.metrics import Metrics
from kitegreen.registry import ConsulRegistry, Registrar, Registry, make_registrar
from kitegreen.remote_config import RemoteConfigWatcher
from kitegreen.reporter import (
    CONNECTION_OVERLOAD,
    HUB_BLOCKED,
    NullReporter,
    Reporter,
    ReportGate,
)
from kitegreen.rpc import metadata
from kitegreen.rpc.budget import MemoryBudget
from kitegreen.rpc.loop import Connection, ServeContext
from kitegreen.rpc.methods import build_methods
from kitegreen.rpc.panics import PanicLog
from kitegreen.transport.acceptor import Acceptor
from kitegreen.transport.listener import (
    ListenSpec,
    describe_address,
    listen,
    remove_unix_socket,
)
from kitegreen.transport.streams import IdleSweeper

FIRST_REQUEST_GRACE = 1.0
"""Seconds a stop spares a connection accepted before it that has not sent its first request
yet: a client that connects and sends at once is answered, never met with an end-of-stream for
a request it did send (a loaded client may take some milliseconds between the two)."""

SERVER_START = "Server Start"
SERVER_STOP = "Server Stop"
CONFIG_CHANGE = "Config Change"


class RpcServer:
    """A Thrift server for one thriftpy2 service, served from pooled gevent greenlets.

    Args:
        service: the thriftpy2 service, e.g. ``echo_thrift.Echo``.
        handler: an object implementing every method of ``service``.
        config: settings; defaults when None. ``service_name`` defaults to the service's name.
        reporter: where rate-limited reports go besides the log and the event ring.
        registry: where to register when ``config.register`` is on; Consul at
            ``config.consul_addr`` when None.

    Raises:
        HandlerError: ``handler`` does not implement ``service``.

    Example::

        server = RpcServer(echo_thrift.Echo, EchoHandler(), Config(port=0, host="127.0.0.1"))
        with server:
            print(server.address)
    """

    def __init__(
        self,
        service: Any,
        handler: object,
        config: Config | None = None,
        *,
        reporter: Reporter | None = None,
        registry: Registry | None = None,
    ) -> None:
        self.service = service
        self.handler = handler
        self._methods = build_methods(service, handler)
        self._given_reporter = reporter
        self._reporter: Reporter = reporter or NullReporter()
        self._registry = registry
        self._configure(config or Config())

    def _configure(self, config: Config) -> None:
        """Build the parts that depend on config; only before start()."""
        if not config.service_name:
            config = config.replace(service_name=getattr(self.service, "__name__", "kitegreen"))
        self.config = config
        self.log = structlog.get_logger("kitegreen").bind(service=config.service_name)
        self.events = EventQueue(config.event_capacity)
        self.reports = ReportGate(config.report_interval, self.events, self._reporter, self.log)
        self.limiter = Limiter(
            Limits(config.limit_connections, config.limit_qps, dict(config.endpoint_qps_limits)),
            config.qps_fill_interval,
            enabled=not config.service_mesh_mode,
        )
        self.metrics: Metrics | None = (
            Metrics(self._runtime_figures) if config.enable_metrics else None
        )
        for name, method in self._methods.items():
            method.stats = self.metrics.method(name) if self.metrics else None
        self._ctx = ServeContext(
            methods=self._methods,
            limiter=self.limiter,
            reports=self.reports,
            metrics=self.metrics,
            log=self.log,
            panics=PanicLog(self.log),
            read_write_timeout=config.read_write_timeout,
            max_frame_size=config.max_frame_size,
            get_real_ip=config.get_real_ip,
            access_log=config.access_log,
            trusted_proxies=metadata.networks(config.trusted_proxies),
            mesh_mode=config.service_mesh_mode,
            enforce_rpc_timeout=config.enforce_rpc_timeout,
            memory=MemoryBudget(config.max_message_memory, config.max_inflight_memory),
        )
        self._pool = Pool()
        self._acceptor: Acceptor | None = None
        self._listen_spec: ListenSpec | None = None
        self._address: tuple[str, int] | str | None = None
        self._unix_inode: int | None = None
        self._owns_listener = True
        self._started = False
        self._stopped = GEvent()
        self._stop_greenlet: gevent.Greenlet | None = None
        self._clean_stop = True
        self._consul = ConsulConnection(config.consul_addr, config.consul_token)
        self.registrar: Registrar | None = None
        self.remote_config: RemoteConfigWatcher | None = None
        if config.remote_config:
            self.remote_config = RemoteConfigWatcher(
                self._consul.client(),
                config.service_name,
                config.cluster,
                apply=self._apply_remote_limits,
                on_event=self.reports.remote_config_event,
                log=self.log,
            )
        self.debug_server: DebugServer | None = None
        if config.enable_debug_server:
            self.debug_server = DebugServer(
                config.debug_host,
                config.effective_debug_port(config.port),
                max_connections=config.debug_max_connections,
                idle_timeout=config.debug_idle_timeout,
                runtime=self.runtime_info,
                metrics=self.metrics.exposition if self.metrics else None,
                healthy=lambda: self.started and not self._ctx.stop_began,
                log=self.log,
            )
        self.hub_watch: HubWatch | None = None
        if config.hub_block_threshold > 0:
            self.hub_watch = HubWatch(config.hub_block_threshold, self._on_hub_blocked)
        self.idle_sweeper: IdleSweeper | None = None
        if config.idle_timeout > 0:
            self.idle_sweeper = IdleSweeper(self._ctx.streams, config.idle_timeout)
        # Started in this order after the listener, stopped in reverse after the drain.
        self._background: list[Any] = [
            p
            for p in (self.idle_sweeper, self.debug_server, self.hub_watch, self.remote_config)
            if p
        ]

    def reconfigure(self, config: Config) -> None:
        """Replace the configuration before the server starts (the launcher uses this).

        Raises:
            RuntimeError: the server has already started.
        """
        if self._started:
            raise RuntimeError("reconfigure() must be called before start()")
        self._configure(config)

    # -- lifecycle -------------------------------------------------------------------------

    @property
    def address(self) -> tuple[str, int] | str:
        """Where the server listens (or listened, once stopped): ``(host, port)`` for TCP, the
        path for a Unix socket.

        Raises:
            RuntimeError: the server has not started.
        """
        if self._address is None:
            raise RuntimeError("the server is not listening; call start() first")
        return self._address

    @property
    def started(self) -> bool:
        """Whether start() has succeeded and stop() has not finished."""
        return self._started and not self._stopped.is_set()

    def start(
        self,
        *,
        listener: Any = None,
        max_accept: int | None = None,
        accept_gate: Callable[[], float] | None = None,
    ) -> None:
        """Listen and start accepting; return at once (kite's Listen + AcceptLoop).

        Args:
            listener: a bound, listening socket to accept on instead of binding one, for a
                server that shares its listener with other processes (the workers of
                ``--workers N``). The server does not own it: at stop it stops accepting and
                closes its own descriptor without taking in the backlog, which the processes
                still accepting will serve, and it never removes a Unix socket's path.
            max_accept: connections taken per wake-up of the accept loop; gevent's default
                (100) when None. Processes sharing a listener use 1, so that one of them does
                not take a whole burst of connections while the others stay idle.
            accept_gate: called before each accept; a positive result is a number of seconds
                to leave the listener to the other processes sharing it instead.

        Raises:
            ListenError: the listening socket could not be created.
            ConfigError: ``max_accept`` is below 1.
            RuntimeError: the server was already started.
        """
        if self._started:
            raise RuntimeError("the server was already started; a stopped server cannot restart")
        spec = ListenSpec.from_config(self.config)
        sock = listen(spec, self.config.backlog) if listener is None else listener
        self._owns_listener = listener is None
        self._listen_spec = spec
        if spec.kind == "unix":
            self._address = spec.path
            if self._owns_listener:
                self._unix_inode = os.stat(spec.path).st_ino
        else:
            host, port = sock.getsockname()[:2]
            self._address = (str(host), int(port))
        running: list[Any] = []
        try:
            self._acceptor = Acceptor(
                sock,
                self._handle,
                self._admit,
                self._pool,
                max_accept=max_accept,
                gate=accept_gate,
            )
            self._acceptor.start()
            self._make_registrar(spec)
            for part in self._background:
                part.start()
                running.append(part)
        except BaseException:
            # Undo everything, so that nothing runs for a server that did not start (a
            # registrar would announce a closed port) and start() can be called again.
            for part in reversed(running):
                part.stop()
            if self.registrar is not None:
                self._background.remove(self.registrar)
                self.registrar = None
            if self._acceptor is not None:
                self._acceptor.stop_accepting()
                self._acceptor = None
            self._cleanup_listener()
            if self._owns_listener:
                sock.close()
            self._address = None
            raise
        self._started = True
        where = self.describe_address()
        self.log.info(
            "listening",
            address=where,
            pid=os.getpid(),
            limits={"conn": self.config.limit_connections, "qps": self.config.limit_qps},
        )
        self.events.push(SERVER_START, f"listening on {where}")

    def serve(self) -> None:
        """Start if needed, then block until the server has stopped (kite's Serve)."""
        if not self._started:
            self.start()
        self._stopped.wait()

    def stop(self, timeout: float | None = None) -> bool:
        """Stop gracefully and wait for it; safe to call more than once, from any greenlet.

        The sequence: ``/health`` turns 503 and the server deregisters; it keeps serving for
        ``drain_time``; the listener stops accepting, takes in its backlog and closes; each
        connection finishes the requests that reached it and closes with a FIN once nothing
        more waits in it; after ``timeout``, what is still running is cut off.

        Args:
            timeout: how long requests in flight may take to finish once the listener is
                closed; ``exit_wait_time`` when None.

        Returns:
            True if every request in flight finished; False if some were cut off.
        """
        if not self._started:
            self._stopped.set()
            return True
        if self._stop_greenlet is None:
            self._stop_greenlet = gevent.spawn(self._stop, timeout)
        self._stopped.wait()
        return self._clean_stop

    def _stop(self, timeout: float | None) -> None:
        wait = self.config.exit_wait_time if timeout is None else timeout
        ctx = self._ctx
        try:
            ctx.stop_began = True
            registered = self.registrar is not None
            drain = self.config.effective_drain_time(registered)
            self.log.info(
                "stopping",
                connections=len(ctx.streams),
                drain_time=drain,
                exit_wait_time=wait,
            )
            if self.registrar is not None:
                # First, so that clients stop picking this instance before it stops accepting.
                self.registrar.deregister()
            if drain > 0:
                # Clients that find servers through Consul need a moment to see the change;
                # until then this server serves them as usual (/health says 503 already).
                gevent.sleep(drain)
            self._close_listener()
            ctx.stopping = True
            clean = self._drain_connections(time.monotonic() + wait)
            self._clean_stop = clean
            for part in reversed(self._background):
                part.stop()
            ctx.panics.flush()
            self._consul.close()
            self.events.push(SERVER_STOP, "clean" if clean else "requests cut off")
            self.log.info("stopped", clean=clean)
        finally:
            self._stopped.set()

    def _close_listener(self) -> None:
        """Stop accepting, take in what the kernel already accepted, close the socket."""
        acceptor = self._acceptor
        assert acceptor is not None
        acceptor.stop_accepting()
        if self._owns_listener:
            # Closing the listener would reset connections still in its backlog; they are
            # taken in and served like the others (a request they sent gets its reply, then a
            # FIN). A shared listener stays open in the processes still accepting its backlog.
            taken = acceptor.drain_backlog(self._take_in)
            if taken:
                self.log.info("took in the listen backlog", connections=taken)
        # close() rather than stop(): gevent's stop() would also kill our handlers.
        acceptor.close()
        self._cleanup_listener()

    def _take_in(self, sock: Any, address: Any) -> None:
        self.limiter.admit_connection(force=True)
        self._pool.spawn(self._handle, sock, address)

    def _drain_connections(self, deadline: float) -> bool:
        """End connections as they fall idle; True if none had a request cut off."""
        streams = self._ctx.streams
        while len(self._pool):
            streams.end_idle(FIRST_REQUEST_GRACE)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            self._pool.join(timeout=min(remaining, 0.05))
        busy = streams.busy()
        if len(self._pool):
            if busy:
                self.log.error(
                    "exit_wait_time passed with requests in flight; cutting them off",
                    connections=busy,
                )
            self._pool.kill(block=True, timeout=1.0)
        return busy == 0

    def _cleanup_listener(self) -> None:
        spec = self._listen_spec
        if spec is not None and spec.kind == "unix" and self._unix_inode is not None:
            remove_unix_socket(spec.path, self._unix_inode)
            self._unix_inode = None

    def __enter__(self) -> RpcServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def describe_address(self) -> str:
        """The bound address as text: ``127.0.0.1:8888``, ``[::1]:8888``, ``unix:/path``."""
        return describe_address(self.address)

    # -- connections -----------------------------------------------------------------------

    def _admit(self, sock: Any, address: Any) -> bool:
        if self.limiter.admit_connection():
            return True
        sock.close()
        if self.metrics is not None:
            self.metrics.overload("connections")
        self.reports.report(
            CONNECTION_OVERLOAD,
            f"connection from {address!r} refused: {self.limiter.connections} open, "
            f"limit {self.limiter.limits.connections}",
        )
        return False

    def _handle(self, sock: Any, address: Any) -> None:
        if self.metrics is not None:
            self.metrics.connections += 1
        try:
            Connection(sock, address, self._ctx).serve()
        finally:
            self.limiter.release_connection()

    # -- kite's accessors ------------------------------------------------------------------

    def push_event(self, name: str, detail: str = "") -> Event:
        """Record an event in the recent-event ring (kite's PushEvent)."""
        return self.events.push(name, detail)

    def recent_events(self, limit: int | None = None) -> list[Event]:
        """Recent events, newest first (kite's RecentEvents)."""
        return self.events.recent(limit)

    def report(self, kind: str, message: str) -> bool:
        """Report ``message``, at most once per ``report_interval`` per ``kind``.

        Returns:
            True if it went out, False if it was counted and held back.
        """
        return self.reports.report(kind, message)

    def overload(self) -> dict[str, Any]:
        """Connections open, how many are in a request, and the limits in force (kite's
        OverLoad)."""
        limits = self.limiter.limits
        return {
            "conn_now": self.limiter.connections,
            "conn_busy": self._ctx.streams.busy(),
            "conn_limit": limits.connections,
            "qps_limit": limits.qps,
            "endpoint_qps_limits": dict(limits.endpoint_qps),
            "limits_enabled": self.limiter.enabled,
        }

    def remote_configs(self) -> dict[str, Any]:
        """The remote configuration in force (kite's RemoteConfigs); empty without Consul.

        Returns:
            ``{limit name: {"value", "key", "index"}}`` for each limit Consul sets, plus
            ``"rejected": {key: reason}`` while a key holds a malformed value.
        """
        return self.remote_config.snapshot() if self.remote_config else {}

    def update_limits(
        self,
        *,
        limit_connections: int | None = None,
        limit_qps: int | None = None,
        endpoint_qps_limits: Mapping[str, int] | None = None,
        source: str = "api",
    ) -> Limits:
        """Change the connection and QPS limits at run time; None keeps a limit.

        Args:
            limit_connections: the new connection limit (0: off).
            limit_qps: the new server-wide QPS limit (0: off).
            endpoint_qps_limits: the new per-method QPS limits, replacing the old ones.
            source: who asked, for the event and the log.

        Returns:
            The limits now in force.

        Raises:
            ConfigError: a limit is negative or not an integer.
        """
        for name, value in (("limit_connections", limit_connections), ("limit_qps", limit_qps)):
            if value is not None:
                check_int(name, value)
        if endpoint_qps_limits is not None:
            check_endpoint_qps_limits(endpoint_qps_limits)
        before = self.limiter.limits
        after = self.limiter.update(
            connections=limit_connections, qps=limit_qps, endpoint_qps=endpoint_qps_limits
        )
        if after != before:
            detail = (
                f"{source}: conn {before.connections}->{after.connections}, "
                f"qps {before.qps}->{after.qps}, endpoint_qps {dict(after.endpoint_qps)}"
            )
            self.log.info(
                "limits changed",
                source=source,
                conn=after.connections,
                qps=after.qps,
                endpoint_qps=dict(after.endpoint_qps),
            )
            self.events.push(CONFIG_CHANGE, detail)
        return after

    def runtime_info(self) -> dict[str, Any]:
        """What ``GET /runtime/kite`` shows."""
        return {
            "service": self.config.service_name,
            "cluster": self.config.cluster,
            "version": {"service": self.config.version, "kitegreen": VERSION},
            "address": self.describe_address() if self._address is not None else None,
            "overload": self.overload(),
            "remote_configs": self.remote_configs(),
            "events": [e.as_dict() for e in self.recent_events()],
        }

    # -- Consul ------------------------------------------------------------------------------

    def _make_registrar(self, spec: ListenSpec) -> None:
        port = self.address[1] if isinstance(self.address, tuple) else 0
        self.registrar = make_registrar(
            self.config,
            spec,
            port,
            registry=lambda: self._registry or ConsulRegistry(self._consul.client()),
            on_change=self.reports.registry_change,
            log=self.log,
        )
        if self.registrar is not None:
            self._background.insert(0, self.registrar)

    def _apply_remote_limits(self, changes: dict[str, Any]) -> None:
        local = self.config
        self.update_limits(
            limit_connections=_or_local(changes, "limit_connections", local.limit_connections),
            limit_qps=_or_local(changes, "limit_qps", local.limit_qps),
            endpoint_qps_limits=_or_local(
                changes, "endpoint_qps_limits", dict(local.endpoint_qps_limits)
            ),
            source="consul",
        )

    @property
    def registry(self) -> Registry | None:
        """The registry given to the constructor; None: Consul at ``consul_addr``."""
        return self._registry

    @property
    def reporter(self) -> Reporter | None:
        """The reporter given to the constructor; None if none was (reports then go to the log
        and the event ring only)."""
        return self._given_reporter

    @property
    def debug_address(self) -> tuple[str, int] | None:
        """Where the debug server listens, or None if it is off or could not bind."""
        return self.debug_server.address if self.debug_server else None

    def _on_hub_blocked(self, seconds: float, stack: list[str]) -> None:
        where = (
            stack[-1].strip().splitlines()[0]
            if stack
            else "no stack: C code held the GIL throughout (decoding a very large message, say)"
        )
        self.log.warning(
            "hub blocked", seconds=round(seconds, 3), where=where, stack="".join(stack)
        )
        if self.metrics is not None:
            self.metrics.hub_blocks += 1
        self.reports.report(HUB_BLOCKED, f"gevent hub blocked for {seconds:.3f}s at {where}")

    def _runtime_figures(self) -> dict[str, float]:
        hub = gevent.get_hub()
        return {
            "connections_open": float(self.limiter.connections),
            "greenlets": len(self._pool) + len(self._background),
            "pending_callbacks": float(getattr(hub.loop, "pendingcnt", 0) or 0),
        }


def _or_local(changes: dict[str, Any], name: str, local: Any) -> Any:
    """The remote value for ``name``; the local setting if Consul dropped it; None if untouched."""
    if name not in changes:
        return None
    value = changes[name]
    return local if value is None else value
