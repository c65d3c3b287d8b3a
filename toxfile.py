"""tox's inline plugin (tox loads ``toxfile.py`` beside tox.ini): interpreters pyenv installed.

pyenv's shims run only the versions pyenv has activated (``pyenv global``, ``pyenv local``),
so a machine with 3.10-3.13 installed under pyenv but only 3.11 activated shows tox a shim
``python3.12`` that fails, and tox would skip py312 though its interpreter is there. Each
installed CPython is offered to tox's discovery, as ``tox --discover PATH`` would: an
environment whose version is not among them is still skipped, and tox says so.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import TYPE_CHECKING

from tox.plugin import impl

if TYPE_CHECKING:
    from tox.config.sets import ConfigSet
    from tox.session.state import State


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
def tox_add_core_config(core_conf: ConfigSet, state: State) -> None:  # noqa: ARG001
    options = state.conf.options
    options.discover = [*(getattr(options, "discover", None) or []), *pyenv_pythons()]
