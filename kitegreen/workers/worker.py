"""A worker process: what runs in the child after the arbiter forks.

In order: leave the arbiter's greenlets and descriptors behind (``fork.start_afresh``), ask the
kernel for SIGTERM should the arbiter die, start the heartbeat with its watchdog and the control
channel, install the worker's signal handlers, import the application afresh (the arbiter never
imports it, so a SIGHUP's new workers run the code as it is on disk now), give its server the
settings the arbiter hands it (the probe's: the config file is not read again), start an
:class:`~kitegreen.rpc.engine.Engine` for its service on the inherited listener and tell the
arbiter it is ready. It serves until the
arbiter tells it to stop (or a signal does), then sends its final figures and exits: 0 after a
clean stop, 1 when requests in flight were cut off or its watchdog ended it (its hub blocked for
``worker_timeout``), 2 when the application would not load.

A worker is the data plane only: the instance's control plane (Consul registration, the
remote configuration, the debug server, the limits) is the arbiter's
:class:`~kitegreen.instance.Instance`, which hands each worker its share of the limits and
tells it when to stop (after it has deregistered and waited ``drain_time``). The worker keeps
what belongs to its own process: its reports (to the application's reporter), its metrics,
and (in its engine) the watch of its own hub.
"""

from __future__ import annotations

import itertools
import signal
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import IO, TYPE_CHECKING, Any, NoReturn

import gevent
import structlog

from kitegreen.config import Config
from kitegreen.exceptions import ConfigError, LaunchError
from kitegreen.exits import EXIT_CRASHED, EXIT_OK, EXIT_UNCLEAN_STOP, EXIT_USAGE
from kitegreen.hooks import WORKER, Hooks
from kitegreen.limiter import Limits
from kitegreen.observability.events import EventQueue
from kitegreen.observability.metrics import process_figures
from kitegreen.observability.reporter import NullReporter, ReportGate
from kitegreen.signals import ServerStop, install_signal_handlers
from kitegreen.transport.listener import describe_address
from kitegreen.workers import fork
from kitegreen.workers.balance import AcceptBalance
from kitegreen.workers.board import Board, Slot
from kitegreen.workers.control import SEND_TIMEOUT, Channel
from kitegreen.workers.handoff import HANDOFF_GRACE, HandoffReceiver, HandoffSender, handoff_name
from kitegreen.workers.handoff import SUPPORTED as HANDOFF_SUPPORTED
from kitegreen.workers.heartbeat import Pulse, Watchdog
from kitegreen.workers.recycle import Recycler

if TYPE_CHECKING:
    from kitegreen.rpc.engine import Engine
    from kitegreen.server import RpcServer


IGNORED_SIGNALS = (
    signal.SIGINT,
    signal.SIGHUP,
    signal.SIGTTIN,
    signal.SIGTTOU,
    signal.SIGUSR2,
    signal.SIGWINCH,
)
"""Signals meant for the arbiter: a worker that receives one (a terminal's process group, a
careless ``kill``) ignores it rather than stopping, which is the default for TTIN and TTOU.
SIGINT among them: Ctrl-C reaches every process of the group, and the workers must keep
serving while the arbiter drains."""
MAX_ACCEPT = 1
"""Connections a worker accepts per wake-up of its accept loop: every worker is woken when a
connection arrives on the shared listener, and the first to run would otherwise take the whole
burst (gevent's default is 100). See the README's measurements."""
HEARTBEAT_INTERVAL_MAX = 1.0
STALE_BEATS = 3
"""Heartbeats a worker may miss before the others' accept balance stops counting on it."""


@dataclass(frozen=True)
class Application:
    """How a child process gets the application, as the launcher knows it.

    Attributes:
        load: imports the target and layers the config file, the environment and the flags
            on its settings (the probe: what the instance will run with).
        load_code: imports the target only (a worker, which is given the settings the probe
            reported rather than reading the config file and the environment again: a
            replacement runs with what was validated, whatever is on disk now).
        on_load_error: logs a LaunchError or ConfigError raised by either.
        layer: layers the config file, the environment and the flags on the code's settings
            (``--preload``: the arbiter loads the code once, and a reload only the settings).
    """

    load: Callable[[], RpcServer]
    load_code: Callable[[], RpcServer]
    on_load_error: Callable[[Exception], None]
    layer: Callable[[Config], Config] | None = None


@dataclass(frozen=True)
class WorkerSpec:
    """What the arbiter hands a worker across the fork.

    Attributes:
        listener: the bound listening socket, as a plain ``_socket.socket``.
        control: the worker's end of its control channel, a plain ``_socket.socket``.
        board: the instance's board.
        slot: its slot on the board (heartbeat, connections open, accepting).
        stack_file: where its watchdog writes its stacks (``heartbeat.py``).
        parent: the arbiter's pid.
        worker_timeout: seconds its hub may stay blocked before its watchdog ends it; the
            heartbeat beats four times as often (at most once a second).
        config: the worker engine's settings: the instance's, as the probe reported them
            (those the arbiter holds kept as they were at start), with the worker's share of
            the limits.
        app: how to import the application.
        signal_handles: the arbiter's signal handles, cancelled in the child.
    """

    listener: Any
    control: Any
    board: Board
    slot: Slot
    stack_file: IO[bytes]
    parent: int
    worker_timeout: float
    config: Config
    app: Application
    signal_handles: list[Any]


def run_worker(spec: WorkerSpec) -> NoReturn:
    """Run a worker in a just-forked child; never returns into the arbiter's code."""
    fork.run_child(lambda: _Worker(spec).run(), crashed=EXIT_CRASHED)


class _Worker:
    def __init__(self, spec: WorkerSpec) -> None:
        self.spec = spec
        self.engine: Engine | None = None
        self.server: RpcServer | None = None
        self.log = structlog.get_logger("kitegreen.worker")
        # The other workers' accept balance must not wait for a stopping worker to take
        # connections.
        self.stop = ServerStop(
            lambda: _EngineStop(self.engine) if self.engine is not None else None,
            self.log,
            before=lambda: spec.slot.set_accepting(False),
        )
        self.exiting = False
        self.channel: Channel | None = None
        self._stats_seq = itertools.count(1)
        self._interval = 1.0
        self._receiver: HandoffReceiver | None = None
        self._sender: HandoffSender | None = None

    def run(self) -> int:
        spec = self.spec
        fork.start_afresh(
            keep_fds=(spec.listener.fileno(), spec.control.fileno(), spec.stack_file.fileno()),
            signal_handles=spec.signal_handles,
        )
        if not fork.die_with_parent(signal.SIGTERM, spec.parent):
            return EXIT_OK  # the arbiter died while forking us: nobody to serve for
        interval = self._interval = min(spec.worker_timeout / 4, HEARTBEAT_INTERVAL_MAX)
        pulse = Pulse(
            spec.slot,
            interval,
            parent=spec.parent,
            open_connections=self._open_connections,
            orphaned=self._orphaned,
            watchdog=Watchdog(spec.worker_timeout, spec.stack_file),
            log=self.log,
        )
        # Armed now, before the application is imported with the hub blocked: an import that
        # hangs ends the worker, its stack in the log, as a blocked hub later would.
        pulse.beat()
        pulse.start()
        try:
            return self._serve(interval)
        finally:
            pulse.stop()

    def _serve(self, interval: float) -> int:
        spec = self.spec
        self.channel = Channel(
            socket.socket(fileno=spec.control.detach()),
            on_message=self._on_message,
            on_closed=self._channel_closed,
            log=self.log,
        )
        self.channel.start()
        # The arbiter stops its workers with a control message. SIGTERM is kept for the kernel
        # (PDEATHSIG) and for people; SIGINT is ignored (IGNORED_SIGNALS): a terminal's Ctrl-C
        # reaches the whole process group, and the arbiter must drain before its workers stop.
        install_signal_handlers(self.stop.actions(graceful=(signal.SIGTERM,)))
        fork.unblock_signals(ignore=IGNORED_SIGNALS)
        try:
            hooks = Hooks(spec.config, WORKER, self.log, worker=spec.slot.index)
        except ConfigError as exc:
            self.log.error("cannot start", error=str(exc))
            return EXIT_USAGE
        if not hooks.run("post_fork"):
            return EXIT_USAGE
        try:
            return self._serve_app(interval, hooks)
        finally:
            hooks.run("worker_exit", server=self.server)

    def _serve_app(self, interval: float, hooks: Hooks) -> int:
        spec = self.spec
        assert self.channel is not None
        try:
            server = self.server = spec.app.load_code()
            config = spec.config.replace(service_name=server.config.service_name)
        except (LaunchError, ConfigError) as exc:
            spec.app.on_load_error(exc)
            return EXIT_USAGE
        if not hooks.run("post_worker_init", server=server):
            return EXIT_USAGE
        engine = self.engine = _make_engine(server, config)
        if self.stop.requested:
            return EXIT_OK
        recycler = Recycler(config, self._retire, interval)
        if HANDOFF_SUPPORTED:
            # Before it is ready: a worker that retires may pick it as soon as it accepts.
            receiver = HandoffReceiver(
                handoff_name(spec.parent, spec.slot.index),
                engine.adopt,
                self.log,
                ready=engine.expect_adoption,
                settled=engine.adoption_settled,
            )
            try:
                receiver.start()
                self._receiver = receiver
            except OSError as exc:
                self.log.warning(
                    "cannot take connections handed over by other workers", error=str(exc)
                )
        balance = AcceptBalance(
            spec.board, spec.slot, self._open_connections, stale_after=STALE_BEATS * interval
        )
        binding = engine.start(
            listener=socket.socket(fileno=spec.listener.detach()),
            max_accept=MAX_ACCEPT,
            accept_gate=balance,
        )
        engine.log.info(
            "listening",
            address=describe_address(binding.address),
            limits={"conn": config.limit_connections, "qps": config.limit_qps},
        )
        spec.slot.set_accepting(True)
        recycler.start(engine)
        self.channel.send({"type": "ready"})
        engine.wait_stopped()
        recycler.stop()
        if self._receiver is not None:
            self._receiver.stop()
        clean = engine.clean_stop
        sender = self._sender
        if sender is not None:
            engine.log.info("connections handed over", handed=sender.handed, ended=sender.kept)
        engine.log.info("stopped", clean=clean)
        self.exiting = True
        self.channel.send({"type": "final", "stats": self.stats()})
        self.channel.flush(SEND_TIMEOUT)
        self.channel.close()
        return EXIT_OK if clean and not self.stop.quick else EXIT_UNCLEAN_STOP

    def _open_connections(self) -> int:
        return self.engine.connections if self.engine is not None else 0

    def stats(self) -> dict[str, Any]:
        """This worker's figures for the arbiter (see ``control.py``), numbered: the arbiter
        keeps only the newest it received."""
        engine = self.engine
        return {
            "seq": next(self._stats_seq),
            "metrics": engine.metrics.snapshot() if engine and engine.metrics else None,
            "overload": engine.overload() if engine else None,
            "process": process_figures(),
        }

    def _on_message(self, message: dict[str, Any]) -> None:
        kind = message.get("type")
        if kind == "stats" and self.channel is not None:
            self.channel.send({"reply_to": message.get("id"), **self.stats()})
        elif kind == "limits" and self.engine is not None:
            self._take_share(message)
        elif kind == "stop":
            # In a greenlet of its own: a stop waits for the drain, and the channel must go on
            # answering meanwhile.
            if message.get("hand_off") and HANDOFF_SUPPORTED and self.engine is not None:
                self._sender = HandoffSender(
                    self.spec.board,
                    self.spec.slot,
                    self.spec.parent,
                    STALE_BEATS * self._interval,
                    self.log,
                )
                self.engine.hand_off_connections(self._sender, grace=HANDOFF_GRACE)
            if message.get("graceful", True):
                gevent.spawn(self.stop.graceful, "asked to stop by the arbiter")
            else:
                gevent.spawn(
                    self.stop.at_once, "asked by the arbiter to stop at once without draining"
                )

    def _retire(self, reason: str, **figures: Any) -> None:
        """Ask the arbiter to recycle this worker; it serves on until it is told to stop."""
        self.spec.slot.set_retiring()
        self.log.info("asking to be recycled", reason=reason, **figures)
        if self.channel is not None:
            self.channel.send({"type": "retire", "reason": reason, **figures})

    def _take_share(self, message: dict[str, Any]) -> None:
        """Enforce the share of the instance's limits the arbiter sent."""
        assert self.engine is not None
        share = Limits(
            int(message["limit_connections"]),
            int(message["limit_qps"]),
            {str(m): int(q) for m, q in dict(message["endpoint_qps_limits"]).items()},
        )
        before = self.engine.limits
        after = self.engine.apply_limits(share)
        if after != before:
            # This worker's share; the instance's limits are the arbiter's "limits changed".
            self.engine.log.info(
                "limit share changed",
                source=str(message.get("source", "arbiter")),
                conn=after.connections,
                qps=after.qps,
                endpoint_qps=dict(after.endpoint_qps),
            )

    def _orphaned(self) -> None:
        gevent.spawn(self.stop.graceful, "the arbiter is gone; stopping", arbiter=self.spec.parent)

    def _channel_closed(self) -> None:
        if not self.exiting and not self.stop.requested:
            gevent.spawn(
                self.stop.graceful, "the control channel closed: the arbiter is gone; stopping"
            )


def _make_engine(server: RpcServer, config: Config) -> Engine:
    """The worker's engine for the application's service, reporting to its reporter."""
    log = structlog.get_logger("kitegreen").bind(service=config.service_name)
    events = EventQueue(config.event_capacity)
    reports = ReportGate(config.report_interval, events, server.reporter or NullReporter(), log)
    return server.make_engine(config, reports, log)


class _EngineStop:
    """A worker's stop: the engine's phases, with no drain time (the arbiter waited it out
    before it asked) and the ``stopping`` line a single process writes too."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    def stop(self, timeout: float | None = None) -> bool:
        return self._engine.stop(timeout, on_phase=self._on_phase)

    def _on_phase(self, phase: str) -> None:
        if phase == "stopping":
            engine = self._engine
            engine.log.info(
                "stopping",
                connections=engine.connections,
                drain_time=0.0,
                exit_wait_time=engine.config.exit_wait_time,
            )
