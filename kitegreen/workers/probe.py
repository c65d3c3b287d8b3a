"""The probe: a short-lived child that imports the application and reports its settings.

The arbiter must bind the listener before it forks workers, and where to listen may be set in
the application's own code (``RpcServer(config=Config(port=9000))``). The arbiter itself never
imports the application: whatever an import does (open connections, start threads, read files)
would be copied into every worker, and a SIGHUP could not load the new code in fresh workers
without first unloading the old code from the arbiter, which Python cannot do reliably
(extension modules, references held elsewhere). So a probe, forked like a worker, imports the
target, layers the config file, the environment and the flags on its settings, sends the
effective :class:`Config` back as JSON and exits; the workers get that Config, and import the
code only. At start-up a failing probe is a failing launch (exit 2, with the error the probe
logged); on SIGHUP it is a refused reload, and the old workers go on serving. The probe also
refuses what the application's code gives its server that workers cannot honour (a registry).

At start-up the launcher waits for the probe (:func:`probe_config`); on SIGHUP the arbiter
forks it (:func:`start_probe`) and awaits :meth:`Probe.result` in a greenlet, so that its loop
goes on meanwhile. Nothing a probe meets (no descriptor to fork with, a malformed answer, a
timeout) raises out of it.
"""

from __future__ import annotations

import _socket
import contextlib
import dataclasses
import json
import os
import signal
import socket
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any, NoReturn

import gevent
import structlog
from gevent.event import AsyncResult

from kitegreen.config import Config
from kitegreen.config.hook_settings import HOOK_NAMES, import_path
from kitegreen.exceptions import ConfigError, LaunchError, describe
from kitegreen.exits import EXIT_CRASHED, EXIT_USAGE
from kitegreen.workers import fork
from kitegreen.workers.worker import IGNORED_SIGNALS, Application

if TYPE_CHECKING:
    from kitegreen.server import RpcServer

MAX_CONFIG = 1024 * 1024
PROBE_TIMEOUT_MIN = 60.0
"""Seconds a probe may take to load the application, at least."""


def probe_config(
    app: Application,
    *,
    signal_handles: Iterable[Any],
    timeout: float,
    log: Any,
) -> Config | int:
    """Load the application in a forked child and return its effective settings.

    Args:
        app: how to load the application (``app.load``: settings from every source).
        signal_handles: the arbiter's signal handles, cancelled in the child.
        timeout: seconds the child may take (see :func:`probe_timeout`).
        log: a structlog logger.

    Returns:
        See :meth:`Probe.result`.
    """
    probe = start_probe(app, signal_handles=signal_handles, log=log)
    if isinstance(probe, int):
        return probe
    return probe.result(timeout)


def probe_timeout(worker_timeout: float) -> float:
    """Seconds a probe may take: :data:`PROBE_TIMEOUT_MIN`, or ``worker_timeout`` if longer (a
    worker, which imports the same code, may take that long before its heartbeat is stale)."""
    return max(PROBE_TIMEOUT_MIN, worker_timeout)


def start_probe(
    app: Application,
    *,
    signal_handles: Iterable[Any],
    log: Any,
) -> Probe | int:
    """Fork a probe; call it from the greenlet that forks (see ``fork.py``).

    Args:
        app: how to load the application (``app.load``: settings from every source).
        signal_handles: the arbiter's signal handles, cancelled in the child.
        log: a structlog logger.

    Returns:
        The running probe; or the exit status 2 if it could not be started (no descriptor or
        memory left), logged by then.
    """
    exited: AsyncResult = AsyncResult()
    parent_end = child_end = None
    try:
        parent_end, child_end = _socket.socketpair()
        pid = fork.fork(lambda _pid, status: exited.set(status))
    except OSError as exc:
        for end in (parent_end, child_end):
            if end is not None:
                end.close()
        log.error("cannot start the probe", error=describe(exc))
        return EXIT_USAGE
    if pid == 0:
        _run_probe(child_end, app, list(signal_handles))
    child_end.close()
    return Probe(pid, socket.socket(fileno=parent_end.detach()), exited, log)


class Probe:
    """A probe child, forked by :func:`start_probe`.

    Args:
        pid: the child's pid.
        sock: the parent's end of the socket the child writes its settings to.
        exited: set to the child's wait status when it ends.
        log: a structlog logger.
    """

    def __init__(self, pid: int, sock: Any, exited: AsyncResult, log: Any) -> None:
        self.pid = pid
        self._sock = sock
        self._exited = exited
        self._log = log
        self._cancelled = False

    def result(self, timeout: float) -> Config | int:
        """Wait for the child's settings and its exit; once only. Never raises: a failing
        probe must not end the arbiter that started it for a reload.

        Args:
            timeout: seconds the child may take; then it is killed.

        Returns:
            The settings, or the exit status the launcher should exit with (2) when the
            application would not load, the probe took too long, its answer could not be read
            or it was cancelled; the reason is logged by then.
        """
        log = self._log
        data: bytes | None = None
        try:
            with gevent.Timeout(timeout):
                data = _read_all(self._sock)
                self._exited.wait()
        except gevent.Timeout:
            log.error("the application took too long to load", seconds=timeout)
            data = None
        except (OSError, ConfigError) as exc:
            if not self._cancelled:
                log.error("the probe's answer could not be read", error=describe(exc))
            data = None
        finally:
            self._sock.close()
            self._kill()
            fork.reap(self.pid)
        status: int | None = self._exited.value
        if data is None or status is None or self._cancelled:
            return EXIT_USAGE
        if not os.WIFEXITED(status) or os.WEXITSTATUS(status) != 0:
            if not os.WIFEXITED(status) or os.WEXITSTATUS(status) != EXIT_USAGE:
                log.error("the application could not be loaded", status=status)
            return EXIT_USAGE
        try:
            return config_from_json(data)
        except ConfigError as exc:
            log.error("the probe's answer could not be read", error=describe(exc))
            return EXIT_USAGE

    def cancel(self) -> None:
        """Kill the child now (the arbiter is stopping); :meth:`result` reports a failure
        without logging one."""
        self._cancelled = True
        if not self._exited.ready():
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)

    def _kill(self) -> None:
        if not self._exited.ready():
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
            self._exited.wait(timeout=5.0)  # SIGKILL cannot be ignored: this is its reaping


def config_to_json(config: Config) -> bytes:
    """``config`` as JSON, every field (the Consul token included: this stays on a pipe)."""
    values = {f.name: getattr(config, f.name) for f in dataclasses.fields(Config)}
    for name in HOOK_NAMES:
        values[name] = import_path(name, values[name])
    return json.dumps(values, default=_plain).encode()


def config_from_json(data: bytes) -> Config:
    """The :class:`Config` :func:`config_to_json` wrote.

    Raises:
        ConfigError: the JSON is not a config (a bug, not a user error).
    """
    try:
        values: dict[str, Any] = {
            name: tuple(value) if isinstance(value, list) else value
            for name, value in json.loads(data).items()
        }
        return Config(**values)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"the probe's settings could not be read back: {exc}") from None


def _plain(value: object) -> object:
    if isinstance(value, Mapping):
        return dict(value)
    raise TypeError(f"{type(value).__name__} is not a setting's type")


def _read_all(sock: Any) -> bytes:
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
        if len(data) > MAX_CONFIG:
            raise ConfigError("the probe's settings are too large")
    return data


def check_fits_workers(server: RpcServer) -> None:
    """Refuse what the application's own code gave its server that an instance of workers
    cannot honour, rather than drop it silently.

    Raises:
        ConfigError: a registry was given and the instance registers: the arbiter registers
            it, and never imports the application, so the registry could not be used; or a
            hook given in code has no import path to reach the arbiter and the workers by.
    """
    if server.registry is not None and server.config.register:
        raise ConfigError(
            "RpcServer(registry=...) cannot be used with --workers 2 or more: the arbiter "
            "registers the instance itself, in Consul at consul_addr, and never imports the "
            "application; run one process, or leave the registry out",
            field="workers",
        )
    for name in HOOK_NAMES:
        import_path(name, getattr(server.config, name))
    if server.reporter is not None:
        structlog.get_logger("kitegreen").warning(
            "RpcServer(reporter=...) with workers: each worker reports to it; the reports of "
            "the instance's Consul registration and remote configuration go to the arbiter's "
            "log and /runtime/kite only"
        )


def _run_probe(child_end: Any, app: Application, signal_handles: list[Any]) -> NoReturn:
    def body() -> int:
        fork.start_afresh(keep_fds=(child_end.fileno(),), signal_handles=signal_handles)
        fork.unblock_signals(ignore=IGNORED_SIGNALS)
        try:
            server = app.load()
            check_fits_workers(server)
        except (LaunchError, ConfigError) as exc:
            app.on_load_error(exc)
            return EXIT_USAGE
        with socket.socket(fileno=child_end.detach()) as sock:
            sock.sendall(config_to_json(server.config))
        return 0

    fork.run_child(body, crashed=EXIT_CRASHED)
