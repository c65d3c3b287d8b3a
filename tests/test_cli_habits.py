"""The launcher meets a gunicorn user's habits: ``-b/--bind``, gunicorn's flag names answered
with their equivalents, levels in any case, and ``--check-config`` showing derived values."""

from __future__ import annotations

import json
import re
import signal

import pytest
from clients import thriftpy2_client
from conftest import testsvc_thrift
from launching import Launcher, launcher_env

from kitegreen.cli import _parser
from kitegreen.config import DEFAULT_CONSUL_ADDR, DEFAULT_DRAIN_TIME_REGISTERED
from kitegreen.config.gunicorn import GUNICORN_FLAGS

pytestmark = pytest.mark.timeout(60)

TARGET = "tests/launcher_target.py:server"


def run(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    """Run the launcher to completion: ``(exit status, stdout, stderr)``."""
    with Launcher(*args, env=env) as launcher:
        status = launcher.wait(10.0)
        return status, "".join(launcher.stdout), "".join(launcher.stderr)


def check_config(*args: str, env: dict[str, str] | None = None) -> dict[str, object]:
    status, stdout, stderr = run(TARGET, "--check-config", *args, env=env)
    assert status == 0, stderr
    settings: dict[str, object] = json.loads(stdout)
    return settings


@pytest.mark.slow
class TestBind:
    def test_host_and_port(self):
        """-b 127.0.0.1:0 listens there, on a free port, and serves."""
        with Launcher(TARGET, "-b", "127.0.0.1:0", "--no-enable-debug-server") as launcher:
            host, port = launcher.address()
            assert host == "127.0.0.1"
            assert port > 0
            with thriftpy2_client(testsvc_thrift.TestService, (host, port)) as client:
                assert client.echo("bound") == "bound"
            launcher.proc.send_signal(signal.SIGTERM)
            assert launcher.wait() == 0

    def test_unix_socket(self, tmp_path):
        """-b unix:PATH listens on the Unix socket, as --unix PATH does."""
        path = tmp_path / "kg.sock"
        with Launcher(TARGET, "-b", f"unix:{path}", "--no-enable-debug-server") as launcher:
            assert launcher.wait_for_event("listening")["address"] == f"unix:{path}"
            with thriftpy2_client(testsvc_thrift.TestService, str(path)) as client:
                assert client.echo("bound") == "bound"
            launcher.proc.send_signal(signal.SIGTERM)
            assert launcher.wait() == 0

    def test_the_flag_beats_a_unix_socket_from_the_environment(self, tmp_path):
        """-b HOST:PORT is TCP even when KITE_UNIX_SOCKET names a socket: flags win."""
        env = launcher_env(KITE_UNIX_SOCKET=str(tmp_path / "kg.sock"))
        settings = check_config("-b", "[::1]:7001", env=env)
        assert (settings["host"], settings["port"], settings["listen_type"]) == ("::1", 7001, "tcp")

    def test_a_bare_host_keeps_the_port(self):
        """-b HOST sets the host and leaves the port setting as it was."""
        settings = check_config("-b", "127.0.0.2")
        assert (settings["host"], settings["port"]) == ("127.0.0.2", 0)  # 0 from the code

    @pytest.mark.parametrize(
        ("args", "message"),
        [
            (("-b", "127.0.0.1:1", "-b", "127.0.0.1:2"), "-b/--bind given 2 times"),
            (
                ("-b", "127.0.0.1:1", "--port", "2"),
                "-b/--bind sets where to listen; give it or --port",
            ),
            (("-b", "localhost:http"), "the port must be a number from 0 to 65535, got 'http'"),
            (("-b", "unix:"), "unix: needs a path"),
        ],
        ids=["twice", "with-port", "bad-port", "empty-path"],
    )
    def test_refused_with_the_reason(self, args, message):
        """A second -b, -b with the flags it sets, or a malformed address exits 2 saying why."""
        status, stdout, stderr = run(TARGET, *args)
        assert status == 2
        assert stdout == ""
        assert message in stderr


class TestGunicornFlags:
    @pytest.mark.parametrize(
        ("flag", "answer"),
        [
            ("--timeout", "did you mean --worker-timeout?"),
            ("--graceful-timeout", "did you mean --exit-wait-time?"),
            ("--keep-alive", "did you mean --idle-timeout?"),
            ("--access-logfile", "did you mean --access-log?"),
            ("--worker-connections", "did you mean --limit-connections?"),
            ("--forwarded-allow-ips", "did you mean --trusted-proxies?"),
            ("--threads", "kitegreen has no threads to set"),
            ("--worker-class", "kitegreen's workers are always gevent's"),
        ],
    )
    @pytest.mark.slow
    def test_a_gunicorn_flag_gets_its_equivalent(self, flag, answer):
        """gunicorn's flag names are answered from a table, not by the nearest spelling
        (``--timeout`` would be ``--idle-timeout``, ``--max-requests`` ``--max-frame-size``)."""
        status, _, stderr = run(TARGET, f"{flag}=30")
        assert status == 2
        assert f"unknown flag {flag}; {answer}" in stderr
        assert "--max-frame-size" not in stderr

    def test_every_flag_the_table_suggests_exists(self):
        """Each kitegreen flag the table names is one the launcher knows."""
        known = {s for action in _parser("kitegreen")._actions for s in action.option_strings}
        suggested = {instead for instead, _ in GUNICORN_FLAGS.values() if instead}
        mentioned = {
            flag
            for _, why in GUNICORN_FLAGS.values()
            for flag in re.findall(r"(?<!gunicorn's )--[a-z-]+", why)
        }
        assert suggested | mentioned <= known
        assert not known & GUNICORN_FLAGS.keys()  # a flag kitegreen has is not answered here

    @pytest.mark.slow
    def test_a_misspelling_still_gets_the_nearest_flag(self):
        """A flag in neither list still gets difflib's nearest."""
        status, _, stderr = run(TARGET, "--idle-timout", "3")
        assert status == 2
        assert "unknown flag --idle-timout; did you mean --idle-timeout?" in stderr


@pytest.mark.slow
class TestLevels:
    def test_levels_and_formats_in_any_case(self):
        """--log-level DEBUG and KITE_LOG_FORMAT=JSON are accepted, kept in lower case."""
        settings = check_config("--log-level", "DEBUG", env=launcher_env(KITE_LOG_FORMAT="JSON"))
        assert (settings["log_level"], settings["log_format"]) == ("debug", "json")

    def test_an_unknown_level_is_still_refused(self):
        """Any case is not any word: --log-level LOUD exits 2 listing the levels."""
        status, _, stderr = run(TARGET, "--check-config", "--log-level", "LOUD")
        assert status == 2
        assert "log_level must be one of debug, info, warning, error, critical" in stderr


@pytest.mark.slow
class TestCheckConfigDerived:
    def test_derived_values_are_shown_not_null(self):
        """debug_port, drain_time and consul_addr show what the server will use."""
        settings = check_config("--port", "8123")
        assert settings["debug_port"] == 18123
        assert settings["drain_time"] == 0.0  # not registered: nobody to drain
        assert settings["consul_addr"] == DEFAULT_CONSUL_ADDR

    def test_drain_time_when_registered(self):
        """A server that registers in Consul drains for the default drain time."""
        settings = check_config("--port", "8123", "--register")
        assert settings["drain_time"] == DEFAULT_DRAIN_TIME_REGISTERED

    def test_values_given_are_shown_as_given(self):
        """Given values are not replaced by derived ones."""
        settings = check_config(
            "--debug-port", "9000", "--drain-time", "7", "--consul-addr", "10.0.0.1:8500"
        )
        assert (settings["debug_port"], settings["drain_time"], settings["consul_addr"]) == (
            9000,
            7.0,
            "10.0.0.1:8500",
        )

    def test_no_debug_port_without_a_debug_server(self):
        """With the debug server off, debug_port is null: nothing will listen there."""
        settings = check_config("--port", "8123", "--no-enable-debug-server")
        assert settings["debug_port"] is None
