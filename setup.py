"""Build kitegreen's C extensions; everything else about the package is in pyproject.toml.

kitegreen decodes what peers send with C of its own, so an install from source needs a C
compiler and the Python headers (wheels made by ``scripts/build-wheels`` need neither). When
a compile fails, the build ends with a short message that says what to install: pip prints a
failed build's whole output, and the compiler's error alone, under setuptools' log, does not
say it.
"""

from __future__ import annotations

import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext


def c_extension(name: str, source: str) -> Extension:
    """A compiled module of kitegreen from one C file (the sdist carries the C, the wheel the
    compiled module and the module's ``.pyi`` stub)."""
    return Extension(name, sources=[source], extra_compile_args=["-O2", "-std=c11"])


EXTENSIONS = [
    c_extension("kitegreen.codec._thrift", "kitegreen/codec/_thrift.c"),
    c_extension("kitegreen.codec._headers", "kitegreen/codec/_headers.c"),
    c_extension("kitegreen.transport._sockio", "kitegreen/transport/_sockio.c"),
]

HELP = """
kitegreen could not compile {name} ({error}).
kitegreen's codec is C: building it needs a C compiler and the Python headers. Install them:
  Debian, Ubuntu: apt install gcc python3-dev
  Fedora, RHEL:   dnf install gcc python3-devel
  Alpine:         apk add gcc musl-dev python3-dev
or install a wheel, which needs neither: manylinux wheels for CPython 3.10-3.13 on Linux,
built by `scripts/build-wheels` into wheelhouse/ (pip install wheelhouse/kitegreen-*.whl).
"""


class BuildExt(build_ext):  # type: ignore[misc]
    """``build_ext`` that turns a compiler's failure into :data:`HELP`, printed last."""

    def build_extension(self, ext: Extension) -> None:
        try:
            super().build_extension(ext)
        except Exception as exc:
            # setuptools logs to stdout, buffered in pip's pipe; flushed first, the help is the
            # last thing in the output pip shows.
            sys.stdout.flush()
            error = " ".join(str(exc).split())
            if len(error) > 120:  # a failed compile names its whole command line
                error = error[:117] + "..."
            raise SystemExit(HELP.format(name=ext.name, error=error)) from exc


setup(cmdclass={"build_ext": BuildExt}, ext_modules=EXTENSIONS)
