"""``RpcServer``: kite's server lifecycle (Listen, AcceptLoop, Serve, Stop) on gevent.

One process is an :class:`~kitegreen.rpc.engine.Engine` (the data plane) and an
:class:`~kitegreen.instance.Instance` governing it (the control plane). The stop sequence is
fixed: deregister from the registry, keep serving ``drain_time``, stop accepting (the
listening socket closes, so new connections are refused at once), let requests in flight
finish and send their replies, close kept-alive connections as they fall idle, give up on what
is left after ``exit_wait_time``, stop background greenlets.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from types import TracebackType
from typing import Any

import gevent
import structlog

from kitegreen.config import Config
from kitegreen.discovery.registry import Registrar, Registry
from kitegreen.discovery.remote_config import RemoteConfigWatcher
from kitegreen.instance import Instance
from kitegreen.limiter import Limiter, Limits
from kitegreen.observability.debug import DebugServer
from kitegreen.observability.events import Event, EventQueue
from kitegreen.observability.hubwatch import HubWatch
from kitegreen.observability.metrics import Metrics
from kitegreen.observability.reporter import NullReporter, Reporter, ReportGate
from kitegreen.rpc.engine import FIRST_REQUEST_GRACE, Engine
from kitegreen.rpc.methods import build_methods
from kitegreen.transport.listener import describe_address
from kitegreen.transport.stream import CLOSE_LINGER

SERVER_START = "Server Start"
SERVER_STOP = "Server Stop"


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
        self.methods = build_methods(service, handler)
        self._given_reporter = reporter
        self._reporter: Reporter = reporter or NullReporter()
        self._registry = registry
        self._close_linger = CLOSE_LINGER
        self._first_request_grace = FIRST_REQUEST_GRACE
        self._configure(config or Config())

    def _configure(self, config: Config) -> None:
        """Build the engine and the instance for ``config``; only before start()."""
        if not config.service_name:
            config = config.replace(service_name=getattr(self.service, "__name__", "kitegreen"))
        self.config = config
        self.log = structlog.get_logger("kitegreen").bind(service=config.service_name)
        self.events = EventQueue(config.event_capacity)
        self.reports = ReportGate(config.report_interval, self.events, self._reporter, self.log)
        self.engine = self.make_engine(config, self.reports, self.log)
        self.instance = Instance(
            config,
            LocalServing(self.engine),
            events=self.events,
            reports=self.reports,
            log=self.log,
            registry=self._registry,
        )
        self._started = False

    def make_engine(self, config: Config, reports: ReportGate, log: Any) -> Engine:
        """An engine serving this server's service with ``config`` (a worker of
        ``--workers N`` runs one of these, and no instance of its own)."""
        return Engine(
            self.methods,
            config,
            reports=reports,
            log=log,
            close_linger=self._close_linger,
            first_request_grace=self._first_request_grace,
            rpc_service=getattr(self.service, "__name__", ""),
        )

    def set_close_timings(
        self, *, close_linger: float | None = None, first_request_grace: float | None = None
    ) -> None:
        """Change how long a closing connection reads what its client still sends, and how
        long a stop spares a connection that has not sent its first request (a second each by
        default; None keeps one). For tests, which need not wait a second for either; before
        start().

        Raises:
            RuntimeError: the server has already started.
        """
        if self._started:
            raise RuntimeError("set_close_timings() must be called before start()")
        if close_linger is not None:
            self._close_linger = close_linger
        if first_request_grace is not None:
            self._first_request_grace = first_request_grace
        self._configure(self.config)

    def reconfigure(self, config: Config) -> None:
        """Replace the configuration before the server starts (the launcher uses this).

        Raises:
            RuntimeError: the server has already started.
        """
        if self._started:
            raise RuntimeError("reconfigure() must be called before start()")
        self._configure(config)

    # -- the parts, for those who look inside ------------------------------------------------

    @property
    def limiter(self) -> Limiter:
        """The connection and QPS limiter of this process."""
        return self.engine.limiter

    @property
    def metrics(self) -> Metrics | None:
        """This server's metrics; None with ``enable_metrics`` off."""
        return self.engine.metrics

    @property
    def registrar(self) -> Registrar | None:
        """The Consul registrar while registered; None when the server does not register."""
        return self.instance.registrar

    @property
    def remote_config(self) -> RemoteConfigWatcher | None:
        """The remote-configuration watch; None with ``remote_config`` off."""
        return self.instance.remote_config

    @property
    def debug_server(self) -> DebugServer | None:
        """The debug server once started; None when it is off."""
        return self.instance.debug_server

    @property
    def hub_watch(self) -> HubWatch | None:
        """The hub watch; None with ``hub_block_threshold`` 0."""
        return self.engine.hub_watch

    # -- lifecycle -------------------------------------------------------------------------

    @property
    def address(self) -> tuple[str, int] | str:
        """Where the server listens (or listened, once stopped): ``(host, port)`` for TCP, the
        path for a Unix socket.

        Raises:
            RuntimeError: the server has not started.
        """
        binding = self.engine.binding
        if binding is None:
            raise RuntimeError("the server is not listening; call start() first")
        return binding.address

    @property
    def started(self) -> bool:
        """Whether start() has succeeded and stop() has not finished."""
        return self._started and not self.engine.stopped

    def start(
        self,
        *,
        listener: Any = None,
        max_accept: int | None = None,
        accept_gate: Callable[[], float] | None = None,
    ) -> None:
        """Listen and start accepting; return at once (kite's Listen + AcceptLoop).

        Args:
            listener: a bound, listening socket to accept on instead of binding one; the
                server does not own it (see :meth:`Engine.close_listener`).
            max_accept: connections taken per wake-up of the accept loop; gevent's default
                (100) when None.
            accept_gate: called before each accept; a positive result is a number of seconds
                to leave the listener to the other processes sharing it instead.

        Raises:
            ListenError: the listening socket could not be created.
            ConfigError: ``max_accept`` is below 1.
            RuntimeError: the server was already started.
        """
        if self._started:
            raise RuntimeError("the server was already started; a stopped server cannot restart")
        binding = self.engine.start(
            listener=listener, max_accept=max_accept, accept_gate=accept_gate
        )
        try:
            self.instance.start(binding)
        except BaseException:
            # Undo everything, so that nothing runs for a server that did not start (a
            # registrar would announce a closed port) and start() can be called again.
            self.engine.abort_start()
            raise
        self._started = True
        where = describe_address(binding.address)
        self.log.info(
            "listening",
            address=where,
            pid=os.getpid(),
            limits={"conn": self.config.limit_connections, "qps": self.config.limit_qps},
        )
        self.events.push(SERVER_START, f"listening on {where}")
        problem = self.config.recycling_problem()
        if problem is not None:
            # Started from code (the launcher refuses): nothing here can recycle a process.
            self.log.warning("recycling settings ignored in one process", reason=str(problem))

    def serve(self) -> None:
        """Start if needed, then block until the server has stopped (kite's Serve)."""
        if not self._started:
            self.start()
        self.engine.wait_stopped()

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
            self.engine.stop()
            return True
        return self.engine.stop(timeout, on_phase=self._on_stop_phase)

    def _on_stop_phase(self, phase: str) -> None:
        """The instance's steps between the engine's, in the stopping greenlet."""
        instance = self.instance
        if phase == "stopping":
            drain = instance.drain_time
            self.log.info(
                "stopping",
                connections=self.engine.connections,
                drain_time=drain,
                exit_wait_time=self.config.exit_wait_time,
            )
            # First, so that clients stop picking this instance before it stops accepting.
            instance.deregister()
            if drain > 0:
                # Clients that find servers through Consul need a moment to see the change;
                # until then this server serves them as usual (/health says 503 already).
                gevent.sleep(drain)
            return
        if phase == "stopped":
            instance.stop()
        instance.stop_phase(phase)
        if phase == "stopped":
            clean = self.engine.clean_stop
            self.events.push(SERVER_STOP, "clean" if clean else "requests cut off")
            self.log.info("stopped", clean=clean)

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

    # -- kite's accessors ------------------------------------------------------------------

    def push_event(self, name: str, detail: str = "") -> Event:
        """Record an event in the recent-event ring (kite's PushEvent)."""
        return self.instance.push_event(name, detail)

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
        return self.engine.overload()

    def remote_configs(self) -> dict[str, Any]:
        """The remote configuration in force (kite's RemoteConfigs); empty without Consul.

        Returns:
            ``{limit name: {"value", "key", "index"}}`` for each limit Consul sets, plus
            ``"rejected": {key: reason}`` while a key holds a malformed value.
        """
        return self.instance.remote_configs()

    def update_limits(
        self,
        *,
        limit_connections: int | None = None,
        limit_qps: int | None = None,
        endpoint_qps_limits: Mapping[str, int] | None = None,
        source: str = "api",
    ) -> Limits:
        """Change the connection and QPS limits at run time; None keeps a limit. A limit that
        the remote configuration sets stays in force over the one set here until Consul drops
        it.

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
        return self.instance.update_limits(
            limit_connections=limit_connections,
            limit_qps=limit_qps,
            endpoint_qps_limits=endpoint_qps_limits,
            source=source,
        )

    def runtime_info(self) -> dict[str, Any]:
        """What ``GET /runtime/kite`` shows."""
        return self.instance.runtime_info()

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


class LocalServing:
    """The instance's view of the engine in its own process (a
    :class:`~kitegreen.instance.Serving`)."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    def apply_limits(self, limits: Limits, source: str) -> dict[str, Any]:
        """Enforce ``limits`` in this process."""
        self._engine.apply_limits(limits)
        return {}

    def load(self) -> dict[str, Any]:
        """Connections open and busy in this process."""
        overload = self._engine.overload()
        return {"conn_now": overload["conn_now"], "conn_busy": overload["conn_busy"]}

    def runtime(self) -> dict[str, Any]:
        """Nothing besides the instance's own keys."""
        return {}

    def healthy(self) -> bool:
        """Started, and no stop has begun."""
        return self._engine.serving

    def metrics_exposition(self) -> Callable[[], bytes] | None:
        """The engine's metrics."""
        metrics = self._engine.metrics
        return metrics.exposition if metrics is not None else None
