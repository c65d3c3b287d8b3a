"""Build the compiled Thrift codec; everything else about the package is in pyproject.toml.

kitegreen decodes what peers send with its own C codec (kitegreen/codec/_thrift.c), so an
install from source needs a C compiler and the Python headers. When either is missing the
build stops with a message that says so, instead of a compiler's error alone.
"""

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

HELP = (
    "kitegreen's Thrift codec is a C extension and could not be compiled. It needs a C "
    "compiler and the Python development headers: on Debian or Ubuntu "
    "`apt install gcc python3-dev`, on Fedora `dnf install gcc python3-devel`, on Alpine "
    "`apk add gcc musl-dev python3-dev`."
)


class BuildExt(build_ext):  # type: ignore[misc]
    def run(self) -> None:
        try:
            super().run()
        except Exception as exc:
            raise SystemExit(f"{HELP}\n\n{exc}") from exc

    def build_extension(self, ext: Extension) -> None:
        try:
            super().build_extension(ext)
        except Exception as exc:
            raise SystemExit(f"{HELP}\n\n{exc}") from exc


setup(
    cmdclass={"build_ext": BuildExt},
    ext_modules=[
        Extension(
            "kitegreen.codec._thrift",
            sources=["kitegreen/codec/_thrift.c"],
            extra_compile_args=["-O2", "-std=c11"],
        ),
        Extension(
            "kitegreen.codec._headers",
            sources=["kitegreen/codec/_headers.c"],
            extra_compile_args=["-O2", "-std=c11"],
        ),
    ],
)
