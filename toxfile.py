"""tox's inline plugin (tox loads ``toxfile.py`` beside tox.ini): interpreters pyenv installed.

pyenv's shims run only the versions pyenv has activated (``pyenv global``, ``pyenv local``),
so a machine with 3.10-3.13 installed under pyenv but only 3.11 activated shows tox a shim
``python3.12`` that fails, and tox would skip py312 though its interpreter is there. Each
installed CPython is offered to tox's discovery, as ``tox --discover PATH`` would: an
environment whose version is not among them is still skipped, and tox says so.

It also spares a run the same tests twice: ``py`` runs the whole suite on the interpreter that
runs tox, so when both are selected (the default list), the ``pyXY`` environment of that same
version installs nothing and runs nothing (tox's summary shows it OK in a second or two);
``tox -e py311`` alone still runs it.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from tox.config.loader.memory import MemoryLoader
from tox.plugin import impl

if TYPE_CHECKING:
    from tox.config.sets import ConfigSet, EnvConfigSet
    from tox.session.state import State

SAME_AS_PY = f"py{sys.version_info.major}{sys.version_info.minor}"
"""The subset environment of the interpreter ``py`` runs on."""


def pyenv_pythons() -> list[str]:
    """``$PYENV_ROOT/versions/3.X.Y/bin/python3.X`` for every CPython 3 pyenv installed."""
    root = Path(os.environ.get("PYENV_ROOT") or Path.home() / ".pyenv")
    found = []
    for version in sorted((root / "versions").glob("3.*")):
        if not re.fullmatch(r"3\.\d+\.\d+", version.name):  # 3.13.0t, pypy, envs: not these
            continue
        minor = ".".join(version.name.split(".")[:2])
        python = version / "bin" / f"python{minor}"
        if python.is_file() and os.access(python, os.X_OK):
            found.append(str(python))
    return found


@impl
def tox_add_core_config(core_conf: ConfigSet, state: State) -> None:
    options = state.conf.options
    options.discover = [*(getattr(options, "discover", None) or []), *pyenv_pythons()]


@impl
def tox_add_env_config(env_conf: EnvConfigSet, state: State) -> None:
    if env_conf.env_name != SAME_AS_PY:
        return
    selected = state.conf.options.env
    if not (selected.is_default_list or selected.is_all or "py" in selected):
        return
    message = f"{SAME_AS_PY}: its tests run in the py environment, on the same interpreter"
    env_conf.loaders.insert(
        0,
        MemoryLoader(
            skip_install=True,
            extras=[],
            commands=[f'python -c "print({message!r})"'],
        ),
    )
