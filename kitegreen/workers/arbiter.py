"""The arbiter: one kitegreen instance as a supervised group of worker processes.

The arbiter binds the listener once, forks the workers, and then only supervises; it serves
no RPC itself. Its main loop runs in the main greenlet (every fork happens there, so that a
child starts from a known place) and waits on one queue: signal handlers only put the signal
there, the hub's child watchers put exits there, the control channels put ready notices there,
and the greenlets that wait on slow things (a reload's probe, the deregistration from Consul)
put their results there. Between events it checks the heartbeats and brings the workers to the
number wanted; nothing in the loop waits on a worker, a probe or Consul.

=========  ====================================================================================
signal     what the arbiter does
=========  ====================================================================================
TERM, INT  graceful stop: deregister from Consul, keep serving ``drain_time``, then tell
           every worker to stop (each drains as a single process does); exit 0 if all stopped
           cleanly, 1 otherwise. Connections that reach the shared backlog meanwhile get a
           clean end-of-stream (FIN) before any byte, never a reset. Workers exiting during
           the drain or the stop (a service manager that signals every process) are neither
           counted as crashes nor replaced.
QUIT       log the stacks, tell every worker to stop at once (no drain); exit 1. During a
           graceful stop it cuts the drain short.
HUP        rolling reload: a probe loads the code and settings afresh while the loop goes on
           (if they fail, nothing changes); then, one at a time, a new worker is started and,
           once it is ready, an old one is stopped, handing its connections to the live
           workers (``handoff.py``). The listener is never closed, so clients calling in a
           loop see neither a refused connection nor a reset, and keep-alive ones no close.
           One reload at a time: a HUP during one starts another when it ends. ``--reload``
           does the same when a file of the application changes (``watch.py``).
TTIN/TTOU  one worker more / fewer (at least one); the limits are shared anew as workers
           become ready or exit.
USR1       log the arbiter's stacks and have every worker log its own.
USR2       logged and ignored: binary upgrade is not supported.
=========  ====================================================================================

Recycling (``recycle.py``): a worker that asks to retire (``max_requests``,
``max_worker_memory``) is replaced new-first, and stopped only while the workers ready without
it still number those wanted; its connections are handed over as in a reload.

Supervision: a worker that exits unasked is replaced. One that exits before it was ready or
within :data:`~kitegreen.workers.crashes.CRASH_WINDOW` of being ready counts as a start-up
crash; the next is spawned after an exponential backoff, and after
:data:`~kitegreen.workers.crashes.MAX_STARTUP_CRASHES` with no proof of health between them
(``crashes.py``) the instance stops with exit status 4 and says why. During a reload the new
generation's crashes are counted apart: when they exhaust their count the reload is aborted
(the new workers are stopped, the previous settings and generation restored) and the instance
keeps serving. A spawn that fails (no descriptor, no memory, no free slot on the board) is
tried again after a backoff.

A worker whose hub has not run for ``worker_timeout`` (it is blocked, or hangs while
importing) is ended by its own watchdog, which writes its stacks to a file the arbiter logs
when it reaps the worker; the arbiter replaces it, and kills a worker whose heartbeat stays
stale past that (SIGSTOP, stuck in the kernel). No worker outlives the arbiter: each asks the
kernel for SIGTERM when the arbiter dies (Linux), stops by itself when its control channel
reads end-of-stream or its parent changes, and its watchdog ends it if its hub is blocked
meanwhile.

The arbiter stops a worker with a message on its control channel, not a signal: a worker
ignores SIGINT (a terminal's Ctrl-C reaches the whole process group) and acts on SIGTERM only
when someone else sends it (the kernel when the arbiter dies, a person).

The listener is shared, not one ``SO_REUSEPORT`` socket per worker: see the README
("Workers") for the measurements behind that choice.
"""

from __future__ import annotations

import _socket
import contextlib
import functools
import itertools
import math
import os
import signal
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import gevent
import structlog
from gevent.pool import Pool
from gevent.queue import Empty, Queue

from kitegreen.config import DEFAULT_WORKER_TIMEOUT, MAX_WORKERS, Config
from kitegreen.config.hook_settings import HOOK_NAMES
from kitegreen.discovery.backoff import Backoff
from kitegreen.exceptions import ConfigError, ListenError, describe
from kitegreen.exits import (
    EXIT_LISTEN,
    EXIT_OK,
    EXIT_UNCLEAN_STOP,
    EXIT_USAGE,
    EXIT_WORKERS_FAILED,
)
from kitegreen.hooks import ARBITER, Hooks
from kitegreen.instance import Instance, local_limits
from kitegreen.observability.events import EventQueue
from kitegreen.observability.reporter import NullReporter, ReportGate
from kitegreen.signals import format_stacks, install_signal_handlers
from kitegreen.transport.acceptor import take_backlog
from kitegreen.transport.listener import Binding, ListenSpec, describe_address, listen
from kitegreen.transport.stream import CLOSE_LINGER, MessageStream
from kitegreen.workers import fork
from kitegreen.workers.board import Board
from kitegreen.workers.control import Channel
from kitegreen.workers.crashes import CrashPolicy
from kitegreen.workers.fleet import Fleet, ready_count
from kitegreen.workers.preload import preload as preload_application
from kitegreen.workers.probe import probe_config, probe_timeout
from kitegreen.workers.process import BOOTING, WorkerProcess
from kitegreen.workers.recycle import plan_recycling
from kitegreen.workers.reload import RollingReload
from kitegreen.workers.watch import CodeWatcher, drop_cached_bytecode, require_watchfiles
from kitegreen.workers.worker import Application, WorkerSpec, run_worker

STOP_GRACE = 2.0
"""Seconds past ``exit_wait_time`` that the arbiter waits for workers to exit before it kills
what is left (a worker cuts its requests off at ``exit_wait_time`` by itself)."""
FINAL_WAIT = 1.0
"""Seconds an exited worker's final figures are awaited on its channel."""
DEREGISTER_WAIT = 5.0
"""Seconds the arbiter waits at its exit for a deregistration still under way (the registrar
bounds its own calls)."""
MAX_CLOSERS = 256
"""Connections the arbiter closes at once during the final stop (each lingers up to a
second reading what its client sends)."""
WATCHDOG_GRACE = 2.0
"""Seconds past ``worker_timeout`` after which the arbiter kills a worker whose heartbeat is
stale: its own watchdog should have ended it by then (see ``heartbeat.py``)."""
SPAWN_RETRY_INITIAL = 0.1
SPAWN_RETRY_MAX = 5.0
TICK = 0.25
STOP_TICK = 0.05

SERVING = "serving"
DRAINING = "draining"
STOPPING_PHASE = "stopping"

_SIGNALS = (
    signal.SIGTERM,
    signal.SIGINT,
    signal.SIGQUIT,
    signal.SIGHUP,
    signal.SIGTTIN,
    signal.SIGTTOU,
    signal.SIGUSR1,
    signal.SIGUSR2,
)


def serve(
    app: Application,
    log: Any = None,
    *,
    worker_timeout: float = DEFAULT_WORKER_TIMEOUT,
    preload: bool = False,
    reload: bool = False,
    watch: Path | None = None,
) -> int:
    """Probe the application, bind, fork the workers and supervise them until stopped.

    Args:
        app: how to load the application (only in forked children: the probe and the
            workers).
        log: a structlog logger.
        worker_timeout: ``worker_timeout`` as the launcher knows it before the probe (from the
            config file, the environment and the flags): the probe gets as long as a reload's
            would (:func:`~kitegreen.workers.probe.probe_timeout`).
        preload: ``preload`` as the launcher knows it before the probe: the arbiter loads the
            application itself instead of probing (``preload.py``); set only in the code, it is
            learnt from the probe.
        reload: ``reload`` as the launcher knows it before the probe: no bytecode is written
            from the first import on (set only in the code, it is learnt from the probe).
        watch: the application's directory, watched when the settings ask for ``reload``.

    Returns:
        The launcher's exit status: 0 clean, 1 unclean or SIGQUIT, 2 the application or its
        settings would not load, or a part of the instance would not start with them, 3 the
        listener could not be created, 4 workers kept exiting at start-up.
    """
    log = log or structlog.get_logger("kitegreen.arbiter")
    # The workers import the server's modules anyway; importing them here once shares their
    # memory between the workers (copy-on-write) and takes the time out of each worker's start.
    import kitegreen.server  # noqa: F401

    if reload:
        # Before the probe's import: see the same line below.
        sys.dont_write_bytecode = True
    config: Config | None = None
    if not preload:
        probed = probe_config(
            app, signal_handles=(), timeout=probe_timeout(worker_timeout), log=log
        )
        if isinstance(probed, int):
            return probed
        config = probed
    if config is None or config.preload:
        loaded = preload_application(app, log)
        if isinstance(loaded, int):
            return loaded
        app, config = loaded
    if config.reload:
        try:
            if config.preload:
                # A preloaded application's code lives in the arbiter, which a reload keeps:
                # a file change could reload the settings only, which is not what --reload
                # promises.
                raise ConfigError(
                    "reload and preload cannot be used together: --reload loads changed code "
                    "in fresh workers, --preload keeps the code the arbiter imported"
                )
            require_watchfiles()
        except ConfigError as exc:
            log.error("cannot start", error=str(exc))
            return EXIT_USAGE
        # Every probe and worker imports the application afresh; written bytecode would let a
        # file rewritten within the second with the same size load stale (a .pyc is checked
        # against the source's mtime in whole seconds and its size). Set here when only the
        # code asked for reload (the probe has written the first import's bytecode by then:
        # _on_changed drops a changed file's).
        sys.dont_write_bytecode = True
    try:
        hooks = Hooks(config, ARBITER, log)
    except ConfigError as exc:
        log.error("cannot start", error=str(exc))
        return EXIT_USAGE
    if not hooks.run("on_starting"):
        return EXIT_USAGE
    try:
        arbiter = Arbiter(config, app, log, hooks=hooks, watch=watch)
    except ListenError as exc:
        log.error("cannot listen", error=str(exc))
        status = EXIT_LISTEN
    else:
        status = arbiter.run()
    hooks.run("on_exit")
    return status


class Arbiter:
    """Runs one instance of the application as ``config.workers`` worker processes.

    Binds the listener on construction (nothing is forked until :meth:`run`).

    Args:
        config: the application's effective settings, as the probe reported them.
        app: how to load the application (in the probes and the workers).
        log: a structlog logger.
        hooks: the arbiter's hooks (``when_ready``, ``on_reload``); none when None.
        watch: the directory whose changes reload the workers (``--reload``), or None.

    Raises:
        ListenError: the listener could not be created.
    """

    def __init__(
        self,
        config: Config,
        app: Application,
        log: Any,
        *,
        hooks: Hooks | None = None,
        watch: Path | None = None,
    ) -> None:
        self._config = config
        self._hooks = hooks or Hooks(config.replace(**dict.fromkeys(HOOK_NAMES)), ARBITER, log)
        self._ready_once = False
        self._app = app
        self.log = log
        self._events: Queue[tuple[Any, ...]] = Queue()
        self._workers: dict[int, WorkerProcess] = {}
        self._board = Board()
        self._signal_handles: list[Any] = []
        self._closers = Pool(size=MAX_CLOSERS)
        """Connections taken from the backlog once every worker was told to stop, closing."""
        self._retiring = Pool()
        """Exited workers whose final figures are awaited."""
        self._deregistering: gevent.Greenlet | None = None
        self._drain = 0.0
        self._phase = SERVING
        self._wanted = config.workers
        self._age = 0
        self._crashes = CrashPolicy()
        """Start-up crashes of the generation in service (and of older ones still running)."""
        self._reload = RollingReload(
            app,
            log,
            post=self._events.put,
            push_event=self._push_event,
            may_reload=lambda: self._phase == SERVING,
            signal_handles=lambda: self._signal_handles,
            settings=lambda: (self._config, self._wanted),
            adopt=self._adopt,
            stop_generation=self._stop_generation,
        )
        self._watcher = (
            CodeWatcher(watch, self._changed, log) if config.reload and watch is not None else None
        )
        self._restarts = 0
        self._spawn_not_before = 0.0
        self._spawn_backoff = Backoff(initial=SPAWN_RETRY_INITIAL, maximum=SPAWN_RETRY_MAX)
        """Waits after a spawn failed for want of a slot, a descriptor or memory."""
        self._drain_until = math.inf
        self._kill_at = 0.0
        self._killed_all = False
        self._stop_signal = signal.SIGTERM
        self._clean = True
        self._failed = False
        self._start_failed = False
        self._listen_failed = False
        spec = ListenSpec.from_config(config)
        sock = listen(spec, config.backlog)
        self._binding = Binding(spec, sock, owned=True)
        self.address = self._binding.address
        # A plain socket: the workers inherit it across the fork, where gevent's would be tied
        # to the arbiter's hub; the arbiter itself only ever accepts from it without waiting.
        self._listener = _socket.socket(fileno=sock.detach())
        self._listener.setblocking(False)
        try:
            self.fleet = Fleet(
                config,
                local_limits(config),
                workers=lambda: list(self._workers.values()),
                arbiter=self._state,
                healthy=self._healthy,
            )
            events = EventQueue(config.event_capacity)
            self.instance = Instance(
                config,
                self.fleet,
                events=events,
                reports=ReportGate(config.report_interval, events, NullReporter(), log),
                log=log,
            )
        except BaseException:
            self._close_listener()
            raise

    def run(self) -> int:
        """Fork the workers and supervise them until a signal stops the instance.

        Returns:
            The exit status (see :func:`serve`).
        """
        config = self._config
        self.log.info(
            "listening",
            address=describe_address(self.address),
            workers=config.workers,
            worker_timeout=config.worker_timeout,
            limits={"conn": config.limit_connections, "qps": config.limit_qps},
        )
        self._signal_handles = install_signal_handlers(
            {sig: functools.partial(self._events.put, ("signal", sig)) for sig in _SIGNALS}
        )
        try:
            try:
                self.instance.start(self._binding)
            except ConfigError as exc:
                self.log.error("cannot start", error=str(exc))
                self._start_failed = True
            except ListenError as exc:
                # The debug port taken (and the debug server not optional).
                self.log.error("cannot listen", error=str(exc))
                self._listen_failed = True
            else:
                self._start_watching()
                self._supervise()
        finally:
            if self._watcher is not None:
                self._watcher.stop()
            for handle in self._signal_handles:
                handle.cancel()
            # Only after a failure of the arbiter's own: the workers would stop by themselves
            # once it exits, but not before its listener and registration are gone.
            for worker in self._workers.values():
                worker.stop()
            self._reload.close()
            self._close_listener()
            if self._deregistering is not None:
                self._deregistering.join(timeout=DEREGISTER_WAIT)
            self.instance.stop()
            self._retiring.join(timeout=FINAL_WAIT + 1.0)
            self._closers.join(timeout=CLOSE_LINGER + 1.0)
            if self._phase == STOPPING_PHASE:
                self.instance.stop_phase("stopped")
        status = self._exit_status()
        self.log.info("stopped", clean=status == EXIT_OK, status=status)
        return status

    def _exit_status(self) -> int:
        if self._listen_failed:
            return EXIT_LISTEN
        if self._start_failed:
            return EXIT_USAGE
        if self._failed:
            return EXIT_WORKERS_FAILED
        if self._clean and self._stop_signal != signal.SIGQUIT:
            return EXIT_OK
        return EXIT_UNCLEAN_STOP

    def _supervise(self) -> None:
        while True:
            self._handle_events(timeout=self._next_wakeup())
            now = time.monotonic()
            if self._phase == STOPPING_PHASE:
                self._refuse_backlog()
                if not self._workers:
                    self.instance.stop_phase("drained")
                    return
                if now >= self._kill_at and not self._killed_all:
                    self._kill_remaining()
                continue
            if self._phase == DRAINING and now >= self._drain_until:
                self._signal_stop(now)
                continue
            self._check_heartbeats(now)
            if self._phase == SERVING:
                self._manage(now)

    def _next_wakeup(self) -> float:
        if self._phase == STOPPING_PHASE:
            return STOP_TICK
        wake = TICK
        now = time.monotonic()
        if self._spawn_not_before > now:
            wake = min(wake, self._spawn_not_before - now)
        for policy in (self._crashes, self._reload.crashes):
            if policy is not None and policy.wait() > 0:
                wake = min(wake, policy.wait())
        if self._phase == DRAINING:
            wake = min(wake, max(self._drain_until - now, 0.0))
        return max(wake, 0.0)

    def _handle_events(self, timeout: float) -> None:
        try:
            event = self._events.get(timeout=timeout)
        except Empty:
            return
        while True:
            self._dispatch(event)
            try:
                event = self._events.get_nowait()
            except Empty:
                return

    def _dispatch(self, event: tuple[Any, ...]) -> None:
        kind = event[0]
        if kind == "signal":
            self._on_signal(event[1])
        elif kind == "exit":
            self._on_exit(event[1], event[2])
        elif kind == "ready":
            self._on_ready(event[1])
        elif kind == "probed":
            self._reload.probed(event[1], event[2])
        elif kind == "deregistered":
            self._on_deregistered()
        elif kind == "retire":
            self._on_retire(event[1], event[2])
        elif kind == "changed":
            self._on_changed(event[1], event[2])

    # -- signals -------------------------------------------------------------------------------

    def _on_signal(self, signum: signal.Signals) -> None:
        if signum in (signal.SIGTERM, signal.SIGINT):
            self._begin_stop(signum, graceful=True)
        elif signum == signal.SIGQUIT:
            self.log.warning(
                "signal received, stopping at once without draining",
                signal=signum.name,
                stack=format_stacks(),
            )
            self._begin_stop(signum, graceful=False)
        elif signum == signal.SIGHUP:
            if self._phase == SERVING:
                self._hooks.run("on_reload")
            self._reload.request()
        elif signum in (signal.SIGTTIN, signal.SIGTTOU):
            self._scale(1 if signum == signal.SIGTTIN else -1, signum)
        elif signum == signal.SIGUSR1:
            self.log.info("greenlet and thread stacks", signal=signum.name, stack=format_stacks())
            for worker in self._workers.values():
                worker.send_signal(signal.SIGUSR1)
        else:
            self.log.warning(
                "signal ignored: binary upgrade is not supported; still serving",
                signal=signum.name,
            )

    def _begin_stop(self, signum: signal.Signals, *, graceful: bool) -> None:
        if self._phase == STOPPING_PHASE:
            if not graceful and self._stop_signal != signal.SIGQUIT:
                self._stop_signal = signal.SIGQUIT
                for worker in self._workers.values():
                    worker.stop(graceful=False)
                self._kill_at = min(self._kill_at, time.monotonic() + STOP_GRACE)
            return
        self._stop_signal = signal.SIGTERM if graceful else signal.SIGQUIT
        self._reload.cancel()
        if self._phase == DRAINING:
            if not graceful:
                self._signal_stop(time.monotonic())
            return
        config = self._config
        drain = self.instance.drain_time if graceful else 0.0
        self.log.info(
            "stopping",
            signal=signum.name,
            workers=len(self._workers),
            drain_time=drain,
            exit_wait_time=config.exit_wait_time,
        )
        self._phase = DRAINING
        self._drain = drain
        if not graceful:
            self._signal_stop(time.monotonic())
        # First, so that clients stop picking this instance while it still serves them; off
        # the loop, since the registry may take seconds to answer: the drain time starts once
        # it has.
        self._drain_until = math.inf
        self._deregistering = gevent.spawn(self._deregister)

    def _deregister(self) -> None:
        self.instance.deregister()
        self._events.put(("deregistered",))

    def _on_deregistered(self) -> None:
        if self._phase == DRAINING:
            self._drain_until = time.monotonic() + self._drain

    def _signal_stop(self, now: float) -> None:
        self._phase = STOPPING_PHASE
        for worker in self._workers.values():
            worker.stop(graceful=self._stop_signal == signal.SIGTERM)
        # Each worker closes its listener now; what reaches the shared backlog from here on
        # is refused with a FIN (_refuse_backlog).
        self.instance.stop_phase("stopped accepting")
        wait = self._config.exit_wait_time if self._stop_signal == signal.SIGTERM else 0.0
        self._kill_at = now + wait + STOP_GRACE

    def _kill_remaining(self) -> None:
        self._killed_all = True
        self._clean = False
        self.log.error(
            "workers still running after exit_wait_time; killing them",
            pids=sorted(self._workers),
        )
        for worker in self._workers.values():
            worker.send_signal(signal.SIGKILL)

    def _scale(self, delta: int, signum: signal.Signals) -> None:
        if self._phase != SERVING:
            return
        wanted = min(max(self._wanted + delta, 1), MAX_WORKERS)
        if wanted == self._wanted:
            self.log.warning(
                "signal ignored: workers unchanged", signal=signum.name, workers=wanted
            )
            return
        self._wanted = wanted
        self._reload.rescaled(wanted)
        self.log.info("workers wanted changed", signal=signum.name, workers=wanted)
        self.instance.push_event("Workers", f"{signum.name}: {wanted} workers wanted")

    # -- --reload ----------------------------------------------------------------------------

    def _start_watching(self) -> None:
        if self._watcher is None:
            return
        try:
            self._watcher.start(self._signal_handles)
        except OSError as exc:
            self.log.error("cannot watch for changes: only SIGHUP reloads", error=describe(exc))
            self._watcher = None

    def _changed(self, paths: list[str], count: int) -> None:
        # In the watcher channel's reader greenlet: queued, acted on by the loop.
        self._events.put(("changed", paths, count))

    def _on_changed(self, paths: list[str], count: int) -> None:
        if self._phase != SERVING:
            return
        self.log.info("files changed; reloading", files=paths, count=count)
        drop_cached_bytecode(paths)
        self._reload.request()

    # -- what the reload changes ---------------------------------------------------------------

    def _adopt(self, config: Config, wanted: int) -> None:
        self._config = config
        self._wanted = wanted
        self.instance.reconfigure(config)

    def _stop_generation(self, generation: int) -> None:
        for worker in self._workers.values():
            if worker.generation == generation:
                worker.stop()

    def _push_event(self, name: str, detail: str) -> None:
        self.instance.push_event(name, detail)

    # -- workers -------------------------------------------------------------------------------

    def _manage(self, now: float) -> None:
        """Bring the workers to the number wanted: replace, scale, recycle, roll a reload
        forward."""
        live = [w for w in self._workers.values() if w.live]
        generation = self._reload.generation
        outdated = [w for w in live if w.generation < generation]
        reload_crashes = self._reload.crashes
        if reload_crashes is None:
            self._crashes.note_health(live)
        else:
            self._crashes.note_health(outdated)
            reload_crashes.note_health([w for w in live if w.generation == generation])
        if not outdated and self._reload.rolling:
            # The new generation is the one in service now, crashes counted so far included.
            self._crashes = self._reload.complete() or self._crashes
            reload_crashes = None
        # Outdated and retiring workers alike go, each once a replacement is ready.
        old = sorted(
            (w for w in live if w.generation < generation or w.retiring), key=lambda w: w.age
        )
        current = sorted(
            (w for w in live if w.generation == generation and not w.retiring),
            key=lambda w: w.age,
        )
        if not old:
            # The highest-numbered go: the numbers (the workers' metrics label) stay 0 to N-1.
            for worker in sorted(current, key=lambda w: w.rank)[self._wanted :]:
                self.log.info("stopping a worker: fewer wanted", worker=worker.pid)
                worker.stop(hand_off=True)
            if self._may_spawn(now, self._crashes):
                for _ in range(self._wanted - len(current)):
                    if not self._spawn():
                        break
            return
        if reload_crashes is None:
            spawn, stop = plan_recycling(old, current, live, self._wanted)
            for worker in stop:
                self.log.info(
                    "stopping a worker: recycled",
                    worker=worker.pid,
                    reason=worker.retiring,
                    ready_left=ready_count(self._workers.values()) - 1,
                )
                worker.stop(hand_off=True)
            if self._may_spawn(now, self._crashes):
                for _ in range(spawn):
                    if not self._spawn():
                        break
            return
        # A reload rolls one worker at a time: a new one first, an old one once it is ready.
        if any(w.state == BOOTING for w in current):
            return
        if len(live) > self._wanted:
            if not reload_crashes.proven:
                # A new worker crashed: no old one stops until a new one has proved itself.
                return
            # One still booting first (spawned before the SIGHUP, to replace a worker that
            # exited or retired): stopping it takes nothing from the workers ready, which must
            # never drop below the number wanted.
            victim = next((w for w in old if w.state == BOOTING), None)
            if victim is None and ready_count(live) > self._wanted:
                victim = old[0]
            if victim is None:
                return
            self.log.info("stopping an old worker: reload", worker=victim.pid)
            victim.stop(hand_off=True)
        elif self._may_spawn(now, reload_crashes):
            self._spawn()

    def _on_retire(self, pid: int, message: dict[str, Any]) -> None:
        worker = self._workers.get(pid)
        if self._phase != SERVING or worker is None:
            return
        reason = str(message.get("reason", "asked"))
        if not worker.mark_retiring(reason):
            return
        figures = {k: v for k, v in message.items() if k not in ("type", "reason")}
        self.log.info("worker retiring; replacing it", worker=pid, reason=reason, **figures)
        self.instance.push_event("Worker Recycle", f"{pid}: {reason}")

    def _may_spawn(self, now: float, crashes: CrashPolicy) -> bool:
        return now >= self._spawn_not_before and crashes.may_spawn()

    def _spawn(self, rank: int | None = None) -> bool:
        """Fork one worker. When there is no free slot on the board (workers still stopping),
        no descriptor or no memory to fork, spawns wait with a backoff: nothing a spawn does
        may end the arbiter.

        Args:
            rank: the worker's number (its metrics label); by default the lowest that no live
                worker of the generation in service holds, retiring ones aside: a replacement
                takes over the number of the worker it replaces (a recycled one included), a
                reload's new workers those of the old.

        Returns:
            Whether a worker was forked.
        """
        if rank is None:
            generation = self._reload.generation
            held = {
                w.rank
                for w in self._workers.values()
                if w.live and w.generation == generation and not w.retiring
            }
            rank = next(i for i in itertools.count() if i not in held)
        with contextlib.ExitStack() as allocated:
            try:
                used = {w.slot.index for w in self._workers.values()}
                free = next((i for i in range(self._board.size) if i not in used), None)
                if free is None:
                    self._defer_spawns("no slot free on the board: workers are still stopping")
                    return False
                stack_file = allocated.enter_context(tempfile.TemporaryFile())
                parent_end, child_end = _socket.socketpair()
                allocated.callback(parent_end.close)
                allocated.callback(child_end.close)
                self._age += 1
                slot = self._board.slot(free)
                spec = WorkerSpec(
                    listener=self._listener,
                    control=child_end,
                    board=self._board,
                    slot=slot,
                    stack_file=stack_file,
                    parent=os.getpid(),
                    worker_timeout=self._config.worker_timeout,
                    config=self._worker_config(),
                    app=self._app,
                    signal_handles=self._signal_handles,
                )
                pid = fork.fork(self._child_exited)
            except OSError as exc:
                self._defer_spawns("cannot start a worker", error=describe(exc))
                return False
            if pid == 0:
                run_worker(spec)
            allocated.pop_all()
        self._spawn_backoff.reset()
        child_end.close()
        channel = Channel(
            socket.socket(fileno=parent_end.detach()),
            on_message=functools.partial(self._on_message, pid),
            on_closed=lambda: None,
            log=self.log.bind(worker=pid),
        )
        self._workers[pid] = WorkerProcess(
            pid, self._age, self._reload.generation, channel, slot, stack_file, rank
        )
        self.fleet.stats.track(pid)
        channel.start()
        self.log.info("worker spawned", worker=pid, generation=self._reload.generation)
        return True

    def _defer_spawns(self, reason: str, **fields: Any) -> None:
        delay = self._spawn_backoff.next()
        self._spawn_not_before = time.monotonic() + delay
        self.log.error(f"{reason}; trying again later", retry_in=round(delay, 3), **fields)

    def _worker_config(self) -> Config:
        """The instance's settings as the probe reported them, for one worker's engine, with
        the share of the limits it will have once ready (with those serving and those starting
        with it)."""
        return self._config.replace(
            **self.fleet.worker_limits(max(self.fleet.serving() + 1, self._wanted))
        )

    def _child_exited(self, pid: int, status: int) -> None:
        # In the hub: mark and queue. The child is reaped by now and its pid free for another
        # process, so nothing may signal it from here on, though its exit is still queued.
        worker = self._workers.get(pid)
        if worker is not None:
            worker.mark_reaped()
        self._events.put_nowait(("exit", pid, status))

    def _on_message(self, pid: int, message: dict[str, Any]) -> None:
        kind = message.get("type")
        if kind == "ready":
            self._events.put(("ready", pid))
        elif kind == "retire":
            self._events.put(("retire", pid, message))
        elif kind == "final" and isinstance(message.get("stats"), dict):
            self.fleet.stats.update(pid, message["stats"])

    def _on_ready(self, pid: int) -> None:
        worker = self._workers.get(pid)
        if worker is None or not worker.mark_ready():
            return
        assert worker.ready_at is not None
        self.log.info(
            "worker ready",
            worker=pid,
            generation=worker.generation,
            seconds=round(worker.ready_at - worker.spawned_at, 3),
        )
        # One more worker serving: every share shrinks (limits may also have changed while it
        # was starting).
        self.instance.reapply_limits(source="workers")
        if not self._ready_once and ready_count(self._workers.values()) >= self._wanted:
            self._ready_once = True
            if not self._hooks.run("when_ready", address=self.address):
                self._start_failed = True
                self._begin_stop(signal.SIGTERM, graceful=True)

    def _on_exit(self, pid: int, status: int) -> None:
        fork.reap(pid)
        worker = self._workers.pop(pid, None)
        if worker is None:
            return
        worker.mark_exited(status)
        heartbeat_age = worker.slot.age()
        # Its slot is free for the next spawn from now on.
        worker.slot.clear()
        if worker.ready_at is not None:
            # One fewer serving: the others' shares grow only now that it no longer serves.
            self.instance.reapply_limits(source="workers")
        stack = worker.read_stack()
        if stack:
            worker.mark_timed_out()
            self.log.error(
                "worker timed out: its hub did not run for worker_timeout; its watchdog wrote "
                "its stacks and ended it",
                worker=pid,
                seconds=round(heartbeat_age, 3),
                worker_timeout=self._config.worker_timeout,
                stack=stack,
            )
        # Its final figures are on the channel ahead of the end-of-stream; the loop does not
        # wait for them (one exit after another would hold it a second each).
        self._retiring.spawn(self._retire, worker)
        if self._phase != SERVING:
            # Draining or stopping: an exit is expected (a service manager may have signalled
            # every process), and nothing is replaced any more.
            if worker.exit_code != 0:
                self._clean = False
            self.log.info("worker stopped", worker=pid, exit=worker.describe_exit())
            return
        if worker.stop_requested:
            self.log.info("worker stopped", worker=pid, exit=worker.describe_exit())
            return
        self._restarts += 1
        reload_crashes = self._reload.crashes
        new_generation = reload_crashes is not None and worker.generation == self._reload.generation
        policy = reload_crashes if reload_crashes is not None and new_generation else self._crashes
        delay = policy.exited(worker)
        self.log.error(
            "worker exited unasked; replacing it",
            worker=pid,
            exit=worker.describe_exit(),
            timed_out=worker.timed_out,
            was_ready=worker.ready_at is not None,
            generation=worker.generation,
            start_up_crash=delay is not None,
            restart_in=None if delay is None else round(delay, 3),
        )
        self.instance.push_event("Worker Exit", f"{pid}: {worker.describe_exit()}")
        if not policy.exhausted:
            return
        if new_generation:
            self._reload.abort(worker.describe_exit())
            return
        self.log.error(
            "workers keep exiting at start-up; stopping the instance",
            crashes=policy.crashes,
            last_exit=worker.describe_exit(),
        )
        self._failed = True
        self._begin_stop(signal.SIGTERM, graceful=True)

    def _retire(self, worker: WorkerProcess) -> None:
        worker.channel.join(timeout=FINAL_WAIT)
        self.fleet.stats.retire(worker.pid)
        worker.close()

    def _check_heartbeats(self, now: float) -> None:
        # A worker's own watchdog ends it once its hub has not run for worker_timeout (see
        # heartbeat.py). This is the backup, for a worker that cannot run at all (SIGSTOP,
        # uninterruptible sleep) and so cannot end itself.
        limit = self._config.worker_timeout + WATCHDOG_GRACE
        for worker in self._workers.values():
            if worker.timed_out or worker.exited:
                continue
            stale = worker.slot.age(now)
            if stale > limit:
                worker.mark_timed_out()
                self.log.error(
                    "worker timed out and did not end itself (stopped, or stuck in the "
                    "kernel); killing it",
                    worker=worker.pid,
                    seconds=round(stale, 3),
                    worker_timeout=self._config.worker_timeout,
                )
                worker.send_signal(signal.SIGKILL)

    # -- the listener ------------------------------------------------------------------------------

    def _refuse_backlog(self) -> None:
        """Take in what waits in the backlog and close each with a FIN: once every worker has
        been told to stop, nobody will serve these, and closing the listener would reset them.
        At most :data:`MAX_CLOSERS` close at once; the rest wait in the backlog meanwhile."""
        room = self._closers.free_count()
        if room > 0:
            take_backlog(self._listener, self._refuse, limit=room)

    def _refuse(self, raw: Any, address: Any) -> None:
        # A connection's own close: a FIN, then what the client sends is read and dropped
        # until it closes too (closing with unread bytes would send a reset instead).
        stream = MessageStream(raw, rw_timeout=CLOSE_LINGER, max_frame_size=1)
        self._closers.spawn(stream.close)

    def _close_listener(self) -> None:
        self._refuse_backlog()
        self._listener.close()
        self._binding.release()

    # -- state ---------------------------------------------------------------------------------

    def _healthy(self) -> bool:
        return self._phase == SERVING and ready_count(self._workers.values()) >= self._wanted

    def _state(self) -> dict[str, Any]:
        return {
            "pid": os.getpid(),
            "phase": self._phase,
            "generation": self._reload.generation,
            "workers_wanted": self._wanted,
            "workers_ready": ready_count(self._workers.values()),
            "worker_restarts": self._restarts,
        }
