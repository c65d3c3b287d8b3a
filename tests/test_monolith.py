"""``examples/monolith/app.py``: a gevent WSGI app and an ``RpcServer`` in one process, its
settings from :func:`kitegreen.load_config`, stopped by :func:`kitegreen.stop_on_signals`; run as
a subprocess, called over loopback with ``urllib`` and thriftpy2's client."""

from __future__ import annotations

import json
import os
import signal
import sys
import urllib.request
from pathlib import Path
from typing import Any

import gevent
import pytest
import thriftpy2
from clients import thriftpy2_client
from conftest import TESTS, testsvc_thrift, wait_until
from gevent import pywsgi
from gevent.pool import Pool
from launching import Launcher, launcher_env

import kitegreen

pytestmark = [pytest.mark.timeout(60), pytest.mark.slow]

EXAMPLE = TESTS.parent / "examples" / "monolith"
monolith_thrift = thriftpy2.load(str(EXAMPLE / "monolith.thrift"), module_name="monolith_thrift")


def http_get(port: int, path: str) -> tuple[int, bytes]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as response:
        return int(response.status), bytes(response.read())


def thrift_call(port: int, method: str, *args: Any) -> Any:
    with thriftpy2_client(monolith_thrift.Orders, ("127.0.0.1", port), timeout=10.0) as client:
        return getattr(client, method)(*args)


def ports(launcher: Launcher) -> dict[str, Any]:
    def announced() -> dict[str, Any] | None:
        for line in launcher.stdout:
            if line.startswith("{"):
                found: dict[str, Any] = json.loads(line)
                return found
        return None

    found = wait_until(
        lambda: announced() or launcher.proc.poll() is not None,
        timeout=20.0,
        what=lambda: f"the ports line;\n{launcher.output()}",
    )
    assert isinstance(found, dict), launcher.output()
    return found


def monolith(*args: str) -> Launcher:
    # KITE_PORT over the code's 9090: the environment layer of load_config at work.
    env = launcher_env(KITE_PORT="0", MONOLITH_HTTP_PORT="0", KITE_ENABLE_DEBUG_SERVER="false")
    return Launcher(*args, env=env, command=(sys.executable, str(EXAMPLE / "app.py")))


class TestMonolith:
    def test_http_and_thrift_answer_from_one_process(self) -> None:
        """Both servers answer; the Thrift port comes from KITE_PORT, not the code's 9090."""
        with monolith() as launcher:
            found = ports(launcher)
            assert found["thrift"] != 9090
            assert http_get(found["http"], "/") == (200, b"ok\n")
            assert thrift_call(found["thrift"], "echo", "one process") == "one process"
            launcher.proc.send_signal(signal.SIGTERM)
            assert launcher.wait(15.0) == 0, launcher.output()

    def test_sigterm_drains_both_and_exits_0(self) -> None:
        """SIGTERM with an HTTP request and a Thrift call in flight: both get their answer and
        the process exits 0."""
        with monolith("--exit-wait-time", "5") as launcher:
            found = ports(launcher)
            http = gevent.spawn(http_get, found["http"], "/slow?seconds=1")
            rpc = gevent.spawn(thrift_call, found["thrift"], "slow", 1.0, "drained")
            wait_until(
                lambda: (
                    "slow request started" in launcher.output()
                    and "slow call started" in launcher.output()
                ),
                what=lambda: f"both slow requests in flight;\n{launcher.output()}",
            )
            launcher.proc.send_signal(signal.SIGTERM)
            assert http.get(timeout=10.0) == (200, b"slow done\n")
            assert rpc.get(timeout=10.0) == "drained"
            assert launcher.wait(15.0) == 0, launcher.output()
        assert "signal received, stopping" in launcher.output()


class TestLoadConfig:
    def test_layers_code_file_environment_and_flags(self, tmp_path: Path) -> None:
        """Flags beat the environment beats the file beats the code, as in the launcher."""
        file = tmp_path / "kite.yml"
        file.write_text("port: 7001\nlimit_qps: 11\nlimit_connections: 12\ncluster: file\n")
        config = kitegreen.load_config(
            kitegreen.Config(port=7000, cluster="code", service_name="code"),
            env={"KITE_CONFIG_FILE": str(file), "KITE_LIMIT_QPS": "21", "KITE_PORT": "7002"},
            argv=["--port", "7003"],
        )
        assert (config.service_name, config.cluster) == ("code", "file")
        assert (config.limit_connections, config.limit_qps, config.port) == (12, 21, 7003)

    def test_refuses_what_is_not_a_setting_flag(self) -> None:
        """An argv entry that is not a setting flag is a ConfigError naming it."""
        with pytest.raises(kitegreen.ConfigError, match="'--colour' is not a setting flag"):
            kitegreen.load_config(argv=["--colour"], env={})


class TestStopOnSignals:
    """:func:`kitegreen.stop_on_signals` in this process, on SIGUSR2 (pytest keeps SIGTERM)."""

    def test_a_signal_drains_an_rpc_server_and_a_wsgi_server(self, make_server, handler):
        """One signal stops both; a call in flight on the RPC server finishes first, and
        wait() says the stop was clean."""
        rpc = make_server()
        http = pywsgi.WSGIServer(("127.0.0.1", 0), lambda env, start: [], spawn=Pool(10), log=None)
        http.start()
        stopping = kitegreen.stop_on_signals(rpc, http, signals=(signal.SIGUSR2,), timeout=5.0)
        try:
            call = gevent.spawn(thrift_call_to, rpc.address, "slow", 0.5, "finished")
            wait_until(lambda: handler.in_flight == 1, what="the slow call in flight")
            os.kill(os.getpid(), signal.SIGUSR2)
            assert stopping.wait(timeout=10.0) is True
            assert call.get(timeout=5.0) == "finished"
            assert not rpc.started
            assert http.closed
        finally:
            stopping.cancel()
            http.stop()

    def test_wait_says_false_when_requests_were_cut_off(self, make_server, handler):
        """A call that outlasts the timeout is cut off, and wait() says so."""
        rpc = make_server()
        stopping = kitegreen.stop_on_signals(rpc, signals=(), timeout=0.2)
        call = gevent.spawn(thrift_call_to, rpc.address, "slow", 5.0, "too late")
        wait_until(lambda: handler.in_flight == 1, what="the slow call in flight")
        stopping.stop()
        assert stopping.requested
        assert stopping.wait(timeout=10.0) is False
        call.join(timeout=10.0)


def thrift_call_to(address: Any, method: str, *args: Any) -> Any:
    with thriftpy2_client(testsvc_thrift.TestService, address, timeout=10.0) as client:
        return getattr(client, method)(*args)
