"""The data plane of one process: bytes in, calls, bytes out.

An :class:`Engine` owns the listener (bound here or handed in), the acceptor, connection
admission, the open connections and the warm greenlets that serve them, the
:class:`~kitegreen.rpc.loop.ServeContext` every connection shares, the idle sweeper, the watch
of the hub its handlers run on, and the phases of a stop, each a verb the owner calls in order:

1. :meth:`Engine.begin_stop`: ``/health`` turns 503 and TTHeader replies ask Kitex clients to
   stop reusing their connections; the engine still accepts and serves.
2. :meth:`Engine.close_listener`: stop accepting, take in the backlog, close the socket.
3. :meth:`Engine.drain`: each connection finishes what reached it and closes as it falls idle;
   at the deadline what is left is cut off.
4. :meth:`Engine.finish`: background greenlets stop, panics are flushed.

:meth:`Engine.stop` runs them in that order, once, and calls its owner back after each: the
single process deregisters and waits ``drain_time`` after the first, and records each phase.

The single process (:class:`~kitegreen.server.RpcServer`) runs one engine beside its
:class:`~kitegreen.instance.Instance`; each worker of ``--workers N`` runs one engine on the
listener the arbiter shares, and nothing else of the control plane.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import gevent
from gevent.event import Event as GEvent

from kitegreen import context
from kitegreen.codec.wire import Wire
from kitegreen.config import Config
from kitegreen.limiter import Limiter, Limits
from kitegreen.observability import tracing
from kitegreen.observability.hubwatch import HubWatch, block_reporter, starvation_logger
from kitegreen.observability.metrics import Metrics
from kitegreen.observability.panics import PanicLog
from kitegreen.observability.reporter import CONNECTION_OVERLOAD, ReportGate
from kitegreen.rpc import metadata
from kitegreen.rpc.budget import MemoryBudget
from kitegreen.rpc.dispatch import Dispatcher
from kitegreen.rpc.loop import Connection, ServeContext
from kitegreen.rpc.methods import Method
from kitegreen.transport.acceptor import Acceptor
from kitegreen.transport.connections import IdleSweeper
from kitegreen.transport.listener import Binding, ListenSpec, listen
from kitegreen.transport.stream import CLOSE_LINGER

FIRST_REQUEST_GRACE = 1.0
"""Seconds a stop spares a connection accepted before it that has not sent its first request
yet: a client that connects and sends at once is answered, never met with an end-of-stream for
a request it did send (a loaded client may take some milliseconds between the two)."""


class Engine:
    """Serves the methods of one service on one listener, on a few warm greenlets.

    Args:
        methods: the method table (:func:`~kitegreen.rpc.methods.build_methods`).
        config: the settings the data plane reads (limits, timeouts, frame size, ...).
        reports: where overloads and panics are reported.
        log: a structlog logger.
        close_linger: seconds a closing connection reads what its client still sends, so that
            it closes with a FIN rather than a reset (tests shorten it).
        first_request_grace: see :data:`FIRST_REQUEST_GRACE` (tests shorten it).
        rpc_service: the IDL service name, ``rpc.service`` of the spans (``Config.tracing``);
            ``config.service_name`` when empty.
    """

    def __init__(
        self,
        methods: dict[str, Method],
        config: Config,
        *,
        reports: ReportGate,
        log: Any,
        close_linger: float = CLOSE_LINGER,
        first_request_grace: float = FIRST_REQUEST_GRACE,
        rpc_service: str = "",
    ) -> None:
        self.config = config
        self.log = log
        self.reports = reports
        self.limiter = Limiter(
            Limits(config.limit_connections, config.limit_qps, dict(config.endpoint_qps_limits)),
            config.qps_fill_interval,
            enabled=not config.service_mesh_mode,
        )
        self.metrics: Metrics | None = (
            Metrics(self._runtime_figures) if config.enable_metrics else None
        )
        for name, method in methods.items():
            method.attach_stats(self.metrics.method(name) if self.metrics else None)
        self._ctx = ServeContext(
            methods=methods,
            limiter=self.limiter,
            reports=reports,
            metrics=self.metrics,
            log=log,
            panics=PanicLog(log),
            read_write_timeout=config.read_write_timeout,
            max_frame_size=config.max_frame_size,
            get_real_ip=config.get_real_ip,
            access_log=config.access_log,
            trusted_proxies=metadata.networks(config.trusted_proxies),
            mesh_mode=config.service_mesh_mode,
            enforce_rpc_timeout=config.enforce_rpc_timeout,
            close_linger=close_linger,
            memory=MemoryBudget(config.max_message_memory, config.max_inflight_memory),
            tracer=tracing.load(rpc_service or config.service_name) if config.tracing else None,
            dispatcher=Dispatcher(),
            connection_closed=self._connection_closed,
        )
        # A greenlet a handler spawns sees the request's context: real_ip(), request_info(),
        # the current span, the log context.
        context.inherit_on_spawn()
        self._first_request_grace = first_request_grace
        self._hand_off_grace = 0.0
        self._drain_over = False
        """Set once the stop no longer waits for connections: one adopted after would be left."""
        self._finished = False
        """Set by :meth:`finish`: the dispatcher stops once no connection is left."""
        self._open: set[Connection] = set()
        """Connections not closed yet, lingering ones included."""
        self._all_closed = GEvent()
        self._all_closed.set()
        self._adoptions = 0
        """Hand-offs this engine said yes to that are not settled yet (:meth:`expect_adoption`)."""
        self._adoptions_settled = GEvent()
        self._adoptions_settled.set()
        self._acceptor: Acceptor | None = None
        self.binding: Binding | None = None
        """Where the engine listens (or listened, once stopped); None before start()."""
        self.idle_sweeper: IdleSweeper | None = None
        if config.idle_timeout > 0:
            self.idle_sweeper = IdleSweeper(self._ctx.streams, config.idle_timeout)
        self.hub_watch: HubWatch | None = None
        """Reports handlers that block this process's hub (``hub_block_threshold`` > 0)."""
        if config.hub_block_threshold > 0:
            self.hub_watch = HubWatch(
                config.hub_block_threshold,
                block_reporter(log, reports, self._count_hub_block),
                starvation_logger(log),
                progress=self._dispatches,
            )
        self._started = False
        self._stopped = GEvent()
        self._stop_greenlet: gevent.Greenlet | None = None
        self._clean_stop = True

    # -- start -----------------------------------------------------------------------------

    def start(
        self,
        *,
        listener: Any = None,
        max_accept: int | None = None,
        accept_gate: Callable[[], float] | None = None,
    ) -> Binding:
        """Bind (unless ``listener`` is given) and start accepting; undone on failure.

        Args:
            listener: a bound, listening socket shared with other processes; the engine does
                not own it (see :meth:`close_listener`).
            max_accept: connections taken per wake-up of the accept loop.
            accept_gate: called before each accept; a positive result is a number of seconds
                to leave the listener to the other processes sharing it instead.

        Returns:
            Where it listens.

        Raises:
            ListenError: the listening socket could not be created.
            ConfigError: ``max_accept`` is below 1.
            RuntimeError: the engine was already started.
        """
        if self._started:
            raise RuntimeError("the server was already started; a stopped server cannot restart")
        spec = ListenSpec.from_config(self.config)
        owned = listener is None
        sock = listen(spec, self.config.backlog) if owned else listener
        binding = Binding(spec, sock, owned=owned)
        try:
            self._ctx.dispatcher.start()
            self._acceptor = Acceptor(
                sock,
                self._handle,
                self._admit,
                max_accept=max_accept,
                gate=accept_gate,
            )
            self._acceptor.start()
            if self.idle_sweeper is not None:
                self.idle_sweeper.start()
            if self.hub_watch is not None:
                self.hub_watch.start()
        except BaseException:
            self._ctx.dispatcher.stop()
            if self.idle_sweeper is not None:
                self.idle_sweeper.stop()
            if self._acceptor is not None:
                self._acceptor.stop_accepting()
                self._acceptor.close()
            self._acceptor = None
            binding.release()
            if owned:
                sock.close()
            raise
        self.binding = binding
        self._started = True
        return binding

    def abort_start(self) -> None:
        """Undo :meth:`start` when what the owner starts after it fails: nothing was served,
        so the listener closes at once and ``start()`` may be called again."""
        if not self._started:
            return
        self._stop_background()
        if not self._open:
            self._ctx.dispatcher.stop()
        acceptor, self._acceptor = self._acceptor, None
        if acceptor is not None:
            acceptor.stop_accepting()
            acceptor.close()
        if self.binding is not None:
            self.binding.release()
        self.binding = None
        self._started = False

    @property
    def started(self) -> bool:
        """Whether :meth:`start` succeeded (and was not undone)."""
        return self._started

    @property
    def clean_stop(self) -> bool:
        """Whether the stop cut no request off (True until a stop has finished)."""
        return self._clean_stop

    @property
    def serving(self) -> bool:
        """Started, and no stop has begun: what ``/health`` says."""
        return self._started and not self._ctx.stop_announced

    # -- the stop phases, in order ---------------------------------------------------------

    def stop(
        self, timeout: float | None = None, *, on_phase: Callable[[str], None] | None = None
    ) -> bool:
        """Run the stop phases once and wait for them; safe to call more than once, from any
        greenlet (a second call waits for the first).

        Args:
            timeout: how long requests in flight may take to finish once the listener is
                closed; ``exit_wait_time`` when None.
            on_phase: called in the stopping greenlet after each phase with its name:
                ``"stopping"`` (after :meth:`begin_stop`; what it does before returning, the
                engine still serves through), ``"stopped accepting"``, ``"drained"``,
                ``"stopped"``.

        Returns:
            True if every request in flight finished; False if some were cut off.
        """
        if not self._started:
            self._stopped.set()
            return True
        if self._stop_greenlet is None:
            self._stop_greenlet = gevent.spawn(self._stop, timeout, on_phase)
        self._stopped.wait()
        return self._clean_stop

    def wait_stopped(self) -> None:
        """Block until a stop has finished."""
        self._stopped.wait()

    @property
    def stopped(self) -> bool:
        """Whether a stop has finished."""
        return bool(self._stopped.is_set())

    def _stop(self, timeout: float | None, on_phase: Callable[[str], None] | None) -> None:
        wait = self.config.exit_wait_time if timeout is None else timeout
        phase = on_phase or _nothing
        try:
            self.begin_stop()
            phase("stopping")
            self.close_listener()
            phase("stopped accepting")
            self._clean_stop = self.drain(time.monotonic() + wait)
            phase("drained")
            self.finish()
            phase("stopped")
        finally:
            self._stopped.set()

    def begin_stop(self) -> None:
        """Phase 1: say that this process is stopping (``/health`` 503, TTHeader ``crrst``);
        keep accepting and serving."""
        self._ctx.announce_stop()

    def close_listener(self) -> None:
        """Phase 2: stop accepting, take in what the kernel already accepted, close the socket.

        A shared listener (handed to :meth:`start`) stays open in the processes still
        accepting; its backlog is theirs, and its Unix socket path is never removed here.
        """
        acceptor = self._acceptor
        assert acceptor is not None
        acceptor.stop_accepting()
        binding = self.binding
        if binding is not None and binding.owned:
            # Closing the listener would reset connections still in its backlog; they are
            # taken in and served like the others (a request they sent gets its reply, then a
            # FIN).
            taken = acceptor.drain_backlog(self._take_in)
            if taken:
                self.log.info("took in the listen backlog", connections=taken)
        # close() rather than stop(): gevent's stop() would also kill our handlers.
        acceptor.close()
        if binding is not None:
            binding.release()
        self._ctx.finish_requests()

    def drain(self, deadline: float) -> bool:
        """Phase 3: end connections as they fall idle until none is left or ``deadline``
        (``time.monotonic()``) passes; then cut off what is left.

        Returns:
            True if no request was cut off.
        """
        streams = self._ctx.streams
        hand_over = self._ctx.hand_off is not None
        # A hand-off this engine said yes to before its stop began is waited for too: adopted,
        # its connection ends as the others do (handed on, or a FIN at a boundary); past the
        # drain, it would be ended unread, the sender having let go.
        while self._open or self._adoptions:
            # Handed over, a connection needs no grace: its next request reaches the other
            # worker as it would have reached this one.
            streams.end_idle(self._first_request_grace, hand_over=hand_over)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            waiting = self._all_closed if self._open else self._adoptions_settled
            waiting.wait(timeout=min(remaining, 0.05))
        if self._ctx.handing_off:
            give_up = time.monotonic() + self._hand_off_grace
            while self._ctx.handing_off and time.monotonic() < give_up:
                self._all_closed.wait(timeout=0.05)
        self._drain_over = True
        busy = streams.busy()
        if self._open:
            if busy:
                self.log.error(
                    "exit_wait_time passed with requests in flight; cutting them off",
                    connections=busy,
                )
            # The requests in flight end with their workers; the connections that wait (for
            # a request, or for their peer's FIN) close now.
            self._ctx.dispatcher.kill_busy()
            for connection in list(self._open):
                connection.cut_off()
            self._all_closed.wait(timeout=1.0)
        return busy == 0

    def finish(self) -> None:
        """Phase 4: stop the background greenlets and flush the panic log."""
        self._stop_background()
        self._ctx.dispatcher.close()
        self._finished = True
        self._stop_dispatching_when_done()
        self._ctx.panics.flush()

    def _stop_background(self) -> None:
        for part in (self.hub_watch, self.idle_sweeper):
            if part is not None:
                part.stop()

    # -- worker recycling ------------------------------------------------------------------

    def retire_after(self, requests: int, retire: Callable[[], object]) -> None:
        """Call ``retire`` once, when ``requests`` more requests have been answered."""
        self._ctx.on_budget_spent = retire
        self._ctx.request_budget = max(requests, 1)

    def hand_off_connections(self, hand_off: Callable[[Connection], bool], grace: float) -> None:
        """Make the next stop hand each connection over at a message boundary rather than end
        it: ``hand_off`` gives one connection to another process and says whether it took
        it; one it did not take ends with a FIN as in any stop. TTHeader replies stop asking
        Kitex clients to drop the connection (it lives on).

        ``grace``: the longest one ``hand_off`` call lasts. A hand-off still in progress when
        the stop's deadline passes is let finish for up to that long rather than cut: cut
        midway, the receiver drops its copy for want of the sender's release while the sender
        closes its own, and a client that already sent its next request reads a reset.
        """
        self._ctx.hand_off = hand_off
        self._hand_off_grace = grace

    def expect_adoption(self) -> bool:
        """A worker asks to hand a connection over: True if this engine serves (no stop has
        begun), and then its stop's drain waits, until its deadline, for that connection to be
        adopted or for :meth:`adoption_settled`; False: the sender keeps the connection.

        Call :meth:`adoption_settled` once for each True, whatever became of the hand-off.
        """
        if not self.serving:
            return False
        self._adoptions += 1
        self._adoptions_settled.clear()
        return True

    def adoption_settled(self) -> None:
        """A hand-off :meth:`expect_adoption` said yes to is over: adopted, or not coming."""
        self._adoptions -= 1
        if not self._adoptions:
            self._adoptions_settled.set()

    def adopt(self, sock: Any, address: Any, wire: Wire | None, pending: bytes) -> bool:
        """Serve a connection another worker handed over, from where it left it.

        Args:
            sock: the connection, a plain non-blocking socket.
            address: the peer's address as accept() gave it.
            wire: the wire detected on it, if any bytes were read yet.
            pending: bytes received there and not handed out (a pipelined request's start).

        Returns:
            False if this engine has not started, or its stop is past waiting for its
            connections (the caller ends the connection). A stopping engine still takes it:
            the sender let go once this worker said yes, and whether this worker began
            stopping in between is a race the client must not pay for; the connection then
            ends as the stop ends any other (handed on, or a FIN at a message boundary). It
            counts against this worker's connections, admitted whatever the limit (it was
            admitted once, and refusing it now would close a client's connection).
        """
        if not self._started or self._drain_over:
            return False
        # Not counted as accepted: the instance accepted it once, in the worker that retired.
        self.limiter.admit_connection(force=True)
        self._serve(sock, address, (wire, pending))
        return True

    # -- what the control plane reads and sets ---------------------------------------------

    def apply_limits(self, limits: Limits) -> Limits:
        """Enforce ``limits`` from now on (for this process: its share, with workers).

        Returns:
            The limits now in force.
        """
        return self.limiter.update(
            connections=limits.connections, qps=limits.qps, endpoint_qps=limits.endpoint_qps
        )

    @property
    def limits(self) -> Limits:
        """The limits this process enforces now."""
        return self.limiter.limits

    @property
    def connections(self) -> int:
        """Connections open now."""
        return self.limiter.connections

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

    def greenlets(self) -> int:
        """Greenlets this engine runs: the workers serving requests now or kept warm (none
        per connection), the sweeper, the hub watch."""
        workers = len(self._ctx.dispatcher)
        return workers + sum(1 for p in (self.idle_sweeper, self.hub_watch) if p)

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

    def _take_in(self, sock: Any, address: Any) -> None:
        self.limiter.admit_connection(force=True)
        self._handle(sock, address)

    def _handle(self, sock: Any, address: Any) -> None:
        # In the hub (the acceptor's callback): nothing here waits.
        if self.metrics is not None:
            self.metrics.connection_accepted()
        self._serve(sock, address)

    def _serve(
        self, sock: Any, address: Any, adopted: tuple[Wire | None, bytes] | None = None
    ) -> None:
        try:
            connection = Connection(sock, address, self._ctx, adopted)
        except BaseException:
            self.limiter.release_connection()
            sock.close()
            raise
        self._open.add(connection)
        self._all_closed.clear()
        connection.start()

    def _connection_closed(self, connection: Connection) -> None:
        self._open.discard(connection)
        self.limiter.release_connection()
        if not self._open:
            self._all_closed.set()
            self._stop_dispatching_when_done()

    def _stop_dispatching_when_done(self) -> None:
        """Stop the dispatcher once the stop has finished and the last connection closed (one
        that outlived the stop is served until it closes)."""
        if self._finished and not self._open:
            self._ctx.dispatcher.stop()

    def _dispatches(self) -> int:
        return self._ctx.dispatcher.dispatches

    def _count_hub_block(self) -> None:
        if self.metrics is not None:
            self.metrics.hub_blocked()

    def _runtime_figures(self) -> dict[str, float]:
        hub = gevent.get_hub()
        return {
            "connections_open": float(self.limiter.connections),
            "greenlets": float(self.greenlets()),
            "pending_callbacks": float(getattr(hub.loop, "pendingcnt", 0) or 0),
        }


def _nothing(phase: str) -> None:
    """No owner to tell of a stop phase."""
