"""The launcher, ``python -m kitegreen MODULE:ATTR`` and the ``kitegreen`` script, run as a
subprocess: its log, signals, exit statuses, error messages, help, ``--check-config`` and the
precedence of flags over the environment."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from typing import Any

import gevent
import pytest
import structlog
from clients import thriftpy2_client
from conftest import TESTS, testsvc_thrift, wait_until
from launching import Launcher, json_lines, launcher_env

from kitegreen import Config
from kitegreen.config import DEFAULT_LIMIT_QPS, DEFAULT_WORKER_TIMEOUT
from kitegreen.observability import logs as kg_logs

# Every test starts the launcher as a subprocess: slow.
pytestmark = [pytest.mark.timeout(60), pytest.mark.slow]

TARGET = "tests/launcher_target.py:server"
QUIET = ("--port", "0", "--host", "127.0.0.1", "--no-enable-debug-server")


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


def echo(address: Any, message: str = "still serving") -> str:
    """One echo call on a fresh connection."""
    with thriftpy2_client(testsvc_thrift.TestService, address) as client:
        return str(client.echo(message))


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


def write_module(tmp_path: Any, name: str, text: str) -> str:
    """A target module in ``tmp_path``; its path, for MODULE."""
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return str(path)


SERVER_MODULE = """
import sys
sys.path.insert(0, {tests!r})
import kitegreen
from conftest import Handler, testsvc_thrift
"""
"""The start of a target module of a test's own: the test service and handler in reach."""


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
            assert echo(launcher.address()) == "still serving"
            launcher.proc.send_signal(signal.SIGTERM)
            assert launcher.wait() == 0
        stderr = "".join(launcher.stderr)
        assert "MonkeyPatchWarning" not in stderr
        assert "Warning" not in stderr

    def test_python_m_patches_before_ssl_is_imported(self):
        """``python -m kitegreen`` serves without a warning on standard error either."""
        with Launcher(TARGET, *QUIET) as launcher:
            launcher.address()
            launcher.proc.send_signal(signal.SIGTERM)
            assert launcher.wait() == 0
        assert "Warning" not in "".join(launcher.stderr)

    def test_importing_the_package_imports_neither_ssl_nor_thriftpy2(self):
        """``import kitegreen`` (and the launcher module) leave ssl and thriftpy2 unimported."""
        code = (
            "import sys, kitegreen, kitegreen.cli; "
            "print(sorted(m for m in ('ssl', 'thriftpy2', 'gevent', 'kitegreen.server') "
            "if m in sys.modules))"
        )
        result = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, timeout=30, check=True
        )
        assert result.stdout.strip() == "[]"

    def test_module_path_target(self):
        """A dotted module path works as a target as well as a file path."""
        env = launcher_env(PYTHONPATH=str(TESTS))
        with Launcher("launcher_target:server", *QUIET, env=env) as launcher:
            address = launcher.address()
            with thriftpy2_client(testsvc_thrift.TestService, address) as client:
                assert client.add(20, 22) == 42

    def test_factory_target(self, tmp_path):
        """A callable taking no arguments is called, and the server it returns is served."""
        module = write_module(
            tmp_path,
            "factory.py",
            SERVER_MODULE.format(tests=str(TESTS))
            + "def make(debug=False):\n"
            + "    return kitegreen.RpcServer(testsvc_thrift.TestService, Handler())\n",
        )
        with Launcher(f"{module}:make", *QUIET) as launcher:
            assert echo(launcher.address()) == "still serving"

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


class TestLogs:
    def test_logs_go_to_standard_error(self):
        """The launcher's log lines are on standard error; standard output stays empty."""
        with Launcher(TARGET, *QUIET) as launcher:
            launcher.address()
            launcher.proc.send_signal(signal.SIGTERM)
            assert launcher.wait() == 0
        assert launcher.stdout == []
        names = [e["event"] for e in launcher.events()]
        assert names[-1] == "stopped"
        assert [n for n in names if n in ("stopping", "stopped")][-2:] == ["stopping", "stopped"]

    def test_auto_format_is_json_when_not_a_terminal(self):
        """With the default log_format (auto) and standard error a pipe, every line is JSON."""
        with Launcher(TARGET, *QUIET) as launcher:
            launcher.address()
            launcher.proc.send_signal(signal.SIGTERM)
            assert launcher.wait() == 0
        lines = [line for line in launcher.stderr if line.strip()]
        assert lines
        assert len(json_lines(lines)) == len(lines)

    def test_console_format_on_request(self):
        """--log-format console writes lines for people, not JSON."""
        with Launcher(TARGET, *QUIET, "--log-format", "console") as launcher:
            wait_until(lambda: any("listening" in line for line in launcher.stderr))
            launcher.proc.send_signal(signal.SIGTERM)
            assert launcher.wait() == 0
        listening = next(line for line in launcher.stderr if "listening" in line)
        assert "[info" in listening
        assert json_lines([listening]) == []


class TestLogFormat:
    """``logs.configure`` itself, in this process (its structlog setup restored afterwards)."""

    @pytest.fixture(autouse=True)
    def _restore_structlog(self):
        saved = structlog.get_config()
        yield
        structlog.configure(**saved)

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    def test_auto_is_console_on_a_terminal(self):
        """log_format auto writes the console format to a terminal."""
        stream = self.Terminal()
        kg_logs.configure("auto", stream=stream)
        structlog.get_logger("t").info("hello", answer=42)
        line = stream.getvalue()
        assert "hello" in line
        assert "answer=42" in line
        assert not line.startswith("{")

    def test_auto_is_json_elsewhere(self):
        """log_format auto writes one JSON object a line to a file or a pipe."""
        stream = io.StringIO()
        kg_logs.configure("auto", stream=stream)
        structlog.get_logger("t").info("hello", answer=42)
        record = json.loads(stream.getvalue())
        assert (record["event"], record["answer"]) == ("hello", 42)

    def test_explicit_json_on_a_terminal(self):
        """log_format json is JSON even on a terminal."""
        stream = self.Terminal()
        kg_logs.configure("json", stream=stream)
        structlog.get_logger("t").info("hello")
        assert json.loads(stream.getvalue())["event"] == "hello"


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
                wait_until(lambda: not can_connect(address), timeout=1.0)
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

    @pytest.mark.parametrize(
        ("signum", "event"),
        [
            (
                signal.SIGHUP,
                "signal ignored: a rolling reload needs --workers 2 or more; still serving",
            ),
            (signal.SIGUSR1, "greenlet and thread stacks"),
            (signal.SIGUSR2, "signal ignored: binary upgrade is not supported; still serving"),
        ],
        ids=["SIGHUP", "SIGUSR1", "SIGUSR2"],
    )
    def test_signal_is_logged_and_the_server_keeps_serving(self, signum, event):
        """HUP, USR1 and USR2 are logged; the server keeps its listener and keeps answering."""
        with Launcher(TARGET, *QUIET) as launcher:
            address = launcher.address()
            launcher.proc.send_signal(signum)
            record = launcher.wait_for_event(event)
            assert record["signal"] == signum.name
            assert echo(address) == "still serving"
            assert launcher.proc.poll() is None
            assert launcher.find_event("stopping") is None
            launcher.proc.send_signal(signal.SIGTERM)
            assert launcher.wait() == 0

    def test_sigusr1_logs_every_greenlet_and_thread_stack(self):
        """SIGUSR1's record holds gevent's run info: threads, greenlets and their frames."""
        with Launcher(TARGET, *QUIET) as launcher:
            launcher.address()
            launcher.proc.send_signal(signal.SIGUSR1)
            record = launcher.wait_for_event("greenlet and thread stacks")
        assert record["level"] == "info"
        assert "* Threads" in record["stack"]
        assert "* Greenlets" in record["stack"]
        assert "kitegreen/server.py" in record["stack"]  # the main greenlet, in serve()

    def test_sigquit_logs_the_stacks_and_stops_at_once(self):
        """SIGQUIT logs the stacks, cuts off the call in flight instead of draining, exits 1."""
        with Launcher(TARGET, *QUIET) as launcher:
            address = launcher.address()
            call = gevent.spawn(slow_call, address, 30.0, "never")
            try:
                launcher.wait_for_event("slow call started")
                started = time.monotonic()
                launcher.proc.send_signal(signal.SIGQUIT)
                assert launcher.wait(timeout=10.0) == 1, launcher.output()
                assert time.monotonic() - started < 5.0  # exit_wait_time is 5 s: not waited
                assert isinstance(call.get(timeout=5.0), Exception)
            finally:
                call.kill()
            record = launcher.wait_for_event("signal received, stopping at once without draining")
        assert record["signal"] == "SIGQUIT"
        assert "* Greenlets" in record["stack"]

    def test_sigquit_cuts_a_graceful_stop_short(self):
        """SIGQUIT during a SIGTERM's drain exits 1 at once instead of waiting for the call."""
        with Launcher(TARGET, *QUIET) as launcher:
            address = launcher.address()
            call = gevent.spawn(slow_call, address, 30.0, "never")
            try:
                launcher.wait_for_event("slow call started")
                launcher.proc.send_signal(signal.SIGTERM)
                launcher.wait_for_event("stopping")
                started = time.monotonic()
                launcher.proc.send_signal(signal.SIGQUIT)
                assert launcher.wait(timeout=10.0) == 1, launcher.output()
                assert time.monotonic() - started < 4.0  # before exit_wait_time (5 s) ran out
            finally:
                call.kill()


class TestCheckConfig:
    def test_prints_the_effective_settings_without_binding(self, held_port):
        """--check-config prints the layered settings as JSON and exits 0, binding nothing.

        The port (and the debug port) given are held by this test: a launcher that tried to
        listen would fail with "address already in use" and exit 3.
        """
        env = launcher_env(KITE_LIMIT_QPS="123", KITE_TRUSTED_PROXIES="10.1.2.3/8")
        status, stdout, stderr = run(
            TARGET,
            "--check-config",
            "--host",
            "127.0.0.1",
            "--port",
            str(held_port),
            "--debug-port",
            str(held_port),
            env=env,
        )
        assert status == 0, stderr
        settings = json.loads(stdout)
        assert settings["port"] == held_port
        assert settings["limit_qps"] == 123  # from the environment
        assert settings["service_name"] == "launcher-test"  # from the code
        assert settings["exit_wait_time"] == 5.0  # from the code
        assert settings["worker_timeout"] == DEFAULT_WORKER_TIMEOUT  # the default
        assert settings["trusted_proxies"] == ["10.0.0.0/8"]
        assert {f.name for f in dataclasses.fields(Config)} == settings.keys()
        assert all(e["event"] != "listening" for e in json_lines(stderr.splitlines()))

    def test_secrets_are_not_printed(self):
        """The Consul token is shown as set, not printed."""
        env = launcher_env(CONSUL_HTTP_TOKEN="s3cret-token")
        status, stdout, _ = run(TARGET, "--check-config", env=env)
        assert status == 0
        assert "s3cret-token" not in stdout
        assert json.loads(stdout)["consul_token"] == "(set, not shown)"

    def test_bad_value_exits_two_with_the_error(self):
        """A bad value makes --check-config exit 2 with the error on standard error only."""
        env = launcher_env(KITE_WORKERS="0")
        status, stdout, stderr = run(TARGET, "--check-config", env=env)
        assert status == 2
        assert stdout == ""
        assert "workers must be an integer between 1 and 1024, got 0 (from KITE_WORKERS)" in stderr

    def test_workers_auto_is_one_per_cpu(self):
        """--workers auto resolves to the number of CPUs."""
        status, stdout, _ = run(TARGET, "--check-config", "-w", "auto")
        assert status == 0
        assert json.loads(stdout)["workers"] == (os.cpu_count() or 1)


class TestErrors:
    @pytest.mark.parametrize("workers", ["1", "2"])
    def test_a_taken_debug_port_exits_3(self, held_port, workers):
        """The debug port taken: the start fails as for the RPC port, exit status 3, in one
        process and with workers, with the way out in the message."""
        status, _, stderr = run(
            TARGET,
            *("--host", "127.0.0.1", "--port", "0", "--debug-port", str(held_port)),
            *("--workers", workers),
            timeout=30.0,
        )
        assert status == 3, stderr
        [line] = [r for r in json_lines(stderr.splitlines()) if r.get("event") == "cannot listen"]
        assert str(held_port) in line["error"]
        assert "debug_optional" in line["error"]

    def test_a_taken_optional_debug_port_is_a_warning(self, held_port):
        """With --debug-optional the server starts without its debug server."""
        args = ("--host", "127.0.0.1", "--port", "0", "--debug-port", str(held_port))
        with Launcher(TARGET, *args, "--debug-optional") as launcher:
            address = launcher.address()
            assert echo(address) == "still serving"
            warning = launcher.wait_for_event(
                "debug server not started; the RPC service runs without it"
            )
            assert str(held_port) in warning["error"]
            launcher.proc.send_signal(signal.SIGTERM)
            assert launcher.wait(15.0) == 0

    def test_bad_target(self):
        """A target that cannot be imported exits 2 saying what could not be imported."""
        status, _, stderr = run("nope:nothing", *QUIET)
        assert status == 2
        assert "cannot import nope" in stderr
        assert "Traceback" not in stderr

    def test_target_that_is_not_a_server(self):
        """A target naming something other than a server says what it expected."""
        status, _, stderr = run("tests/launcher_target.py:LoggingHandler", *QUIET)
        assert status == 2
        assert "expected a kitegreen.RpcServer" in stderr

    def test_malformed_target(self):
        """A target without a colon says the form it expects."""
        status, _, stderr = run("tests/launcher_target.py", *QUIET)
        assert status == 2
        assert "MODULE:ATTR" in stderr

    @pytest.mark.parametrize(
        ("body", "target", "error"),
        [
            (
                "def fail():\n    raise RuntimeError('boom while importing')\nfail()\n",
                "server",
                "RuntimeError: boom while importing",
            ),
            (
                "import not_a_module_anyone_has\n",
                "server",
                "ModuleNotFoundError: No module named 'not_a_module_anyone_has'",
            ),
            (
                "def make():\n    raise RuntimeError('boom while building')\n",
                "make",
                "RuntimeError: boom while building",
            ),
        ],
        ids=["raises-at-import", "imports-a-missing-module", "factory-raises"],
    )
    def test_users_code_that_raises_shows_its_own_traceback(self, tmp_path, body, target, error):
        """When the target's own code raises, its traceback is shown, without the launcher's."""
        module = write_module(tmp_path, "broken.py", body)
        status, stdout, stderr = run(f"{module}:{target}", *QUIET)
        assert status == 2
        assert stdout == ""
        (record,) = [e for e in json_lines(stderr.splitlines()) if e["event"] == "cannot launch"]
        assert error in record["error"]
        trace = record["exception"]
        assert trace.startswith("Traceback (most recent call last):")
        assert f'File "{module}"' in trace
        assert trace.rstrip().endswith(error)
        assert "kitegreen/cli.py" not in trace
        assert "importlib" not in trace

    def test_callable_target_that_needs_arguments(self, tmp_path):
        """A callable target needing arguments says so by name, without a traceback."""
        module = write_module(tmp_path, "needs.py", "def make(port, *, name='x'):\n    pass\n")
        status, _, stderr = run(f"{module}:make", *QUIET)
        assert status == 2
        assert "is a callable that needs arguments (port)" in stderr
        assert "Traceback" not in stderr
        assert "TypeError" not in stderr

    def test_error_is_printed_once_on_standard_error(self):
        """A launch error is one line on standard error, and nothing on standard output."""
        status, stdout, stderr = run("nope:nothing", *QUIET)
        assert status == 2
        assert stdout == ""
        assert [line for line in stderr.splitlines() if line.strip()] == [
            line for line in stderr.splitlines() if "cannot import nope" in line
        ]
        assert len(stderr.strip().splitlines()) == 1

    def test_address_in_use(self, held_port):
        """A port already in use exits 3 naming the address, once, without a traceback."""
        status, stdout, stderr = run(
            TARGET, "--host", "127.0.0.1", "--port", str(held_port), "--no-enable-debug-server"
        )
        assert status == 3
        assert f"127.0.0.1:{held_port}" in stderr
        assert "address already in use" in stderr
        assert "Traceback" not in stderr
        assert stdout == ""
        assert sum("address already in use" in line for line in stderr.splitlines()) == 1

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
        """A malformed flag value exits 2 naming the flag and what was expected, once."""
        status, stdout, stderr = run(TARGET, "--port", "http", "--no-enable-debug-server")
        assert status == 2
        assert stdout == ""
        assert stderr.strip() == (
            "python -m kitegreen: port must be an integer, got 'http' (from --port)"
        )

    def test_unknown_flag_suggests_the_nearest(self):
        """A misspelt flag is refused with the nearest flag, not the list of all of them."""
        status, _, stderr = run(TARGET, "--limit-qsp", "5")
        assert status == 2
        assert "unknown flag --limit-qsp; did you mean --limit-qps?" in stderr
        assert "--debug-idle-timeout" not in stderr

    def test_flag_prefixes_are_not_taken(self):
        """A prefix of a flag is an unknown flag, not the flag it happens to start."""
        status, _, stderr = run(TARGET, "--limit-q", "5")
        assert status == 2
        assert "unknown flag --limit-q" in stderr

    def test_unknown_file_key_suggests_the_nearest(self, tmp_path):
        """A misspelt key in the config file names the file and the nearest setting."""
        path = tmp_path / "kite.yml"
        path.write_text("limit_qps: 5\nidle_timout: 3\n")
        status, _, stderr = run(TARGET, *QUIET, "--config", str(path))
        assert status == 2
        assert (
            f"unknown setting 'idle_timout' in config file {path}; did you mean 'idle_timeout'?"
            in (stderr)
        )

    def test_unknown_kite_variable_is_ignored(self):
        """A KITE_ variable naming no setting is someone else's; the launcher starts."""
        env = launcher_env(KITE_SOMETHING_ELSE="1")
        status, _, stderr = run(TARGET, "--check-config", env=env)
        assert status == 0, stderr

    def test_malformed_yaml_names_the_file_and_the_line(self, tmp_path):
        """A YAML syntax error names the file and the line, not PyYAML's "<unicode string>"."""
        path = tmp_path / "kite.yml"
        path.write_text("port: 0\nhost: [127.0.0.1\n")
        status, _, stderr = run(TARGET, "--config", str(path))
        assert status == 2
        assert f"config file {path} is not valid YAML at line 3" in stderr
        assert "<unicode string>" not in stderr


class TestVersionAndHelp:
    def test_version_prints_kitegreen_s_version(self):
        """--version prints the program's version (the service's is --service-version)."""
        import kitegreen

        status, stdout, _ = run("--version")
        assert status == 0
        assert stdout.strip() == f"kitegreen {kitegreen.__version__}"

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

    def test_help_is_grouped(self):
        """Settings are grouped under headings, in order: listen before limits before logging."""
        status, stdout, _ = run("--help")
        assert status == 0
        headings = [line[:-1] for line in stdout.splitlines() if line.endswith(":")]
        expected = ["listen", "workers", "limits", "timeouts", "consul", "debug", "logging"]
        found = [h for h in headings if h in expected]
        assert found == expected
        listen = stdout.index("\nlisten:")
        assert listen < stdout.index("--port PORT") < stdout.index("\nworkers:")

    @pytest.mark.parametrize(
        "shown",
        [
            "--read-write-timeout SECONDS",
            "--limit-qps INT",
            "--access-log, --no-access-log",
            "--consul-addr HOST:PORT",
            "--unix PATH",
            "--trusted-proxies CIDRS",
            "--endpoint-qps-limits METHOD=QPS,...",
            "--log-format {auto,json,console}",
            "-w INT|auto, --workers INT|auto",
        ],
    )
    def test_help_shows_typed_placeholders(self, shown):
        """Each flag shows what kind of value it takes."""
        status, stdout, _ = run("--help")
        assert status == 0
        assert shown in stdout

    def test_each_flag_shows_its_default_and_variables(self):
        """A flag's help gives its default (read from the field) and its variables beside it."""
        status, stdout, _ = run("--help", env={**launcher_env(), "COLUMNS": "200"})
        assert status == 0
        line = next(line for line in stdout.splitlines() if "--limit-qps INT" in line)
        assert f"(default: {DEFAULT_LIMIT_QPS})" in line
        assert line.rstrip().endswith("[env KITE_LIMIT_QPS]")
        port = next(line for line in stdout.splitlines() if "--port PORT" in line)
        assert port.rstrip().endswith("[env KITE_PORT, KITE_SERVICE_PORT]")

    def test_variables_are_never_split_across_lines(self):
        """In a narrow terminal a flag's [env ...] moves to a line of its own, whole."""
        status, stdout, _ = run("--help", env={**launcher_env(), "COLUMNS": "80"})
        assert status == 0
        lines = [line.strip() for line in stdout.splitlines()]
        assert "[env KITE_SERVICE_MESH_INGRESS_ADDR, SERVICE_MESH_INGRESS_ADDR]" in lines


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
