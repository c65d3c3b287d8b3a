"""The hook settings (``on_starting``, ...): their names and what a value may be.

The settings' side of :mod:`kitegreen.hooks`, which runs them: ``Config`` validates a hook
setting and the probe passes it on as an import path without importing the hook machinery.
"""

from __future__ import annotations

import re

from kitegreen.exceptions import ConfigError

HOOK_NAMES = (
    "on_starting",
    "post_fork",
    "post_worker_init",
    "when_ready",
    "on_reload",
    "worker_exit",
    "on_exit",
)
"""Every hook, in the order they first run."""

_IMPORT_PATH = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")


def check_hook(name: str, value: object) -> None:
    """Check a hook setting: None, a callable, or ``module:function``.

    Raises:
        ConfigError: anything else.
    """
    if value is None or callable(value):
        return
    if isinstance(value, str) and _IMPORT_PATH.match(value.strip()):
        return
    raise ConfigError(
        f"{name} must be a callable or an import path such as 'myapp.hooks:{name}', got {value!r}",
        field=name,
    )


def import_path(name: str, hook: object) -> str | None:
    """A hook setting as its import path, for another process (the probe's answer, and
    ``--check-config``); None for no hook.

    Raises:
        ConfigError: a callable with no import path (a lambda, a nested function, one defined
            in ``__main__``).
    """
    if hook is None or isinstance(hook, str):
        return hook
    module = getattr(hook, "__module__", None)
    qualname = getattr(hook, "__qualname__", "")
    if not module or module == "__main__" or "<" in qualname or not qualname:
        raise ConfigError(
            f"{name}={hook!r} has no import path; with --workers a hook must be a module-level "
            "function (or given as 'module:function')",
            field=name,
        )
    return f"{module}:{qualname}"
