"""One metric set whatever the worker count: the launcher's /metrics with one process and with
an arbiter of workers, across a reload and TTIN/TTOU (subprocesses, scraped over loopback);
and the counters of unknown methods and protocol errors (a server in this process, raw bytes
over loopback)."""

from __future__ import annotations

import platform
import signal
import socket
import struct
import urllib.request
from collections.abc import Iterator

import pytest
import wire
from clients import thriftpy2_client
from conftest import wait_until
from launching import Launcher
from prometheus_client.parser import text_string_to_metric_families
from service import testsvc_thrift

import kitegreen

TARGET = "tests/workers_target.py:server"
LOOPBACK = ("--host", "127.0.0.1", "--port", "0", "--debug-port", "0", "--exit-wait-time", "1")
Series = frozenset[tuple[str, frozenset[tuple[str, str]]]]


def scrape(launcher: Launcher) -> str:
    where = launcher.wait_for_event("debug server listening")["address"]
    with urllib.request.urlopen(f"http://{where}/metrics", timeout=10) as response:
        body: bytes = response.read()
        return body.decode()


def shape(text: str) -> dict[str, frozenset[str]]:
    """Each family's name and the names of its labels (a histogram's ``le`` left out)."""
    return {
        family.name: frozenset(
            name for sample in family.samples for name in sample.labels if name != "le"
        )
        for family in text_string_to_metric_families(text)
    }


def series(text: str) -> Series:
    """Every series of an exposition: its sample name and labels, not its value."""
    return frozenset(
        (sample.name, frozenset(sample.labels.items()))
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    )


def value(text: str, name: str, **labels: str) -> float:
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return float(sample.value)
    raise AssertionError(f"no {name} {labels} in the exposition")


def echo(launcher: Launcher) -> None:
    with thriftpy2_client(testsvc_thrift.TestService, launcher.address()) as client:
        assert client.echo("x") == "x"


def ready_workers(launcher: Launcher) -> set[int]:
    ready = {e["worker"] for e in launcher.named("worker ready")}
    gone = {
        e["worker"]
        for name in ("worker stopped", "worker exited unasked; replacing it")
        for e in launcher.named(name)
    }
    return ready - gone


@pytest.fixture
def instance(request) -> Iterator[Launcher]:
    """The launcher serving the tests' target with ``request.param`` workers, all ready."""
    workers = str(request.param)
    with Launcher(TARGET, *LOOPBACK, "--workers", workers) as launcher:
        if workers == "1":
            launcher.wait_for_event("debug server listening", timeout=20.0)
        else:
            wait_until(lambda: len(ready_workers(launcher)) == int(workers), timeout=20.0)
        yield launcher


@pytest.mark.slow
@pytest.mark.timeout(60)
class TestOneSet:
    def test_one_process_and_two_workers_expose_the_same_families(self):
        """Family names and label names are the same with -w 1 (one process) and -w 2 (an
        arbiter summing its workers): process, GC and build figures included."""
        shapes = {}
        for workers in ("1", "2"):
            with Launcher(TARGET, *LOOPBACK, "--workers", workers) as launcher:
                wait_until(
                    lambda launcher=launcher, workers=workers: (
                        len(ready_workers(launcher)) == int(workers)
                        if workers != "1"
                        else launcher.find_event("debug server listening")
                    ),
                    timeout=20.0,
                )
                echo(launcher)
                text = scrape(launcher)
                shapes[workers] = shape(text)
                assert value(text, "kitegreen_workers") == int(workers)
                assert value(text, "process_cpu_seconds_total") > 0
                assert value(text, "python_gc_collections_total", generation="0") >= 0
                build = {"version": kitegreen.__version__, "python": platform.python_version()}
                assert value(text, "kitegreen_build_info", **build) == 1
                launcher.proc.terminate()
                assert launcher.wait(20.0) == 0
        assert shapes["1"] == shapes["2"]
        assert shapes["1"]["kitegreen_connections_open"] == {"worker"}
        assert shapes["1"]["process_resident_memory_bytes"] == frozenset()
        assert {"python_gc_objects_collected", "python_info"} <= shapes["1"].keys()

    @pytest.mark.parametrize("instance", [2], indirect=True)
    def test_a_reload_and_ttin_ttou_make_no_new_series(self, instance):
        """Series are labelled by worker number, not pid: after a SIGHUP that replaced every
        worker, and after TTIN then TTOU, the exposition has the series it had."""
        echo(instance)
        before = series(scrape(instance))
        old = ready_workers(instance)
        instance.proc.send_signal(signal.SIGHUP)
        instance.wait_for_event("reload complete", timeout=30.0)
        wait_until(lambda: len(ready_workers(instance)) == 2 and not ready_workers(instance) & old)
        echo(instance)
        assert series(scrape(instance)) == before
        instance.proc.send_signal(signal.SIGTTIN)
        wait_until(lambda: len(ready_workers(instance)) == 3, timeout=20.0)
        grown = series(scrape(instance))
        assert ("kitegreen_connections_open", frozenset({("worker", "2")})) in grown
        instance.proc.send_signal(signal.SIGTTOU)
        wait_until(lambda: len(ready_workers(instance)) == 2, timeout=20.0)
        wait_until(lambda: series(scrape(instance)) == before, timeout=10.0)


def exchange(address: tuple[str, int], data: bytes) -> bytes:
    """Send ``data`` on a connection of its own; what the server sends back until it closes
    or goes quiet for half a second."""
    got = b""
    with socket.create_connection(address, timeout=5.0) as sock:
        sock.sendall(data)
        sock.settimeout(0.5)
        try:
            while chunk := sock.recv(65536):
                got += chunk
        except TimeoutError:
            pass
    return got


def count(server: kitegreen.RpcServer, name: str, **labels: str) -> float:
    assert server.metrics is not None
    return value(server.metrics.exposition().decode(), name, **labels)


class TestRefusedInput:
    def test_unknown_methods_and_protocol_errors_are_counted(self, server):
        """Each refused input increments its counter, with no method name as a label."""
        address = server.address
        unknown = wire.head("binary", "no_such_method") + b"\x00"
        assert b"no_such_method" in exchange(address, unknown + unknown)
        assert b"expected a call" in exchange(
            address, wire.head("binary", "echo", wire.REPLY) + b"\x00"
        )
        # A string claiming 1000 bytes in a 4-byte-long remainder of its frame.
        truncated = wire.head("binary", "echo") + b"\x0b\x00\x01" + struct.pack("!i", 1000) + b"ab"
        assert b"cannot decode echo arguments" in exchange(address, wire.wrap("framed", truncated))
        exchange(address, b"GET /metrics HTTP/1.1\r\n\r\n")
        wait_until(lambda: count(server, "kitegreen_protocol_errors_total", kind="malformed") == 1)
        assert count(server, "kitegreen_unknown_method_total") == 2
        assert count(server, "kitegreen_protocol_errors_total", kind="message_type") == 1
        assert count(server, "kitegreen_protocol_errors_total", kind="arguments") == 1
        assert count(server, "kitegreen_request_errors_total", method="echo", kind="protocol") == 1
        text = server.metrics.exposition().decode()
        assert "no_such_method" not in text
