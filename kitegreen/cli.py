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
import importlib
import importlib.util
import inspect
import json
import os
import signal
import sys
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kitegreen.exits import EXIT_LISTEN, EXIT_OK, EXIT_UNCLEAN_STOP, EXIT_USAGE
from kitegreen.signals import ServerStop, install_signal_handlers

if TYPE_CHECKING:
    from kitegreen.server import RpcServer

_MISSING = object()


def patch() -> None:
    """Monkey-patch the standard library for gevent; idempotent."""
    from gevent import monkey

    if not monkey.is_module_patched("socket"):
        monkey.patch_all()


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

    from kitegreen import logs
    from kitegreen.config import Config
    from kitegreen.config.help import describe
    from kitegreen.exceptions import ConfigError, LaunchError

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
    load = functools.partial(load_server, args.target, args.config, flags)
    on_load_error = functools.partial(_log_launch_error, log, args.target)
    if early.workers > 1 and not args.check_config:
        from kitegreen.workers.arbiter import serve
        from kitegreen.workers.worker import Application

        # The probe loads the settings from every source; workers import the code only and
        # are given what the probe reported.
        app = Application(load, functools.partial(load_target, args.target), on_load_error)
        return serve(app, log, worker_timeout=early.worker_timeout)
    try:
        server = load()
    except (LaunchError, ConfigError) as exc:
        on_load_error(exc)
        return EXIT_USAGE
    if args.check_config:
        print(json.dumps(describe(server.config), indent=2))
        return EXIT_OK
    if server.config.workers > 1:
        _restart_as_arbiter(argv, server.config.workers, log)
    return serve_single(server, log)


def load_server(target: str, file: str | None, flags: dict[str, Any]) -> RpcServer:
    """Import ``target`` and layer the config file, the environment and ``flags`` on its config.

    Raises:
        LaunchError: see :func:`load_target`.
        ConfigError: a setting is malformed or out of range.
    """
    from kitegreen.config import Config

    server = load_target(target)
    server.reconfigure(Config.load(base=server.config, file=file, flags=flags))
    return server


def serve_single(server: RpcServer, log: Any) -> int:
    """Serve ``server`` in this process until a signal stops it; return the exit status."""
    from kitegreen.exceptions import ListenError

    stop = ServerStop(lambda: server, log)
    install_signal_handlers(_single_process_actions(log, stop))
    try:
        server.start()
    except ListenError as exc:
        log.error("cannot listen", error=str(exc))
        return EXIT_LISTEN
    server.serve()
    clean = server.stop()
    return EXIT_OK if clean and not stop.quick else EXIT_UNCLEAN_STOP


def _restart_as_arbiter(argv: Sequence[str] | None, workers: int, log: Any) -> None:
    """Replace this process with the launcher run with ``--workers``: the target's code asked for
    workers, and the arbiter must not hold the target's modules (see the module docstring)."""
    args = list(sys.argv[1:] if argv is None else argv)
    log.info("the target asks for workers; restarting as their arbiter", workers=workers)
    sys.stderr.flush()
    command = [sys.executable, "-m", "kitegreen", *args, "--workers", str(workers)]
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
    from kitegreen.config.loader import CONFIG_FILE_ENV

    parser = argparse.ArgumentParser(
        prog=prog,
        usage="%(prog)s [options] MODULE:ATTR",
        description="Serve a kitegreen RpcServer. MODULE:ATTR names an RpcServer, or a "
        "callable taking no arguments that returns one (MODULE may be a dotted module or a "
        "path to a .py file). Settings: flags beat environment variables beat the config "
        "file beat the values in code.",
        epilog="signals: TERM and INT stop gracefully; QUIT logs the stacks and stops at once "
        "(exit 1); USR1 logs the stacks of every greenlet and thread. With --workers 2 or more, "
        "sent to the arbiter: HUP reloads the code and settings one worker at a time, TTIN and "
        "TTOU add and remove a worker. In one process HUP is logged and ignored; USR2 always is.",
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


# -- the target --------------------------------------------------------------------------------


def load_target(target: str) -> RpcServer:
    """Import ``MODULE:ATTR`` and return the RpcServer it names (or makes).

    Raises:
        LaunchError: the module or attribute is missing, the target is not an RpcServer nor a
            callable taking no arguments that returns one, or the user's code raised while
            being imported or called. In that last case the error's ``__cause__`` is the
            exception the user's code raised, for its traceback.
    """
    from kitegreen.exceptions import LaunchError
    from kitegreen.server import RpcServer

    module_name, sep, attr = target.partition(":")
    if not sep or not module_name or not attr:
        raise LaunchError(f"target must be MODULE:ATTR, got {target!r}")
    module = _import(module_name)
    obj = getattr(module, attr, _MISSING)
    if obj is _MISSING:
        raise LaunchError(f"{module_name} has no attribute {attr!r}")
    if not isinstance(obj, RpcServer) and callable(obj):
        _check_takes_no_arguments(target, obj)
        try:
            obj = obj()
        except Exception as exc:
            raise LaunchError(f"{target}() raised {type(exc).__name__}: {exc}") from exc
    if not isinstance(obj, RpcServer):
        raise LaunchError(
            f"{target} is a {type(obj).__name__}, expected a kitegreen.RpcServer "
            "or a callable returning one"
        )
    return obj


def _import(module_name: str) -> Any:
    from kitegreen.exceptions import LaunchError

    if module_name.endswith(".py") or os.sep in module_name:
        path = Path(module_name).resolve()
        spec = importlib.util.spec_from_file_location(path.stem, path)
        if spec is None or spec.loader is None or not path.exists():
            raise LaunchError(f"cannot load {module_name}: no such file")
        module = importlib.util.module_from_spec(spec)
        sys.modules[path.stem] = module
        sys.path.insert(0, str(path.parent))
        try:
            spec.loader.exec_module(module)
        except Exception as exc:
            raise LaunchError(f"cannot import {module_name}: {type(exc).__name__}: {exc}") from exc
        return module
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and (module_name == exc.name or module_name.startswith(exc.name + ".")):
            # The target itself is missing: its traceback would show only importlib.
            raise LaunchError(f"cannot import {module_name}: {exc}") from None
        raise LaunchError(f"cannot import {module_name}: {type(exc).__name__}: {exc}") from exc
    except Exception as exc:
        raise LaunchError(f"cannot import {module_name}: {type(exc).__name__}: {exc}") from exc


def _check_takes_no_arguments(target: str, obj: Callable[..., Any]) -> None:
    from kitegreen.exceptions import LaunchError

    try:
        signature = inspect.signature(obj)
    except (TypeError, ValueError):
        return  # no signature to read (some C callables): calling it will tell
    try:
        signature.bind()
    except TypeError:
        needed = [
            p.name
            for p in signature.parameters.values()
            if p.default is p.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
        ]
        raise LaunchError(
            f"{target} is a callable that needs arguments ({', '.join(needed)}); name an "
            "RpcServer, or a callable that takes none and returns one"
        ) from None


def _log_launch_error(log: Any, target: str, exc: Exception) -> None:
    """Log a launch error once; with the user's traceback when the user's code raised."""
    cause = exc.__cause__
    if cause is None:
        log.error("cannot launch", target=target, error=str(exc))
    else:
        log.error("cannot launch", target=target, error=str(exc), exception=_user_traceback(cause))


def _user_traceback(exc: BaseException) -> str:
    """``exc``'s traceback from the first frame that is not the launcher's or importlib's."""
    tb = exc.__traceback__
    while tb is not None and _is_launcher_frame(tb.tb_frame.f_code.co_filename):
        tb = tb.tb_next
    return "".join(traceback.format_exception(type(exc), exc, tb))


def _is_launcher_frame(filename: str) -> bool:
    return filename == __file__ or filename.startswith("<frozen importlib")
