"""The launcher: ``kitegreen MODULE:ATTR [flags]``, also ``python -m kitegreen``.

This is the only module that monkey-patches, first thing in :func:`main`. Whatever is imported
before that must not import ssl, thriftpy2 or the server: this module imports only the
standard library at the top, and ``kitegreen/__init__.py`` is a lazy facade for the same
reason (the console script imports the package before it calls :func:`main`).

With ``--workers`` 2 or more the launcher becomes the arbiter of ``kitegreen.workers`` and
never imports the target itself (workers import it after the fork). When the worker count is
set only in the target's own code, the launcher learns it by importing the target, and then
restarts itself (``exec``, same pid) with ``--workers N``, so that the arbiter starts clean.

Exit statuses: 0 after a clean stop, 1 when requests in flight had to be cut off (or SIGQUIT
asked for that), 2 for a usage, configuration or target error, 3 when the listener could not
be created, 4 when workers kept exiting at start-up.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import functools
import json
import os
import signal
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from kitegreen.exits import EXIT_LISTEN, EXIT_OK, EXIT_UNCLEAN_STOP, EXIT_USAGE
from kitegreen.signals import ServerStop, install_signal_handlers

if TYPE_CHECKING:
    from kitegreen.config import Config
    from kitegreen.hooks import Hooks
    from kitegreen.server import RpcServer


def patch() -> None:
    """Monkey-patch the standard library for gevent; idempotent."""
    from gevent import monkey

    if not monkey.is_module_patched("socket"):
        monkey.patch_all()
    # Before the target is imported, so that its ``from gevent import spawn`` gets the spawn
    # that hands the request's context on.
    from kitegreen.context import inherit_on_spawn

    inherit_on_spawn()


MMAP_THRESHOLD = 1 << 20
"""Allocations this large get their own mappings, returned to the system when freed."""


def tune_malloc() -> None:
    """Give memory back after large messages: pin glibc's mmap threshold at 1 MiB.

    glibc raises its mmap threshold each time a large mapping is freed, so after the first big
    message later ones come from the heap, where freed blocks stay resident. Measured: 20 idle
    connections that each carried one 12 MiB echo kept +101 MB resident with the default, +2 MB
    with the threshold pinned. A pinned threshold also switches off that adjustment, so each
    large buffer costs a fresh mapping (its page faults) instead. The launcher owns its process;
    a server embedded in another application leaves malloc alone (set the glibc tunable
    ``MALLOC_MMAP_THRESHOLD_=1048576`` there for the same effect).
    """
    import ctypes
    import ctypes.util

    if not sys.platform.startswith("linux") or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return
    m_mmap_threshold = -3
    mallopt(m_mmap_threshold, MMAP_THRESHOLD)


def main(argv: Sequence[str] | None = None, *, prog: str = "kitegreen") -> int:
    """Run the launcher; return the process exit status.

    Args:
        argv: the arguments after the program name; ``sys.argv[1:]`` when None.
        prog: the program name for ``--help`` and usage errors.
    """
    patch()
    tune_malloc()
    import structlog

    from kitegreen.config import Config
    from kitegreen.config.help import describe
    from kitegreen.exceptions import ConfigError, LaunchError
    from kitegreen.observability import logs

    args, flags = _parse_args(argv, prog)
    try:
        # Logging first, from everything but the code's own config, so that importing the
        # target already logs in the chosen shape. Until then an error is a plain line.
        early = Config.load(file=args.config, flags=flags)
    except ConfigError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        logs.configure(early.log_format, early.log_level, log_config=early.log_config or None)
    except ConfigError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    logs.log_greenlet_errors()
    log = structlog.get_logger("kitegreen")
    from kitegreen.target import add_search_path, load_target, log_launch_error

    load = functools.partial(load_server, args.target, args.config, flags)
    on_load_error = functools.partial(log_launch_error, log, args.target)
    if (early.workers > 1 or early.reload) and not args.check_config:
        from kitegreen.workers.arbiter import serve
        from kitegreen.workers.watch import application_directory
        from kitegreen.workers.worker import Application

        # The probe loads the settings from every source; workers import the code only and
        # are given what the probe reported. --reload is SIGHUP's rolling reload, so even
        # one worker gets an arbiter: the same probe refuses broken code.
        app = Application(
            load,
            functools.partial(load_target, args.target),
            on_load_error,
            layer=functools.partial(layer_settings, args.config, flags),
        )
        add_search_path(args.target)
        return serve(
            app,
            log,
            worker_timeout=early.worker_timeout,
            preload=early.preload,
            reload=early.reload,
            watch=application_directory(args.target),
        )
    try:
        server = load()
    except (LaunchError, ConfigError) as exc:
        on_load_error(exc)
        return EXIT_USAGE
    if args.check_config:
        print(json.dumps(describe(server.config), indent=2))
        return EXIT_OK
    if server.config.workers > 1 or server.config.reload:
        _restart_as_arbiter(argv, server.config, log)
    return serve_single(server, log)


def load_server(target: str, file: str | None, flags: dict[str, Any]) -> RpcServer:
    """Import ``target`` and layer the config file, the environment and ``flags`` on its config.

    Raises:
        LaunchError: see :func:`load_target`.
        ConfigError: a setting is malformed or out of range, or the recycling settings do
            not fit the final configuration (``max_requests`` in one process).
    """
    from kitegreen.target import load_target

    server = load_target(target)
    server.reconfigure(layer_settings(file, flags, server.config))
    # Only now: the code, the file, the environment and the flags may each set a part.
    problem = server.config.recycling_problem()
    if problem is not None:
        raise problem
    return server


def layer_settings(file: str | None, flags: dict[str, Any], base: Config) -> Config:
    """The config file, the environment and ``flags`` layered on ``base`` (the code's).

    Raises:
        ConfigError: a setting is malformed or out of range.
    """
    from kitegreen.config import load_config

    return load_config(base, file=file, flags=flags)


def serve_single(server: RpcServer, log: Any) -> int:
    """Serve ``server`` in this process until a signal stops it; return the exit status.

    The hooks run here in this order (``kitegreen/hooks.py``): ``on_starting``,
    ``post_worker_init``, ``when_ready``, then after the stop ``worker_exit`` and ``on_exit``.
    """
    from kitegreen.exceptions import ConfigError
    from kitegreen.hooks import SINGLE, Hooks

    try:
        hooks = Hooks(server.config, SINGLE, log)
    except ConfigError as exc:
        log.error("cannot start", error=str(exc))
        return EXIT_USAGE
    if not hooks.run("on_starting"):
        return EXIT_USAGE
    status = _serve_hooked(server, log, hooks)
    hooks.run("on_exit", server=server)
    return status


def _serve_hooked(server: RpcServer, log: Any, hooks: Hooks) -> int:
    from kitegreen.exceptions import ConfigError, ListenError

    if not hooks.run("post_worker_init", server=server):
        return EXIT_USAGE
    stop = ServerStop(lambda: server, log)
    install_signal_handlers(_single_process_actions(log, stop))
    try:
        server.start()
    except ListenError as exc:
        log.error("cannot listen", error=str(exc))
        return EXIT_LISTEN
    except ConfigError as exc:
        # A part of the instance would not start (a malformed Consul address, say); the
        # server undid its start, as the arbiter does.
        log.error("cannot start", error=str(exc))
        return EXIT_USAGE
    ready = hooks.run("when_ready", server=server, address=server.address)
    if ready:
        server.serve()
    clean = server.stop()
    hooks.run("worker_exit", server=server, address=server.address)
    if not ready:
        return EXIT_USAGE
    return EXIT_OK if clean and not stop.quick else EXIT_UNCLEAN_STOP


def _restart_as_arbiter(argv: Sequence[str] | None, config: Config, log: Any) -> None:
    """Replace this process with the launcher run with ``--workers`` (and ``--reload``): the
    target's code asked for workers or for reloads, and the arbiter must not hold the target's
    modules (see the module docstring)."""
    args = list(sys.argv[1:] if argv is None else argv)
    workers = config.workers
    log.info(
        "the target asks for workers; restarting as their arbiter",
        workers=workers,
        reload=config.reload,
    )
    sys.stderr.flush()
    command = [sys.executable, "-m", "kitegreen", *args, "--workers", str(workers)]
    if config.reload:
        command.append("--reload")
    os.execv(sys.executable, command)  # noqa: S606 - our own interpreter and arguments


def _single_process_actions(
    log: Any, stop: ServerStop
) -> dict[signal.Signals, Callable[[], object]]:
    """What each signal does to a server running in the launcher's own process."""

    def reload() -> None:
        log.warning(
            "signal ignored: a rolling reload needs --workers 2 or more; still serving",
            signal="SIGHUP",
        )

    def upgrade() -> None:
        log.warning(
            "signal ignored: binary upgrade is not supported; still serving", signal="SIGUSR2"
        )

    # Go's SIGQUIT dumps the goroutines and exits; gunicorn's is a quick shutdown.
    return {
        **stop.actions(graceful=(signal.SIGTERM, signal.SIGINT)),
        signal.SIGHUP: reload,
        signal.SIGUSR2: upgrade,
    }


# -- arguments ---------------------------------------------------------------------------------


def _parser(prog: str) -> argparse.ArgumentParser:
    from kitegreen._version import VERSION
    from kitegreen.config.help import HelpFormatter, add_setting_flags
    from kitegreen.config.names import CONFIG_FILE_ENV

    parser = argparse.ArgumentParser(
        prog=prog,
        usage="%(prog)s [options] MODULE:ATTR",
        description="Serve a kitegreen RpcServer. MODULE:ATTR names an RpcServer, or a "
        "callable taking no arguments that returns one (MODULE may be a dotted module or a "
        "path to a .py file). Settings: flags beat environment variables beat the config "
        "file beat the values in code.",
        epilog="signals: TERM and INT stop gracefully; QUIT logs the stacks and stops at once "
        "(exit 1); USR1 logs the stacks of every greenlet and thread. With --workers 2 or more, "
        "sent to the arbiter: HUP reloads the code and settings one worker at a time (with "
        "--preload the settings only; --reload does the same on a file change), TTIN and TTOU "
        "add and remove a worker. In one process HUP is logged and ignored; USR2 always is.",
        formatter_class=HelpFormatter,
        # Prefixes of flags would silently change meaning when a flag is added.
        allow_abbrev=False,
    )
    parser.add_argument("target", metavar="MODULE:ATTR", help="the server to run")
    parser.add_argument(
        "--version",
        action="version",
        version=f"kitegreen {VERSION}",
        help="print kitegreen's version and exit (the service's is --service-version)",
    )
    parser.add_argument(
        "--config",
        metavar="PATH",
        help=f"YAML or TOML config file [env {CONFIG_FILE_ENV}]",
    )
    parser.add_argument(
        "-b",
        "--bind",
        action="append",
        metavar="ADDRESS",
        help="gunicorn's spelling of where to listen: HOST:PORT, [IPV6]:PORT, HOST (keeps the "
        "port) or unix:PATH; sets --host and --port, or --unix",
    )
    parser.add_argument(
        "--check-config",
        action="store_true",
        help="load the target and the settings, print the effective settings as JSON and "
        "exit: 0 if they are valid, 2 if not; nothing is bound",
    )
    add_setting_flags(parser)
    return parser


def _parse_args(argv: Sequence[str] | None, prog: str) -> tuple[argparse.Namespace, dict[str, Any]]:
    """The parsed arguments, and the setting flags given, keyed by field name.

    Exits with status 2 and a usage message on an unknown flag, suggesting the nearest one.
    """
    from kitegreen.config import Config, gunicorn

    parser = _parser(prog)
    args, extras = parser.parse_known_args(argv)
    if extras:
        parser.error(_unknown_argument(parser, extras[0]))
    flags = {
        f.name: getattr(args, f.name)
        for f in dataclasses.fields(Config)
        if getattr(args, f.name) is not None
    }
    if args.bind:
        try:
            flags.update(gunicorn.bind_flags(args.bind, flags))
        except ValueError as exc:
            parser.error(str(exc))
    return args, flags


def _unknown_argument(parser: argparse.ArgumentParser, arg: str) -> str:
    from kitegreen.config import gunicorn

    if not arg.startswith("-"):
        return f"unexpected argument {arg!r}: the launcher takes one MODULE:ATTR"
    name = arg.partition("=")[0]
    habit = gunicorn.instead_of(name)
    if habit:
        return f"unknown flag {name}; {habit}"
    # argparse has no public list of its option strings.
    known = [s for action in parser._actions for s in action.option_strings]
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
    hint = f"did you mean {close[0]}?" if close else "--help lists the flags"
    return f"unknown flag {name}; {hint}"
