"""The launcher's target: ``MODULE:ATTR`` -> the :class:`~kitegreen.server.RpcServer` it names.

A module path or a file path; an attribute that is a server, or a callable taking no
arguments that returns one. When the user's code raises while it is imported or called, the
:class:`~kitegreen.exceptions.LaunchError` keeps that exception as its cause, and
:func:`log_launch_error` logs the user's traceback without the launcher's frames.

Imported by the launcher after it has monkey-patched (the target imports the server).
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import os
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kitegreen.server import RpcServer

_MISSING = object()


def load_target(target: str) -> RpcServer:
    """Import ``MODULE:ATTR`` and return the RpcServer it names (or makes).

    Raises:
        LaunchError: the module or attribute is missing, the target is not an RpcServer nor a
            callable taking no arguments that returns one, or the user's code raised while
            being imported or called. In that last case the error's ``__cause__`` is the
            exception the user's code raised, for its traceback.
    """
    from kitegreen.exceptions import LaunchError, describe
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
            raise LaunchError(f"{target}() raised {describe(exc)}") from exc
    if not isinstance(obj, RpcServer):
        raise LaunchError(
            f"{target} is a {type(obj).__name__}, expected a kitegreen.RpcServer "
            "or a callable returning one"
        )
    return obj


def add_search_path(target: str) -> None:
    """Put where ``target``'s module is found on ``sys.path``, importing nothing: the arbiter
    of ``--workers`` does this so that a hook defined next to a file target (given in code,
    reaching the arbiter by its import path) imports there as in the workers."""
    module_name = target.partition(":")[0]
    if module_name.endswith(".py") or os.sep in module_name:
        parent = str(Path(module_name).resolve().parent)
        if parent not in sys.path:
            sys.path.insert(0, parent)
    elif "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())


def _import(module_name: str) -> Any:
    from kitegreen.exceptions import LaunchError, describe

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
            raise LaunchError(f"cannot import {module_name}: {describe(exc)}") from exc
        return module
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and (module_name == exc.name or module_name.startswith(exc.name + ".")):
            # The target itself is missing: its traceback would show only importlib.
            raise LaunchError(f"cannot import {module_name}: {exc}") from None
        raise LaunchError(f"cannot import {module_name}: {describe(exc)}") from exc
    except Exception as exc:
        raise LaunchError(f"cannot import {module_name}: {describe(exc)}") from exc


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


def log_launch_error(log: Any, target: str, exc: Exception) -> None:
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
