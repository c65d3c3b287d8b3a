"""The probe: a short-lived child that imports the application and reports its settings.

The arbiter must bind the listener before it forks workers, and where to listen may be set in
the application's own code (``RpcServer(config=Config(port=9000))``). The arbiter itself never
imports the application: whatever an import does (open connections, start threads, read files)
would be copied into every worker, and a SIGHUP could not load the new code in fresh workers
without first unloading the old code from the arbiter, which Python cannot do reliably
(extension modules, references held elsewhere). So a probe, forked like a worker, imports the
target, layers the settings exactly as a worker will, sends the effective :class:`Config` back
as JSON and exits. At start-up a failing probe is a failing launch (exit 2, with the error the
probe logged); on SIGHUP it is a refused reload, and the old workers go on serving.
"""

from __future__ import annotations

import _socket
import contextlib
import dataclasses
import json
import os
import signal
import socket
import sys
import traceback
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any, NoReturn

import gevent
from gevent.event import AsyncResult

from kitegreen.config import Config
from kitegreen.exceptions import ConfigError, LaunchError, describe
from kitegreen.workers import fork
from kitegreen.workers.worker import EXIT_CRASHED, EXIT_LOAD_FAILED, IGNORED_SIGNALS

if TYPE_CHECKING:
    from kitegreen.server import RpcServer

MAX_CONFIG = 1024 * 1024


def probe_config(
    load: Callable[[], RpcServer],
    on_load_error: Callable[[Exception], None],
    *,
    signal_handles: Iterable[Any],
    timeout: float,
    log: Any,
) -> Config | int:
    """Load the application in a forked child and return its effective settings.

    Args:
        load: imports the application and returns its configured server.
        on_load_error: logs a LaunchError or ConfigError in the child.
        signal_handles: the arbiter's signal handles, cancelled in the child.
        timeout: seconds the child may take.
        log: a structlog logger.

    Returns:
        The settings, or the exit status the launcher should exit with (2) when the
        application would not load, or the probe could not be started or read (no descriptor
        or memory left, a malformed answer); the reason is logged by then. Nothing is raised:
        a failing probe must not end the arbiter that started it for a reload.
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
        return EXIT_LOAD_FAILED
    if pid == 0:
        _run_probe(child_end, load, on_load_error, list(signal_handles))
    child_end.close()
    sock = socket.socket(fileno=parent_end.detach())
    data: bytes | None = None
    try:
        with gevent.Timeout(timeout):
            data = _read_all(sock)
            exited.wait()
    except gevent.Timeout:
        log.error("the application took too long to load", seconds=timeout)
        data = None
    except (OSError, ConfigError) as exc:
        log.error("the probe's answer could not be read", error=describe(exc))
        data = None
    finally:
        sock.close()
        if not exited.ready():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            exited.wait(timeout=5.0)  # SIGKILL cannot be ignored: this is the reaping
        fork.reap(pid)
    status: int | None = exited.value
    if data is None or status is None:
        return EXIT_LOAD_FAILED
    if not os.WIFEXITED(status) or os.WEXITSTATUS(status) != 0:
        if not os.WIFEXITED(status) or os.WEXITSTATUS(status) != EXIT_LOAD_FAILED:
            log.error("the application could not be loaded", status=status)
        return EXIT_LOAD_FAILED
    try:
        return config_from_json(data)
    except ConfigError as exc:
        log.error("the probe's answer could not be read", error=describe(exc))
        return EXIT_LOAD_FAILED


def config_to_json(config: Config) -> bytes:
    """``config`` as JSON, every field (the Consul token included: this stays on a pipe)."""
    values = {f.name: getattr(config, f.name) for f in dataclasses.fields(Config)}
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


def _run_probe(
    child_end: Any,
    load: Callable[[], RpcServer],
    on_load_error: Callable[[Exception], None],
    signal_handles: list[Any],
) -> NoReturn:
    status = EXIT_CRASHED
    try:
        fork.start_afresh(keep_fds=(child_end.fileno(),), signal_handles=signal_handles)
        fork.unblock_signals(ignore=IGNORED_SIGNALS)
        try:
            server = load()
        except (LaunchError, ConfigError) as exc:
            on_load_error(exc)
            status = EXIT_LOAD_FAILED
        else:
            with socket.socket(fileno=child_end.detach()) as sock:
                sock.sendall(config_to_json(server.config))
            status = 0
    except BaseException:  # noqa: BLE001 - whatever happens, the child must not return
        with contextlib.suppress(Exception):
            traceback.print_exc()
    finally:
        with contextlib.suppress(Exception):
            sys.stderr.flush()
        os._exit(status)
