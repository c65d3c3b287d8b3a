"""Forking a gevent process, and starting afresh in the child.

The arbiter is a gevent process with greenlets of its own: the debug server's accept loop,
Consul registration, the remote configuration watch, the control channels' readers, its signal
watchers. ``fork()`` copies all of them into the child, and gevent's own post-fork ``reinit()``
keeps every watcher armed: left alone, a worker would answer the arbiter's debug port, register
in Consul again and act on the arbiter's signals. So the child leaves its parent's world behind:

1. the parent's signal watchers are cancelled while its loop is still valid (libev keeps
   per-signal state outside the loop, and a signal watcher left in a destroyed loop would make
   the next signal call into freed memory);
2. the parent's hub and loop are destroyed (their greenlets never run again) and kept
   referenced, so that the garbage collector never resumes a greenlet suspended in them;
3. every descriptor but the ones the child needs is closed: the debug listener, the other
   workers' channels, the arbiter's Consul connections (which would otherwise stay open in the
   agent for as long as the worker lives);
4. a new hub on a new default loop takes over; the caller installs its signal handlers and
   only then unblocks signals, which :func:`fork` kept blocked across the fork so that none
   could reach a half-built child.

What the parent wants the child to keep is handed over as plain ``_socket`` sockets and
descriptors, which need no hub, and wrapped as gevent sockets in the child.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import os
import signal
import sys
import traceback
from collections.abc import Callable, Collection, Iterable
from typing import Any, NoReturn

import gevent
from gevent import os as gevent_os

from kitegreen.observability import logs

_ALL_SIGNALS = set(signal.valid_signals()) - {signal.SIGKILL, signal.SIGSTOP}
_LEFT_BEHIND: list[Any] = []
"""The parent's hubs and loops, referenced until the child exits (see the module docstring)."""
_PR_SET_PDEATHSIG = 1


def fork(on_exit: Callable[[int, int], None]) -> int:
    """Fork; in the parent, have ``on_exit(pid, status)`` called in the hub when the child ends.

    Signals stay blocked in the child until it calls :func:`unblock_signals`.

    Returns:
        The child's pid in the parent, 0 in the child.
    """
    before = signal.pthread_sigmask(signal.SIG_BLOCK, _ALL_SIGNALS)
    try:
        pid: int = gevent_os.fork_and_watch(
            callback=lambda watcher: on_exit(watcher.pid, watcher.rstatus)
        )
    except BaseException:
        signal.pthread_sigmask(signal.SIG_SETMASK, before)
        raise
    if pid:
        signal.pthread_sigmask(signal.SIG_SETMASK, before)
    return pid


def run_child(body: Callable[[], int], crashed: int) -> NoReturn:
    """Run a just-forked child's ``body`` and exit with its status; never return.

    Whatever happens, the child must not return into the parent's code (it would run the
    arbiter's loop a second time): an exception is printed and the child exits ``crashed``.
    """
    status = crashed
    try:
        status = body()
    except BaseException:  # noqa: BLE001 - whatever happens, the child must not return
        with contextlib.suppress(Exception):
            traceback.print_exc()
    finally:
        with contextlib.suppress(Exception):
            sys.stderr.flush()
        os._exit(status)


def reap(pid: int) -> None:
    """Collect ``pid``'s exit status once ``on_exit`` has been called, so no zombie is left and
    gevent forgets the child."""
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)


def start_afresh(keep_fds: Collection[int], signal_handles: Iterable[Any]) -> None:
    """In a forked child: drop the parent's greenlets, watchers and descriptors.

    Args:
        keep_fds: descriptors the child needs, besides standard input, output and error
            and those of the logging handlers.
        signal_handles: the parent's gevent signal handles, to cancel.
    """
    for handle in signal_handles:
        handle.cancel()
    # Garbage the parent left is finalised now, while its loop is still valid; afterwards
    # nothing of the parent is freed (it is all reachable from what is kept below).
    gc.collect()
    hub = gevent.get_hub()
    _LEFT_BEHIND.extend((hub, hub.loop))
    hub.destroy(destroy_loop=True)
    _close_descriptors(keep={0, 1, 2, *keep_fds, *logs.handler_descriptors()})
    gevent.get_hub()


def unblock_signals(ignore: Iterable[signal.Signals] = ()) -> None:
    """Ignore ``ignore``, then let signals in (the caller's handlers are installed by now)."""
    for signum in ignore:
        signal.signal(signum, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_SETMASK, set())


def die_with_parent(signum: signal.Signals, parent: int) -> bool:
    """Have the kernel send ``signum`` to this process when its parent dies (Linux).

    Returns:
        False if the parent is already gone (it died before the request could be made).
    """
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, int(signum), 0, 0, 0)
    return os.getppid() == parent


def _close_descriptors(keep: set[int]) -> None:
    try:
        fds = [int(name) for name in os.listdir("/proc/self/fd")]
    except OSError:
        fds = list(range(3, min(os.sysconf("SC_OPEN_MAX"), 65536)))
    for fd in fds:
        if fd not in keep:
            with contextlib.suppress(OSError):
                os.close(fd)
