"""Server hooks: the application's code run at fixed points of the launcher's lifecycle.

gunicorn's hooks, with its names and meanings, adapted to kitegreen's two modes. Each is a
setting (``on_starting``, ...): in the config file, the environment or a flag as an import path
``module:function`` (``myapp.hooks:on_starting``), or in code as a callable on
:class:`~kitegreen.Config`. Each hook is called with one :class:`HookContext`.

===================  ===============  =================================================
hook                 runs in          when
===================  ===============  =================================================
``on_starting``      arbiter, single  settings loaded, before the listener is bound
``post_fork``        worker           just after the fork, before the application loads
``post_worker_init`` worker, single   application loaded, before it accepts
``when_ready``       arbiter, single  once serving: every first worker ready (arbiter),
                                      listening (single process)
``on_reload``        arbiter          SIGHUP, before the reload's probe starts
``worker_exit``      worker, single   serving has stopped, before the process exits
``on_exit``          arbiter, single  last thing before the launcher exits
===================  ===============  =================================================

An exception in a hook is logged (``hook failed``, with the traceback) and then:

- ``on_starting``, ``post_worker_init`` (single process), ``when_ready``: the start is
  aborted, exit status 2 (the application's start-up code failed, as an import error would);
  after ``when_ready`` the instance stops gracefully first.
- ``post_fork``, ``post_worker_init`` (worker): the worker exits with status 2 before it
  serves; the arbiter counts it as a start-up crash (replaced with a backoff; exit 4 when they
  keep failing, or the reload is aborted).
- ``on_reload``, ``worker_exit``, ``on_exit``: ignored; the reload or the exit goes on.

Hooks run only under the launcher (``kitegreen MODULE:ATTR``): a server started from code
runs none, its application owns the process. With ``--workers``, a hook given in code as a
callable reaches the arbiter and the workers by its import path (``fn.__module__`` and
``fn.__qualname__``), so it must be a module-level function; importing it in the arbiter
imports its module there, so keep hooks in a module apart from the application unless
``--preload`` is on anyway.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from kitegreen.config.hook_settings import HOOK_NAMES
from kitegreen.exceptions import ConfigError, describe

if TYPE_CHECKING:
    from kitegreen.config import Config
    from kitegreen.server import RpcServer

SINGLE = "single"
ARBITER = "arbiter"
WORKER = "worker"

Hook = Callable[["HookContext"], object]


@dataclass(frozen=True)
class HookContext:
    """What a hook is called with.

    Attributes:
        hook: the hook's name (``on_starting``, ...).
        role: the process it runs in: ``single`` (one process), ``arbiter`` or ``worker``.
        pid: that process's pid.
        config: the settings in force in that process (a worker's has its share of the
            limits; ``on_reload``'s are those before the reload).
        server: the application's server where this process loaded it (single process, and a
            worker from ``post_worker_init`` on); else None.
        worker: the worker's number (its slot, from 0; reused by its replacement); None
            outside a worker.
        address: where the instance listens once bound (from ``when_ready`` on); else None.
    """

    hook: str
    role: str
    pid: int
    config: Config
    server: RpcServer | None = None
    worker: int | None = None
    address: tuple[str, int] | str | None = None


def resolve(name: str, hook: object) -> Hook | None:
    """The callable a hook setting names; None for no hook.

    Raises:
        ConfigError: the module cannot be imported, or has no such callable.
    """
    if hook is None:
        return None
    if callable(hook):
        return hook
    module_name, _, attr = str(hook).strip().partition(":")
    try:
        found: Any = importlib.import_module(module_name)
        for part in attr.split("."):
            found = getattr(found, part)
    except Exception as exc:
        raise ConfigError(f"{name} {hook!r} cannot be loaded: {describe(exc)}", field=name) from exc
    if not callable(found):
        raise ConfigError(
            f"{name} {hook!r} is a {type(found).__name__}, expected a callable", field=name
        )
    return found  # type: ignore[no-any-return]


class Hooks:
    """The hooks of one process, imported once.

    Args:
        config: the settings naming the hooks.
        role: ``single``, ``arbiter`` or ``worker`` (see :class:`HookContext`).
        log: a structlog logger.
        worker: the worker's number, in a worker.

    Raises:
        ConfigError: a hook cannot be imported (see :func:`resolve`).
    """

    def __init__(self, config: Config, role: str, log: Any, *, worker: int | None = None) -> None:
        self._config = config
        self._role = role
        self._log = log
        self._worker = worker
        self._hooks = {name: resolve(name, getattr(config, name)) for name in HOOK_NAMES}

    def run(
        self,
        name: str,
        *,
        config: Config | None = None,
        server: RpcServer | None = None,
        address: tuple[str, int] | str | None = None,
    ) -> bool:
        """Call the hook ``name`` if there is one; log its exception with the traceback.

        The caller decides what a failure means (see the module docstring).

        Returns:
            False if the hook raised; True otherwise (no hook included).
        """
        hook = self._hooks[name]
        if hook is None:
            return True
        context = HookContext(
            hook=name,
            role=self._role,
            pid=os.getpid(),
            config=config or self._config,
            server=server,
            worker=self._worker,
            address=address,
        )
        try:
            hook(context)
        except Exception:  # noqa: BLE001 - the application's code may raise anything
            self._log.exception("hook failed", hook=name, role=self._role)
            return False
        return True
