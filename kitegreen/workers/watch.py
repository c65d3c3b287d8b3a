"""``--reload``: watch the application's files and have the arbiter reload when one changes.

The watching is ``watchfiles``' (inotify on Linux, through the Rust ``notify`` crate), run in
a child process of its own rather than in a thread of the arbiter: ``watchfiles.watch``
blocks in Rust with background threads, and the arbiter forks workers and probes all the
time; forking a process that has threads risks a child that inherits a lock some thread held
(Python 3.12 warns about it). The child is forked like a probe (``fork.py``), watches, and
writes one JSON line per burst of changes on a socket the arbiter reads in a greenlet
(:class:`~kitegreen.workers.control.Channel`), so nothing ever blocks the arbiter's hub.

``watchfiles`` groups a burst (an editor's save is several events: a temporary file, a
rename, a chmod) into one batch: it yields once no change came for :data:`STEP_MS`. The
arbiter turns each batch into SIGHUP's rolling reload, which coalesces further batches
arriving while one is under way into one more reload.

What is watched: Python files and Thrift IDLs (``*.py``, ``*.thrift``) under the application's
directory (:func:`application_directory`), less watchfiles' usual noise (``__pycache__``,
``.git``, ``.venv``, editors' swap files).
"""

from __future__ import annotations

import _socket
import contextlib
import importlib.machinery
import importlib.util
import json
import os
import signal
import socket
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, NoReturn

from gevent.event import AsyncResult

from kitegreen.exceptions import ConfigError, describe
from kitegreen.workers import fork
from kitegreen.workers.control import Channel

WATCHED_SUFFIXES = (".py", ".thrift")
STEP_MS = 50
"""A burst of changes ends once none came for this long (watchfiles' ``step``)."""
MAX_PATHS = 20
"""Changed paths sent to the arbiter per burst (the count is sent whole)."""
STOP_WAIT = 2.0
"""Seconds :meth:`CodeWatcher.stop` waits for the child to exit after SIGTERM."""
EXIT_WATCH_FAILED = 1
_CHILD_IGNORES = (
    signal.SIGINT,
    signal.SIGHUP,
    signal.SIGTTIN,
    signal.SIGTTOU,
    signal.SIGUSR1,
    signal.SIGUSR2,
    signal.SIGWINCH,
)
"""Signals a terminal or a careless ``kill`` sends the whole group: meant for the arbiter,
which stops the watcher itself (SIGTERM)."""


def require_watchfiles() -> None:
    """Check that ``watchfiles`` can be imported.

    Raises:
        ConfigError: it cannot, with how to install it.
    """
    try:
        import watchfiles  # noqa: F401
    except ImportError as exc:
        raise ConfigError(
            f"reload needs the watchfiles package ({describe(exc)}): "
            "pip install 'kitegreen[reload]'",
            field="reload",
        ) from None


def drop_cached_bytecode(paths: Iterable[str]) -> None:
    """Remove the cached bytecode of each changed Python file, if any.

    A ``.pyc`` is taken as current when the source's mtime (in whole seconds) and size match
    what it recorded: a save within the same second that keeps the size (an edit of one
    character) would be loaded stale by the reload it triggers. The reload's processes write
    no bytecode, but one cached before (an earlier run, a tool, the first import when only the
    code asked for reload) is still read.
    """
    for path in paths:
        if not path.endswith(".py"):
            continue
        with contextlib.suppress(OSError, ValueError, NotImplementedError):
            os.remove(importlib.util.cache_from_source(path))


def application_directory(target: str) -> Path:
    """The directory ``--reload`` watches for ``target`` (``MODULE:ATTR``), found without
    importing it: a file target's directory; for a module, its top-level package's directory,
    or the directory of a top-level module; the working directory when neither is found.
    """
    module = target.partition(":")[0]
    if module.endswith(".py") or os.sep in module:
        return Path(module).resolve().parent
    top = module.partition(".")[0]
    # The launcher imports a module target with the working directory on the path
    # (target.py): find it there too.
    path = [os.getcwd(), *sys.path]
    with contextlib.suppress(ImportError, ValueError):
        spec = importlib.machinery.PathFinder.find_spec(top, path)
        if spec is not None:
            if spec.submodule_search_locations:
                return Path(next(iter(spec.submodule_search_locations))).resolve()
            if spec.origin and os.path.exists(spec.origin):
                return Path(spec.origin).resolve().parent
    return Path.cwd()


class CodeWatcher:
    """The watching child of one arbiter; :meth:`start` and :meth:`stop` from its main
    greenlet (the one that forks).

    Args:
        root: the directory to watch, recursively.
        on_change: called in a greenlet with the changed paths (at most :data:`MAX_PATHS`)
            and their count, once per burst.
        log: a structlog logger.
    """

    def __init__(self, root: Path, on_change: Callable[[list[str], int], None], log: Any) -> None:
        self.root = root
        self._on_change = on_change
        self.log = log
        self._pid: int | None = None
        self._exited: AsyncResult = AsyncResult()
        self._channel: Channel | None = None
        self._stopping = False

    def start(self, signal_handles: Iterable[Any]) -> None:
        """Fork the watching child.

        Args:
            signal_handles: the arbiter's signal handles, cancelled in the child.

        Raises:
            OSError: no descriptor or memory to fork with.
        """
        # Plain sockets across the fork: a gevent socket is tied to the hub of the process
        # that made it, and the child starts a hub of its own.
        parent_end, child_end = _socket.socketpair()
        parent = os.getpid()
        try:
            pid = fork.fork(lambda _pid, status: self._exited.set(status))
        except OSError:
            parent_end.close()
            child_end.close()
            raise
        if pid == 0:
            _run_child(child_end, self.root, parent, list(signal_handles))
        child_end.close()
        self._pid = pid
        self._channel = Channel(
            socket.socket(fileno=parent_end.detach()),
            on_message=self._message,
            on_closed=self._closed,
            log=self.log.bind(watcher=pid),
        )
        self._channel.start()
        # "watching" is logged when the child says its watches are armed (``_message``), not
        # here: until then a save is not seen, and the log must not say otherwise.

    def stop(self) -> None:
        """End the child and wait for it (killed if it takes longer than :data:`STOP_WAIT`)."""
        self._stopping = True
        pid, self._pid = self._pid, None
        if pid is not None:
            if not self._exited.ready():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGTERM)
                if self._exited.wait(timeout=STOP_WAIT) is None:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                    self._exited.wait(timeout=STOP_WAIT)
            fork.reap(pid)
        if self._channel is not None:
            self._channel.close()

    def _message(self, message: dict[str, Any]) -> None:
        if message.get("type") == "armed":
            self.log.info(
                "watching for changes; a change reloads the workers",
                directory=str(self.root),
                files=[f"*{suffix}" for suffix in WATCHED_SUFFIXES],
                watcher=self._pid,
            )
            return
        paths = [str(p) for p in message.get("paths", ())]
        self._on_change(paths, int(message.get("count", len(paths))))

    def _closed(self) -> None:
        if not self._stopping:
            self.log.error(
                "the file watcher stopped: changes are no longer reloaded (SIGHUP still is)",
                directory=str(self.root),
            )


def _run_child(child_end: Any, root: Path, parent: int, handles: list[Any]) -> NoReturn:
    def body() -> int:
        fork.start_afresh(keep_fds=(child_end.fileno(),), signal_handles=handles)
        if not fork.die_with_parent(signal.SIGTERM, parent):
            return 0
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        fork.unblock_signals(ignore=_CHILD_IGNORES)
        with socket.socket(fileno=child_end.detach()) as sock:
            return _watch(sock, root, parent)

    fork.run_child(body, crashed=EXIT_WATCH_FAILED)


class _Orphaned:
    """watchfiles' stop event: set once the arbiter is gone (the kernel's SIGTERM on the
    parent's death is Linux only).

    Its first check also tells the arbiter the watches are armed: watchfiles' Rust loop
    checks the stop event every step, and only once its watcher is built (inotify's watches
    are added synchronously while it is), so from then on a save is seen. watchfiles has no
    other hook between arming and its first wait.
    """

    def __init__(self, parent: int, armed: Callable[[], None]) -> None:
        self._parent = parent
        self._armed: Callable[[], None] | None = armed

    def is_set(self) -> bool:
        armed, self._armed = self._armed, None
        if armed is not None:
            armed()
        return os.getppid() != self._parent


def _watch(sock: socket.socket, root: Path, parent: int) -> int:
    import structlog
    import watchfiles

    log = structlog.get_logger("kitegreen.watch")
    watch_filter = watchfiles.PythonFilter(extra_extensions=WATCHED_SUFFIXES)
    try:
        for changes in watchfiles.watch(
            root,
            watch_filter=watch_filter,
            step=STEP_MS,
            stop_event=_Orphaned(parent, armed=lambda: _send(sock, {"type": "armed"})),
            # No timeout: on a timeout with nothing seen, watchfiles' Rust loop clears the
            # set of changes after it found it empty, so a change arriving in between was
            # lost (an edit not reloaded). The stop event is checked every step anyway.
            rust_timeout=0,
            raise_interrupt=False,
        ):
            paths = sorted({path for _, path in changes})
            _send(sock, {"type": "changed", "paths": paths[:MAX_PATHS], "count": len(paths)})
    except OSError as exc:
        # The arbiter's end is gone (it exits), or the directory cannot be watched (gone, no
        # inotify watches left: fs.inotify.max_user_watches).
        if os.getppid() == parent:
            log.error("cannot watch for changes", directory=str(root), error=describe(exc))
        return EXIT_WATCH_FAILED
    return 0


def _send(sock: socket.socket, message: dict[str, Any]) -> None:
    sock.sendall(json.dumps(message).encode() + b"\n")
