"""The package as a user gets it: the wheel ``scripts/build-wheels`` makes, installed without a
compiler, serves the example from outside the checkout; the sdist is complete enough to install
and pass its own codec tests.

Slow (fresh venvs and pip installs, a minute or more each), hence ``slow``. Packages come from
the configured index (PyPI), through pip's cache after the first run. Every step is bounded by
a subprocess timeout; the test's own timeout covers the module's shared build.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import TESTS, wait_until

import kitegreen
from kitegreen import Config

ROOT = TESTS.parent

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def user_env(**extra: str) -> dict[str, str]:
    """This process's environment less what would make a subprocess use the checkout or the
    test's venv instead of what it installed (and less every setting kitegreen reads)."""
    dropped = {"PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", *Config.env_variables()}
    env = {k: v for k, v in os.environ.items() if k not in dropped}
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


def run(*cmd: str | Path, cwd: Path, timeout: float, env: dict[str, str] | None = None) -> str:
    """Run ``cmd`` to completion within ``timeout``: its standard output, or a failure that
    shows both streams."""
    proc = subprocess.run(
        [str(part) for part in cmd],
        cwd=cwd,
        env=env if env is not None else user_env(),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{cmd} exited {proc.returncode}:\n{output[-6000:]}"
    return proc.stdout


def make_venv(where: Path) -> Path:
    """A fresh venv at ``where``; its python."""
    run(sys.executable, "-m", "venv", where, cwd=where.parent, timeout=120)
    return where / "bin" / "python"


@pytest.fixture(scope="module")
def wheelhouse(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The documented command's output for this interpreter: its wheel and the sdist."""
    out = tmp_path_factory.mktemp("wheelhouse")
    run(ROOT / "scripts" / "build-wheels", "--out", out, sys.executable, cwd=ROOT, timeout=600)
    return out


def the_wheel(wheelhouse: Path) -> Path:
    wheels = list(wheelhouse.glob("kitegreen-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


def the_sdist(wheelhouse: Path) -> Path:
    sdists = list(wheelhouse.glob("kitegreen-*.tar.gz"))
    assert len(sdists) == 1, sdists
    return sdists[0]


class TestWheel:
    def test_tagged_manylinux_for_this_interpreter(self, wheelhouse):
        """A package index takes the wheel (manylinux, not linux) and pip picks it for this
        Python; its version is the package's one version."""
        name, version, python, abi, platform = the_wheel(wheelhouse).name[: -len(".whl")].split("-")
        tag = f"cp{sys.version_info.major}{sys.version_info.minor}"
        assert (name, version, python, abi) == ("kitegreen", kitegreen.__version__, tag, tag)
        assert all(p.startswith("manylinux") for p in platform.split(".")), platform

    def test_holds_compiled_modules_stubs_and_license_but_no_c(self, wheelhouse):
        with zipfile.ZipFile(the_wheel(wheelhouse)) as wheel:
            names = wheel.namelist()
        assert not [n for n in names if n.endswith((".c", ".h"))]
        assert any(n.startswith("kitegreen/codec/_thrift.") and n.endswith(".so") for n in names)
        assert "kitegreen/codec/_thrift.pyi" in names
        assert "kitegreen/py.typed" in names
        assert f"kitegreen-{kitegreen.__version__}.dist-info/licenses/LICENSE" in names

    def test_serves_the_example_installed_without_a_compiler(self, wheelhouse, tmp_path):
        """With no compiler (CC=/bin/false), the wheel installs into a fresh venv, and
        ``python -m kitegreen examples/echo/service.py:server``, run from a directory outside
        the checkout, answers the example client."""
        python = make_venv(tmp_path / "venv")
        no_compiler = user_env(CC="/bin/false", CXX="/bin/false")
        run(
            python,
            "-m",
            "pip",
            "install",
            "--quiet",
            the_wheel(wheelhouse),
            cwd=tmp_path,
            env=no_compiler,
            timeout=600,
        )
        app = tmp_path / "app"
        shutil.copytree(ROOT / "examples", app / "examples")

        # The compiled codec comes from the venv, not from a source tree.
        where = run(
            python,
            "-c",
            "import kitegreen.codec._thrift as m; print(m.__file__)",
            cwd=app,
            timeout=60,
        )
        assert Path(where.strip()).is_relative_to(tmp_path / "venv")

        with serving(python, app) as port:
            replies = run(
                python, "examples/echo/client.py", "--port", str(port), cwd=app, timeout=60
            )
        assert "echo: hello, kitegreen" in replies
        assert "whoami: 127.0.0.1" in replies
        assert "declared exception: empty message (code 400)" in replies


@contextlib.contextmanager
def serving(python: Path, app: Path) -> Iterator[int]:
    """The echo example under ``python -m kitegreen``, run in ``app`` on a free loopback port:
    yields the port, then stops it as a service manager would (SIGTERM), expecting exit 0."""
    with (app / "server.log").open("w+") as log:

        def output() -> str:
            log.seek(0)
            return log.read()

        def port() -> int | None:
            for line in output().splitlines():
                with contextlib.suppress(ValueError):
                    record = json.loads(line)
                    if isinstance(record, dict) and record.get("event") == "listening":
                        return int(str(record["address"]).rpartition(":")[2])
            return None

        proc = subprocess.Popen(
            [
                str(python),
                "-m",
                "kitegreen",
                "examples/echo/service.py:server",
                "--host",
                "127.0.0.1",
                "--port",
                "0",
                "--no-enable-debug-server",
            ],
            cwd=app,
            env=user_env(),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            wait_until(lambda: port() or proc.poll() is not None, timeout=60.0)
            bound = port()
            assert bound, f"not listening (exit status {proc.poll()}):\n{output()}"
            yield bound
            proc.send_signal(signal.SIGTERM)
            status = proc.wait(timeout=30.0)
            assert status == 0, f"exit status {status} after SIGTERM:\n{output()}"
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


class TestSdist:
    @pytest.fixture
    def unpacked(self, wheelhouse: Path, tmp_path: Path) -> Path:
        with tarfile.open(the_sdist(wheelhouse)) as tar:
            if hasattr(tarfile, "data_filter"):
                tar.extraction_filter = tarfile.data_filter
            tar.extractall(tmp_path)
        (top,) = tmp_path.iterdir()
        return top

    def test_holds_what_the_tests_and_examples_need(self, unpacked):
        for path in [
            "LICENSE",
            "pyproject.toml",
            "setup.py",
            "MANIFEST.in",
            "tox.ini",
            "toxfile.py",
            "kitegreen/codec/_thrift.c",
            "kitegreen/codec/_thrift.pyi",
            "kitegreen/py.typed",
            "tests/conftest.py",
            "tests/service.py",
            "tests/clients.py",
            "tests/idl/testsvc.thrift",
            "tests/gen_apache",
            "tests/test_codec.py",
            "examples/echo/service.py",
            "examples/echo/client.py",
            "examples/echo/echo.thrift",
            "examples/monolith/app.py",
            "examples/monolith/monolith.thrift",
            "benchmarks/preload_target.py",
            "benchmarks/bench.thrift",
            "scripts/build-wheels",
        ]:
            assert (unpacked / path).exists(), path
        assert not list(unpacked.rglob("*.so"))
        assert not list(unpacked.rglob("__pycache__"))

    def test_without_a_compiler_the_build_ends_with_what_to_install(self, unpacked, tmp_path):
        """pip prints a failed build's whole output; its last lines, above pip's own closing
        errors, say what to install and where wheels come from."""
        proc = subprocess.run(
            [sys.executable, "-m", "pip", "wheel", "--no-deps", "--wheel-dir", str(tmp_path),
             str(unpacked)],
            env=user_env(CC="/bin/false", CXX="/bin/false"),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )  # fmt: skip
        assert proc.returncode != 0
        tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-16:])
        assert "could not compile kitegreen.codec._thrift" in tail, tail
        assert "apt install gcc python3-dev" in tail, tail
        assert "scripts/build-wheels" in tail, tail
        assert not list(tmp_path.glob("*.whl"))

    def test_installs_and_passes_the_codec_tests(self, unpacked, tmp_path):
        python = make_venv(tmp_path / "venv")
        run(
            python,
            "-m",
            "pip",
            "install",
            "--quiet",
            f"{unpacked}[test]",
            cwd=unpacked,
            timeout=600,
        )
        # pytest's script, not `python -m pytest`: the unpacked source must not shadow the
        # installed package (its kitegreen/ has no compiled codec, so it could not pass).
        output = run(
            python.parent / "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "tests/test_codec.py",
            cwd=unpacked,
            timeout=600,
        )
        assert re.search(r"\b\d+ passed\b", output), output[-2000:]
