"""The launcher, ``python -m kitegreen MODULE:ATTR``, run as a subprocess: its log, signals,
exit statuses, error messages, help and the precedence of flags over the environment."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from typing import Any

import gevent
import pytest
from clients import thriftpy2_client
from conftest import TESTS, testsvc_thrift, wait_until

from kitegreen import Config

ROOT = TESTS.parent
TARGET = "tests/launcher_target.py:server"
QUIET = ("--port", "0", "--host", "127.0.0.1", "--no-enable-debug-server")
PYTHON_M = (sys.executable, "-m", "kitegreen")


def launcher_env(**extra: str) -> dict[str, str]:
    """The test's environment without any setting kitegreen reads, plus ``extra``."""
    read = set(Config.env_variables())
    env = {k: v for k, v in os.environ.items() if k not in read}
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


class Launcher:
    """``python -m kitegreen ARGS`` (or another ``command``) with its output collected by reader
    greenlets.

    Always used as a context manager: on exit the process is killed if it still runs, reaped,
    and its pipes closed.
    """

    def __init__(
        self,
        *args: str,
        env: dict[str, str] | None = None,
        command: tuple[str, ...] = PYTHON_M,
    ) -> None:
        self.proc = subprocess.Popen(
            [*command, *args],
            cwd=ROOT,
            env=env if env is not None else launcher_env(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        self.stdout: list[str] = []
        self.stderr: list[str] = []
        self._readers = [
            gevent.spawn(self._pump, self.proc.stdout, self.stdout),
            gevent.spawn(self._pump, self.proc.stderr, self.stderr),
        ]

    @staticmethod
    def _pump(stream: Any, lines: list[str]) -> None:
        for line in stream:
            lines.append(line.decode("utf-8", "replace"))

    def __enter__(self) -> Launcher:
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            if self.proc.poll() is None:
                self.proc.kill()
            self.proc.wait(timeout=5.0)
            gevent.joinall(self._readers, timeout=5.0)
        finally:
            gevent.killall(self._readers)
            for stream in (self.proc.stdout, self.proc.stderr):
                if stream is not None:
                    stream.close()

    def events(self) -> list[dict[str, Any]]:
        """The JSON log lines written so far."""
        out = []
        for line in list(self.stdout):
            with contextlib.suppress(ValueError):
                record = json.loads(line)
                if isinstance(record, dict):
                    out.append(record)
        return out

    def wait_for_event(self, event: str, timeout: float = 10.0) -> dict[str, Any]:
        """The first log record named ``event``, waiting for it up to ``timeout``."""

        def find() -> dict[str, Any] | None:
            return next((e for e in self.events() if e.get("event") == event), None)

        wait_until(lambda: find() is not None or self.proc.poll() is not None, timeout=timeout)
        found = find()
        assert found is not None, (
            f"no {event!r} log line (exit status {self.proc.poll()});\n{self.output()}"
        )
        return found

    def address(self) -> tuple[str, int]:
        """The TCP address from the ``listening`` log line."""
        host, _, port = self.wait_for_event("listening")["address"].rpartition(":")
        return host, int(port)

    def wait(self, timeout: float = 10.0) -> int:
        """The exit status, waiting up to ``timeout``; the output is complete afterwards."""
        status = self.proc.wait(timeout=timeout)
        gevent.joinall(self._readers, timeout=5.0)
        return status

    def output(self) -> str:
        return "".join(self.stdout) + "".join(self.stderr)


def run(
    *args: str, env: dict[str, str] | None = None, timeout: float = 10.0
) -> tuple[int, str, str]:
    """Run the launcher to completion: ``(exit status, stdout, stderr)``."""
    with Launcher(*args, env=env) as launcher:
        status = launcher.wait(timeout)
        return status, "".join(launcher.stdout), "".join(launcher.stderr)


def can_connect(address: Any) -> bool:
    try:
        with socket.create_connection(address, timeout=1.0):
            return True
    except OSError:
        return False


def slow_call(address: Any, seconds: float, message: str) -> Any:
    """Call ``slow`` on a fresh connection; the reply, or the exception the client raised."""
    try:
        with thriftpy2_client(testsvc_thrift.TestService, address, timeout=10.0) as client:
            return client.slow(seconds, message)
    except Exception as exc:
        return exc


@pytest.fixture
def held_port() -> Any:
    """A loopback port a listening socket of this process holds."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(1)
        yield sock.getsockname()[1]


class TestStartup:
    def test_logs_the_bound_address(self):
        """The launcher logs one JSON line with the address it bound, and serves there."""
        with Launcher(TARGET, *QUIET) as launcher:
            record = launcher.wait_for_event("listening")
            host, port = launcher.address()
            assert host == "127.0.0.1"
            assert port > 0
            assert record["service"] == "launcher-test"
            assert record["pid"] == launcher.proc.pid
            with thriftpy2_client(testsvc_thrift.TestService, (host, port)) as client:
                assert client.echo("launched") == "launched"
                assert client.client_ip() == "127.0.0.1"

    def test_console_script_patches_before_ssl_is_imported(self):
        """The installed ``kitegreen`` script serves without gevent's MonkeyPatchWarning.

        The script imports the package before the launcher can patch; the package must not
        import ssl (through thriftpy2 or the server) until a name of it is used.
        """
        script = shutil.which("kitegreen", path=os.path.dirname(sys.executable))
        assert script is not None, "the kitegreen console script is not installed"
        with Launcher(TARGET, *QUIET, command=(script,)) as launcher:
            with thriftpy2_client(testsvc_thrift.TestService, launcher.address()) as client:
                assert client.echo("still serving") == "still serving"
            launcher.proc.send_signal(signal.SIGTERM)
            assert launcher.wait() == 0
        stderr = "".join(launcher.stderr)
        assert "MonkeyPatchWarning" not in stderr
        assert "Warning" not in stderr

    def test_module_path_target(self):
        """A dotted module path works as a target as well as a file path."""
        env = launcher_env(PYTHONPATH=str(TESTS))
        with Launcher("launcher_target:server", *QUIET, env=env) as launcher:
            address = launcher.address()
            with thriftpy2_client(testsvc_thrift.TestService, address) as client:
                assert client.add(20, 22) == 42

    def test_serves_on_a_unix_socket(self, tmp_path):
        """--unix serves on the path and removes the socket file when stopped."""
        path = tmp_path / "kg.sock"
        with Launcher(TARGET, "--unix", str(path), "--no-enable-debug-server") as launcher:
            assert launcher.wait_for_event("listening")["address"] == f"unix:{path}"
            with thriftpy2_client(testsvc_thrift.TestService, str(path)) as client:
                assert client.client_ip() == ""
            launcher.proc.send_signal(signal.SIGTERM)
            assert launcher.wait() == 0
        assert not path.exists()


class TestSignals:
    @pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
    def test_call_in_flight_finishes_then_exit_zero(self, signum):
        """On the signal, new connections are refused, the call in flight is answered, exit is 0."""
        with Launcher(TARGET, *QUIET) as launcher:
            address = launcher.address()
            call = gevent.spawn(slow_call, address, 1.5, "finished")
            try:
                launcher.wait_for_event("slow call started")
                launcher.proc.send_signal(signum)
                assert wait_until(lambda: not can_connect(address), timeout=1.0)
                assert not call.ready()  # refused while the call was still in flight
                assert call.get(timeout=5.0) == "finished"
                assert launcher.wait() == 0, launcher.output()
            finally:
                call.kill()
            stopped = launcher.wait_for_event("stopped")
            assert stopped["clean"] is True

    def test_idle_server_exits_zero_on_sigint(self):
        """SIGINT (Ctrl-C) stops an idle server cleanly, without a traceback."""
        with Launcher(TARGET, *QUIET) as launcher:
            launcher.address()
            launcher.proc.send_signal(signal.SIGINT)
            assert launcher.wait() == 0
            assert "Traceback" not in launcher.output()
            assert "KeyboardInterrupt" not in launcher.output()


class TestErrors:
    def test_bad_target(self):
        """A target that cannot be imported exits non-zero saying what could not be imported."""
        status, _, stderr = run("nope:nothing", *QUIET)
        assert status != 0
        assert "cannot import nope" in stderr
        assert "Traceback" not in stderr

    def test_target_that_is_not_a_server(self):
        """A target naming something other than a server says what it expected."""
        status, _, stderr = run("tests/launcher_target.py:Handler", *QUIET)
        assert status != 0
        assert "expected a kitegreen.RpcServer" in stderr

    def test_malformed_target(self):
        """A target without a colon says the form it expects."""
        status, _, stderr = run("tests/launcher_target.py", *QUIET)
        assert status != 0
        assert "MODULE:ATTR" in stderr

    def test_address_in_use(self, held_port):
        """A port already in use exits non-zero naming the address."""
        status, _, stderr = run(
            TARGET, "--host", "127.0.0.1", "--port", str(held_port), "--no-enable-debug-server"
        )
        assert status != 0
        assert f"127.0.0.1:{held_port}" in stderr
        assert "address already in use" in stderr
        assert "Traceback" not in stderr

    def test_unix_path_that_is_not_a_socket(self, tmp_path):
        """A regular file at --unix makes the launcher exit non-zero and is left untouched."""
        path = tmp_path / "data.txt"
        path.write_text("precious")
        status, _, stderr = run(TARGET, "--unix", str(path), "--no-enable-debug-server")
        assert status != 0
        assert "not a socket" in stderr
        assert str(path) in stderr
        assert path.read_text() == "precious"

    def test_bad_flag_value_names_the_flag(self):
        """A malformed flag value exits non-zero naming the flag and what was expected."""
        status, _, stderr = run(TARGET, "--port", "http", "--no-enable-debug-server")
        assert status != 0
        assert "port must be an integer, got 'http' (from --port)" in stderr


class TestHelp:
    def test_help_lists_every_flag_and_variable(self):
        """--help lists a flag for every setting and every environment variable read."""
        status, stdout, _ = run("--help")
        assert status == 0
        for field in dataclasses.fields(Config):
            if field.name == "unix_socket":
                flag = "--unix"
            elif field.name == "version":
                flag = "--service-version"
            else:
                flag = "--" + field.name.replace("_", "-")
            assert flag in stdout, flag
            if field.type in ("bool", bool):
                assert "--no-" + flag[2:] in stdout, flag
        assert "--config" in stdout
        for variable in Config.env_variables():
            assert variable in stdout, variable


class TestPrecedence:
    def test_flags_beat_environment(self, held_port):
        """--port and --service-name win over KITE_PORT and KITE_SERVICE_NAME."""
        env = launcher_env(KITE_PORT=str(held_port), KITE_SERVICE_NAME="from-env")
        with Launcher(TARGET, *QUIET, "--service-name", "from-flag", env=env) as launcher:
            record = launcher.wait_for_event("listening")
            assert launcher.address()[1] not in (held_port, 0)
            assert record["service"] == "from-flag"

    def test_environment_beats_code(self):
        """KITE_ variables win over the values the target's code sets."""
        env = launcher_env(
            KITE_SERVICE_NAME="from-env",
            KITE_HOST="127.0.0.1",
            KITE_PORT="0",
            KITE_ENABLE_DEBUG_SERVER="false",
        )
        with Launcher(TARGET, env=env) as launcher:
            assert launcher.wait_for_event("listening")["service"] == "from-env"

    def test_config_file_is_read(self, tmp_path):
        """--config applies a YAML file's settings."""
        path = tmp_path / "kite.yml"
        path.write_text(
            "ServiceName: from-file\nhost: 127.0.0.1\nport: 0\nenable_debug_server: false\n"
        )
        with Launcher(TARGET, "--config", str(path)) as launcher:
            assert launcher.wait_for_event("listening")["service"] == "from-file"
