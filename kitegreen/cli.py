"""The launcher: ``python -m kitegreen MODULE:ATTR [flags]``.

This is the only module that monkey-patches, first thing in :func:`main`. Both
``python -m kitegreen`` and the ``kitegreen`` console script import the package before this
module runs; ``kitegreen/__init__.py`` is a lazy facade so that nothing it imports has imported
ssl by then.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

EXIT_OK = 0
EXIT_UNCLEAN_STOP = 1
EXIT_USAGE = 2
EXIT_LISTEN = 3


def patch() -> None:
    """Monkey-patch the standard library for gevent; idempotent."""
    from gevent import monkey

    if not monkey.is_module_patched("socket"):
        monkey.patch_all()


def _parser() -> argparse.ArgumentParser:
    from kitegreen.config.help import HelpFormatter, add_setting_flags
    from kitegreen.config.loader import CONFIG_FILE_ENV

    parser = argparse.ArgumentParser(
        prog="python -m kitegreen",
        description="Serve a kitegreen RpcServer. MODULE:ATTR names an RpcServer, or a "
        "callable taking no arguments that returns one (MODULE may be a dotted module "
        "or a path to a .py file). Settings: flags beat environment variables beat the "
        "config file beat the values in code.",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("target", metavar="MODULE:ATTR", help="the server to run")
    parser.add_argument(
        "--config", metavar="PATH", help=f"YAML or TOML config file [env {CONFIG_FILE_ENV}]"
    )
    add_setting_flags(parser)
    return parser


def load_target(target: str) -> Any:
    """Import ``MODULE:ATTR`` and return the RpcServer it names.

    Raises:
        LaunchError: the module or attribute is missing, or is not (and does not make) an
            RpcServer.
    """
    from kitegreen.exceptions import LaunchError
    from kitegreen.server import RpcServer

    module_name, sep, attr = target.partition(":")
    if not sep or not module_name or not attr:
        raise LaunchError(f"target must be MODULE:ATTR, got {target!r}")
    try:
        if module_name.endswith(".py") or os.sep in module_name:
            path = Path(module_name).resolve()
            spec = importlib.util.spec_from_file_location(path.stem, path)
            if spec is None or spec.loader is None or not path.exists():
                raise LaunchError(f"cannot load {module_name}: no such file")
            module = importlib.util.module_from_spec(spec)
            sys.modules[path.stem] = module
            sys.path.insert(0, str(path.parent))
            spec.loader.exec_module(module)
        else:
            if "" not in sys.path and os.getcwd() not in sys.path:
                sys.path.insert(0, os.getcwd())
            module = importlib.import_module(module_name)
    except LaunchError:
        raise
    except ImportError as exc:
        raise LaunchError(f"cannot import {module_name}: {exc}") from exc
    obj = getattr(module, attr, None)
    if obj is None:
        raise LaunchError(f"{module_name} has no attribute {attr!r}")
    if not isinstance(obj, RpcServer) and callable(obj):
        obj = obj()
    if not isinstance(obj, RpcServer):
        raise LaunchError(
            f"{target} is a {type(obj).__name__}, expected a kitegreen.RpcServer "
            "or a callable returning one"
        )
    return obj


def main(argv: Sequence[str] | None = None) -> int:
    """Run the launcher; return the process exit status."""
    patch()
    import gevent

    from kitegreen import logs
    from kitegreen.config import Config
    from kitegreen.exceptions import ConfigError, LaunchError, ListenError

    args = _parser().parse_args(argv)
    flags = {k: v for k, v in vars(args).items() if k not in ("target", "config") and v is not None}
    try:
        # Logging first, from everything but the code's own config, so that importing the
        # target already logs in the chosen shape.
        early = Config.load(file=args.config, flags=flags)
    except ConfigError as exc:
        print(f"kitegreen: {exc}", file=sys.stderr)
        return EXIT_USAGE
    logs.configure(early.log_format, early.log_level)
    import structlog

    log = structlog.get_logger("kitegreen")
    try:
        server = load_target(args.target)
        server.reconfigure(Config.load(base=server.config, file=args.config, flags=flags))
    except (LaunchError, ConfigError) as exc:
        log.error("cannot launch", target=args.target, error=str(exc))
        print(f"kitegreen: {exc}", file=sys.stderr)
        return EXIT_USAGE

    def request_stop(signum: int) -> None:
        # Signals only request: the stop runs in its own greenlet, serve() returns after it.
        log.info("signal received, stopping", signal=signal.Signals(signum).name)
        gevent.spawn(server.stop)

    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        gevent.signal_handler(signum, request_stop, signum)
    try:
        server.start()
    except ListenError as exc:
        log.error("cannot listen", error=str(exc))
        print(f"kitegreen: {exc}", file=sys.stderr)
        return EXIT_LISTEN
    server.serve()
    return EXIT_OK if server.stop() else EXIT_UNCLEAN_STOP
