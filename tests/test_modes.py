"""One instance behaves the same with one process and with ``--workers 2``: the same remote
configuration gives the same limits, events and ``/runtime/kite``; a failed start undoes
itself; a stop goes through the same phases in the same order.

Each test runs the launcher as a subprocess, once per mode, against the Consul double.
"""

from __future__ import annotations

import json
import signal
import socket
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
from conftest import can_connect, wait_until
from consul_double import ConsulDouble
from launching import Launcher, launcher_env

from kitegreen.instance import STOP_PHASES

TARGET = "tests/workers_target.py:server"
SERVICE = "workers-test"
LOCAL = ("--limit-connections", "300", "--limit-qps", "1000")
ARGS = (
    "--host",
    "127.0.0.1",
    "--port",
    "0",
    "--debug-port",
    "0",
    "--exit-wait-time",
    "2",
    "--drain-time",
    "0",
)
MODES = {"one process": (), "workers": ("--workers", "2")}
INSTANCE_KEYS = {"service", "cluster", "version", "address", "overload", "remote_configs", "events"}
WORKER_KEYS = {"arbiter", "workers", "totals"}
OVERLOAD_KEYS = {
    "conn_now",
    "conn_busy",
    "conn_limit",
    "qps_limit",
    "endpoint_qps_limits",
    "limits_enabled",
}

pytestmark = [pytest.mark.parametrize("mode", list(MODES)), pytest.mark.slow]


@pytest.fixture
def agent() -> Iterator[ConsulDouble]:
    with ConsulDouble() as double:
        yield double


class Running:
    """The launcher in one mode, ready to serve, and what its debug server says."""

    def __init__(self, launcher: Launcher, mode: str) -> None:
        self.launcher = launcher
        self.mode = mode
        if mode == "workers":
            assert wait_until(lambda: len(launcher.named("worker ready")) >= 2, timeout=20.0), (
                launcher.output()[-3000:]
            )
        self.debug_at = launcher.wait_for_event("debug server listening", timeout=20.0)["address"]

    def runtime(self) -> dict[str, Any]:
        with urllib.request.urlopen(f"http://{self.debug_at}/runtime/kite", timeout=10) as r:
            doc: dict[str, Any] = json.loads(r.read())
        return doc

    def limits(self) -> tuple[int, int, dict[str, int]]:
        overload = self.runtime()["overload"]
        return overload["conn_limit"], overload["qps_limit"], overload["endpoint_qps_limits"]

    def wait_for_limits(self, conn: int, qps: int, endpoint: dict[str, int]) -> None:
        want = (conn, qps, endpoint)
        assert wait_until(lambda: self.limits() == want, timeout=5.0), (self.limits(), want)

    def stop(self) -> int:
        self.launcher.proc.send_signal(signal.SIGTERM)
        return self.launcher.wait(20.0)


def launch(mode: str, *args: str, agent: ConsulDouble) -> Launcher:
    env = launcher_env(CONSUL_HTTP_ADDR=agent.address)
    return Launcher(TARGET, *ARGS, *MODES[mode], *args, env=env)


def config_changes(doc: dict[str, Any]) -> list[str]:
    """The details of the ``Config Change`` events, oldest first."""
    return [e["detail"] for e in reversed(doc["events"]) if e["name"] == "Config Change"]


def test_remote_config_gives_the_same_limits_events_and_runtime(mode, agent):
    """Limits set in Consul, one removed, a key deleted, Consul down and back: the limits in
    force, the ``Config Change`` events and the shape of ``/runtime/kite`` are the same with
    one process and with workers (each worker then enforces its share)."""
    conn, qps, endpoint = (
        f"kite/limit/{kind}/{SERVICE}" for kind in ("conn", "qps", "endpoint_qps")
    )

    def payload(limits: dict[str, int]) -> str:
        return json.dumps({"payload": [{"endpoint": m, "qps_limit": q} for m, q in limits.items()]})

    with launch(mode, "--remote-config", *LOCAL, agent=agent) as launcher:
        instance = Running(launcher, mode)
        instance.wait_for_limits(300, 1000, {})
        agent.kv_put(conn, "40")
        instance.wait_for_limits(40, 1000, {})
        agent.kv_put(qps, "70")
        instance.wait_for_limits(40, 70, {})
        agent.kv_put(endpoint, payload({"echo": 9, "add": 5}))
        instance.wait_for_limits(40, 70, {"echo": 9, "add": 5})
        agent.kv_put(endpoint, payload({"echo": 9}))  # one limit removed
        instance.wait_for_limits(40, 70, {"echo": 9})
        agent.kv_delete(qps)  # back to the local setting
        instance.wait_for_limits(40, 1000, {"echo": 9})
        agent.kv_delete(endpoint)
        instance.wait_for_limits(40, 1000, {})
        agent.go_down()
        assert wait_until(
            lambda: any(e["name"] == "Remote Config" for e in instance.runtime()["events"]),
            timeout=10.0,
        )
        assert instance.limits() == (40, 1000, {})  # the last good values stay
        agent.come_back()
        agent.kv_put(conn, "50")
        instance.wait_for_limits(50, 1000, {})

        doc = instance.runtime()
        assert config_changes(doc) == [
            "consul: conn 300->40, qps 1000->1000, endpoint_qps {}",
            "consul: conn 40->40, qps 1000->70, endpoint_qps {}",
            "consul: conn 40->40, qps 70->70, endpoint_qps {'echo': 9, 'add': 5}",
            "consul: conn 40->40, qps 70->70, endpoint_qps {'echo': 9}",
            "consul: conn 40->40, qps 70->1000, endpoint_qps {'echo': 9}",
            "consul: conn 40->40, qps 1000->1000, endpoint_qps {}",
            "consul: conn 40->50, qps 1000->1000, endpoint_qps {}",
        ]
        extra = WORKER_KEYS if mode == "workers" else set()
        assert set(doc) == INSTANCE_KEYS | extra
        overload = doc["overload"]
        assert set(overload) - {"worker_share"} == OVERLOAD_KEYS
        assert overload["limits_enabled"] is True
        assert set(doc["remote_configs"]) == {"limit_connections"}
        assert doc["remote_configs"]["limit_connections"]["value"] == 50
        assert doc["service"] == SERVICE
        if mode == "workers":
            shares = [w["overload"]["conn_limit"] for w in doc["workers"]]
            assert shares == [25, 25]
            assert overload["worker_share"]["limit_connections"] == 25
        assert instance.stop() == 0


def test_stop_phases_come_in_the_same_order(mode, agent):
    """A graceful stop logs ``stopping``, then its phases in order, then ``stopped``, in the
    process that holds the instance, whichever the mode."""
    with launch(mode, agent=agent) as launcher:
        instance = Running(launcher, mode)
        owner = launcher.proc.pid
        assert instance.stop() == 0
        mine = [e for e in launcher.events() if e.get("pid") == owner]
        names = [e["event"] for e in mine if e["event"] in ("stopping", "stop phase", "stopped")]
        phases = [e["phase"] for e in mine if e["event"] == "stop phase"]
        assert phases == list(STOP_PHASES)
        assert names == ["stopping", *["stop phase"] * len(STOP_PHASES), "stopped"]


def test_a_failed_start_undoes_itself(mode, agent):
    """A part of the instance that cannot start (here the registration, with a malformed
    Consul address) makes the launcher exit 2 saying why, with its port closed again."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    args = ("--register", "--consul-addr", "not-an-address", "--port", str(port))
    with launch(mode, *args, agent=agent) as launcher:
        assert launcher.wait(20.0) == 2, launcher.output()[-3000:]
        failure = launcher.wait_for_event("cannot start")
        assert "consul_addr" in failure["error"]
        assert not launcher.named("worker spawned")
    assert not can_connect(("127.0.0.1", port))
