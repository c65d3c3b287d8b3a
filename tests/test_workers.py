"""``--workers N``: the arbiter and its workers, run through the launcher as subprocesses, called
over real loopback sockets, watched through their logs and the arbiter's debug endpoints; and
their parts (the accept balance, limit shares, the probe's settings, summed metrics) in this
process."""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import itertools
import json
import math
import os
import re
import resource
import signal
import socket
import struct
import subprocess
import time
import types
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gevent
import gevent.event
import pytest
import structlog
import wire
from conftest import TESTS, loopback_config, wait_until
from consul_double import ConsulDouble
from launching import Launcher, launcher_env
from service import testsvc_thrift
from thriftpy2.protocol.cybin import TCyBinaryProtocol
from thriftpy2.transport.memory import TCyMemoryBuffer
from trickle import Tricklers, probe_health

import kitegreen
from kitegreen.config import DEFAULT_LIMIT_CONNECTIONS, Config
from kitegreen.observability.metrics import Metrics, merge_snapshots
from kitegreen.workers.balance import DEFER, SLACK, AcceptBalance
from kitegreen.workers.board import Board
from kitegreen.workers.control import MAX_LINE, Channel
from kitegreen.workers.crashes import CrashPolicy
from kitegreen.workers.fleet import share
from kitegreen.workers.probe import config_from_json, config_to_json
from kitegreen.workers.process import WorkerProcess
from kitegreen.workers.stats import InstanceStats, requests_of

# Every test starts the launcher as a subprocess: slow.
pytestmark = [pytest.mark.timeout(60), pytest.mark.slow]

TARGET = "tests/workers_target.py:server"
LOOPBACK = ("--host", "127.0.0.1", "--port", "0", "--debug-port", "0", "--exit-wait-time", "2")
EXITED = ("worker stopped", "worker exited unasked; replacing it")


def _echo_reply(message: str) -> bytes:
    out = TCyMemoryBuffer()
    proto = TCyBinaryProtocol(out)
    proto.write_message_begin("echo", wire.REPLY, 1)
    proto.write_struct(testsvc_thrift.TestService.echo_result(success=message))
    proto.write_message_end()
    return bytes(out.getvalue())


ECHO = wire.encode("binary", "echo", message="workers")
ECHO_REPLY = _echo_reply("workers")


class Arbiter:
    """The launcher run with ``--workers``, and what its log and debug server say."""

    def __init__(self, launcher: Launcher) -> None:
        self.launcher = launcher
        self.proc = launcher.proc

    def named(self, event: str) -> list[dict[str, Any]]:
        """Every log record named ``event`` so far."""
        return self.launcher.named(event)

    def live_workers(self) -> set[int]:
        """Workers the arbiter has reported ready and not yet exited."""
        ready = {e["worker"] for e in self.named("worker ready")}
        gone = {e["worker"] for name in EXITED for e in self.named(name)}
        return ready - gone

    def wait_for_workers(self, count: int, timeout: float = 15.0) -> set[int]:
        """The live workers once there are ``count`` of them."""
        wait_until(
            lambda: len(self.live_workers()) == count or self.proc.poll() is not None,
            timeout=timeout,
            what=lambda: (
                f"{count} workers, have {self.live_workers()}\n{self.launcher.output()[-3000:]}"
            ),
        )
        assert self.proc.poll() is None, self.launcher.output()[-3000:]
        return self.live_workers()

    def wait_for_replacement(self, pid: int, count: int = 2, timeout: float = 15.0) -> set[int]:
        """The live workers once ``pid`` has exited and ``count`` workers are ready."""
        wait_until(
            lambda: pid not in self.live_workers() and len(self.live_workers()) == count,
            timeout=timeout,
            what=lambda: f"{pid} to be replaced\n{self.launcher.output()[-3000:]}",
        )
        return self.live_workers()

    def address(self) -> tuple[str, int]:
        return self.launcher.address()

    def debug(self, path: str) -> bytes:
        where = self.launcher.wait_for_event("debug server listening")["address"]
        with urllib.request.urlopen(f"http://{where}{path}", timeout=10) as response:
            body: bytes = response.read()
            return body

    def health(self) -> int:
        """The status of ``GET /health``."""
        where = self.launcher.wait_for_event("debug server listening")["address"]
        try:
            with urllib.request.urlopen(f"http://{where}/health", timeout=10) as response:
                return int(response.status)
        except urllib.error.HTTPError as exc:
            with exc:
                return exc.code

    def runtime(self) -> dict[str, Any]:
        doc: dict[str, Any] = json.loads(self.debug("/runtime/kite"))
        return doc

    def stop(self, signum: signal.Signals = signal.SIGTERM, timeout: float = 20.0) -> int:
        self.proc.send_signal(signum)
        return self.launcher.wait(timeout)


@contextlib.contextmanager
def arbiter(
    *args: str, workers: int = 2, env: dict[str, str] | None = None, target: str = TARGET
) -> Iterator[Arbiter]:
    """The launcher serving ``target`` with ``workers`` workers, once they are all ready.

    Whatever the test does, no process of the instance outlives it: leaving the launcher's
    context kills what is left of its process group.
    """
    with Launcher(target, *LOOPBACK, "--workers", str(workers), *args, env=env) as launcher:
        instance = Arbiter(launcher)
        instance.wait_for_workers(workers)
        yield instance


def module_env() -> dict[str, str]:
    """The environment for targets written to ``tmp_path`` by a test: the tests' modules
    importable, and no bytecode cache (a module rewritten within the second it was first
    imported could be read back from a stale one)."""
    return launcher_env(PYTHONPATH=str(TESTS), PYTHONDONTWRITEBYTECODE="1")


CRASH_AFTER_START = (
    "import os, gevent\n"
    "from workers_target import server\n"
    "# Imports fine (the probe passes), then exits 50 ms after its hub first runs.\n"
    "gevent.spawn_later(0.05, os._exit, 3)\n"
)
HEALTHY = "from workers_target import server\n"
TAGGED = (
    "from service import Handler, testsvc_thrift\n"
    "import kitegreen\n"
    "class Tagged(Handler):\n"
    "    def echo(self, message):\n"
    "        return TAG + message\n"
    "server = kitegreen.RpcServer(testsvc_thrift.TestService, Tagged(),\n"
    "    kitegreen.Config(service_name='workers-test', host='127.0.0.1', port=0))\n"
)
"""A target whose echo says which version of the code answered: ``TAG = ...`` goes first."""
HOLD_IMPORT = (
    "import os, time\n"
    "if os.path.exists(HOLD):\n"
    "    with open(WAITING, 'a') as f:\n"
    "        f.write(f'{os.getpid()}\\n')\n"
    "    deadline = time.monotonic() + 30.0\n"
    "    while os.path.exists(HOLD) and time.monotonic() < deadline:\n"
    "        time.sleep(0.01)\n"
)
"""Appended to a target: while the file HOLD exists, an import of it waits (for up to 30 s),
having written its pid to WAITING."""


def holding_target(tmp_path: Path) -> tuple[Path, Path, Path]:
    """A target (``HEALTHY``) whose import waits while the returned ``hold`` file exists; the
    ``waiting`` file gets the pid of each process waiting so."""
    module, hold, waiting = tmp_path / "app.py", tmp_path / "hold", tmp_path / "waiting"
    code = HEALTHY + HOLD_IMPORT
    module.write_text(code.replace("HOLD", repr(str(hold))).replace("WAITING", repr(str(waiting))))
    return module, hold, waiting


WORKER_TIMEOUT = 4
"""``--worker-timeout`` for the tests that block a worker's hub: the replacement's import (of a
quick target) must fit in it on a loaded machine, and it bounds how long those tests run."""
TIMED_OUT = (
    "worker timed out: its hub did not run for worker_timeout; its watchdog wrote its stacks "
    "and ended it"
)


def block_a_worker(address: tuple[str, int]) -> None:
    """Have one worker run code that never yields for 30 s (its caller waits for ever)."""
    with (
        contextlib.suppress(OSError),
        socket.create_connection(address, timeout=40.0) as sock,
    ):
        sock.sendall(wire.encode("binary", "block_hub", seconds=30.0))
        sock.recv(100)


def echo_call(address: tuple[str, int], reply: bytes = ECHO_REPLY) -> None:
    """One echo call on a fresh connection, raw: the exact ``reply`` bytes or an exception."""
    with socket.create_connection(address, timeout=5.0) as sock:
        sock.sendall(ECHO)
        assert _read_reply(sock) == reply


_FIXED_SIZES = {2: 1, 3: 1, 4: 8, 6: 2, 8: 4, 10: 8}
"""Bytes of Thrift's fixed-size types in the binary protocol: bool, byte, double, i16, i32,
i64."""


def _read_reply(sock: socket.socket) -> bytes:
    """One whole binary (unframed) reply, however long, delimited as Thrift delimits it: the
    message header, then the struct. Read by the echo reply's size instead, a reply of another
    size (an exception: a QPS refusal, say) would put the caller out of step with the server,
    one more request in flight at each, until a pipelining caller floods it.

    Raises:
        EOFError: the connection ended; its argument is how many bytes of the reply came.
    """
    got = bytearray()

    def take(size: int) -> bytes:
        start = len(got)
        while len(got) - start < size:
            chunk = sock.recv(size - (len(got) - start))
            if not chunk:
                raise EOFError(len(got))
            got.extend(chunk)
        return bytes(got[start:])

    def skip_struct() -> None:
        while (field_type := take(1)[0]) != 0:
            take(2)  # the field id
            if field_type in _FIXED_SIZES:
                take(_FIXED_SIZES[field_type])
            elif field_type == 11:  # string
                take(struct.unpack("!i", take(4))[0])
            elif field_type == 12:
                skip_struct()
            else:
                raise ValueError(f"type {field_type} in a reply: not one these tests expect")

    take(4)  # the version and the message type
    take(struct.unpack("!i", take(4))[0] + 4)  # the name, then the seqid
    skip_struct()
    return bytes(got)


def gone(pid: int) -> bool:
    """Whether ``pid`` has exited (a zombie waiting for its reaper counts as exited)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return True
    return bool(re.search(r"^State:\s+Z", status, re.MULTILINE))


def metric(text: str, name: str, **labels: str) -> float:
    """The value of one sample in a Prometheus exposition."""
    wanted = ",".join(f'{k}="{v}"' for k, v in labels.items())
    pattern = "^" + re.escape(name + (f"{{{wanted}}}" if labels else "")) + r" (\S+)$"
    found = re.search(pattern, text, re.MULTILINE)
    assert found, f"no {name} {labels} in the exposition"
    return float(found.group(1))


class Caller:
    """Calls echo in a loop until stopped, and sorts out every way a call can end.

    With ``keep_alive`` it reuses one connection and reconnects after a clean end-of-stream
    (the connection contract allows one before any byte of a reply, for a request that crossed
    the stop); without, each call has a connection of its own, whose one request must be
    answered. Each call has its own seqid. A refused connection, a reset, a reply cut short,
    or a reply other than the echo's to that call (an exception, another call's) is a
    failure; ``clean_ends`` counts the ends before any byte.
    """

    def __init__(self, address: tuple[str, int], *, keep_alive: bool) -> None:
        self.address = address
        self.keep_alive = keep_alive
        self.ok = 0
        self.clean_ends = 0
        self.failures: list[str] = []
        self._running = True
        self._seqids = itertools.count(1)
        self._greenlet = gevent.spawn(self._run)

    def stop(self) -> None:
        self._running = False
        self._greenlet.join(timeout=10.0)
        self._greenlet.kill()

    def _run(self) -> None:
        sock: socket.socket | None = None
        try:
            while self._running:
                try:
                    if sock is None:
                        sock = socket.create_connection(self.address, timeout=5.0)
                    seqid = next(self._seqids)
                    sock.sendall(_with_seqid(ECHO, seqid))
                    reply = _read_reply(sock)
                    if reply != _with_seqid(ECHO_REPLY, seqid):
                        self.failures.append(f"not the reply to call {seqid}: {reply[:120]!r}")
                        continue
                    self.ok += 1
                except EOFError as exc:
                    if exc.args[0]:
                        self.failures.append(f"reply cut short after {exc.args[0]} bytes")
                    else:
                        self.clean_ends += 1
                    sock = _close(sock)
                    continue
                except OSError as exc:
                    # When and on which connection, to find it in the server's log.
                    port = None
                    with contextlib.suppress(OSError):
                        port = sock.getsockname()[1] if sock is not None else None
                    when = datetime.datetime.now(datetime.timezone.utc).isoformat()
                    self.failures.append(f"{type(exc).__name__}: {exc} (port {port}, {when})")
                    sock = _close(sock)
                    continue
                if not self.keep_alive:
                    sock = _close(sock)
        finally:
            _close(sock)


def _with_seqid(message: bytes, seqid: int) -> bytes:
    """``ECHO`` or ``ECHO_REPLY`` numbered ``seqid``: in an unframed binary message for
    ``echo`` the seqid follows the version, the name's length and the name (bytes 12-16)."""
    return message[:12] + struct.pack("!i", seqid) + message[16:]


def _close(sock: socket.socket | None) -> None:
    if sock is not None:
        sock.close()


class TestServing:
    def test_workers_serve_and_connections_spread_evenly_over_them(self):
        """N workers, none of them the arbiter, serve one address; held connections spread
        evenly over them."""
        with arbiter(workers=2) as instance:
            workers = instance.live_workers()
            assert instance.proc.pid not in workers
            address = instance.address()
            held = []
            try:
                for _ in range(40):
                    sock = socket.create_connection(address, timeout=5.0)
                    held.append(sock)
                    sock.sendall(ECHO)
                    _read_reply(sock)
                rows = instance.runtime()["workers"]
            finally:
                for sock in held:
                    sock.close()
            open_per_worker = {row["pid"]: row["overload"]["conn_now"] for row in rows}
            assert set(open_per_worker) == workers
            assert sum(open_per_worker.values()) == 40
            # An even split is 20 each. Without the accept balance one worker could take most
            # of them (see the README's measurements). With it, no worker takes a connection
            # while it has more than SLACK over another, unless the other's heartbeat looks
            # stale, which a loaded machine can make happen: the bound is a loose one.
            assert min(open_per_worker.values()) >= 10, open_per_worker
            assert instance.stop() == 0

    def test_metrics_count_the_calls_made_across_workers(self):
        """/metrics sums every worker's counters; gauges are per worker, labelled by its
        number."""
        with arbiter(workers=2) as instance:
            for _ in range(30):
                echo_call(instance.address())
            text = instance.debug("/metrics").decode()
            assert metric(text, "kitegreen_requests_total", method="echo") == 30
            assert metric(text, "kitegreen_connections_total") == 30
            histogram = metric(text, "kitegreen_request_duration_seconds_count", method="echo")
            assert histogram == 30
            for number in ("0", "1"):
                assert metric(text, "kitegreen_worker_resident_memory_bytes", worker=number) > 0
            # The instance's: the arbiter's and the workers' added up.
            assert metric(text, "process_resident_memory_bytes") > max(
                metric(text, "kitegreen_worker_resident_memory_bytes", worker=number)
                for number in ("0", "1")
            )

            # A worker counts a connection closed once it has read the client's FIN, which
            # may come after the client's last reply was read: polled, not read once.
            def open_connections() -> list[float]:
                scraped = instance.debug("/metrics").decode()
                return [
                    metric(scraped, "kitegreen_connections_open", worker=number)
                    for number in ("0", "1")
                ]

            wait_until(
                lambda: open_connections() == [0, 0],
                5.0,
                interval=0.1,
                what=lambda: f"no connection open in either worker: {open_connections()}",
            )
            assert metric(text, "kitegreen_workers") == 2
            runtime = instance.runtime()
            assert runtime["totals"]["requests"] == 30
            assert sum(row["requests"] for row in runtime["workers"]) == 30
            assert instance.debug("/health") == b"ok\n"
            assert instance.stop() == 0

    def test_health_answers_within_1s_while_40_slow_clients_trickle(self):
        """The arbiter's debug server under 40 clients trickling requests a byte a second:
        its pages are refused while they hold the slots, its /health answers 200 within 1 s
        every time (a kubelet restarting a healthy instance would be an outage)."""
        with arbiter(workers=2) as instance:
            host, _, port = instance.launcher.wait_for_event("debug server listening")[
                "address"
            ].rpartition(":")
            where = (host, int(port))
            with Tricklers(where, count=40, interval=1.0) as slow:
                assert wait_until(lambda: slow.connects >= 40, timeout=5.0)

                def refused() -> bool:
                    try:
                        instance.debug("/runtime/kite")
                    except OSError:
                        return True
                    return False

                assert wait_until(refused, timeout=5.0)
                probes = []
                for _ in range(10):
                    probes.append(probe_health(where, timeout=1.0))
                    gevent.sleep(0.2)
                assert [status for status, _ in probes] == [200] * 10, probes
            assert instance.stop() == 0

    def test_counters_never_go_backwards_across_a_reload_and_a_kill(self):
        """Calls counted stay counted when a reload stops every worker (their final figures)
        and when a worker is killed (its last answer to a scrape)."""
        with arbiter(workers=2) as instance:

            def requests() -> float:
                text = instance.debug("/metrics").decode()
                return metric(text, "kitegreen_requests_total", method="echo")

            for _ in range(20):
                echo_call(instance.address())
            assert requests() == 20
            old = instance.live_workers()
            instance.proc.send_signal(signal.SIGHUP)
            instance.launcher.wait_for_event("reload complete", timeout=30.0)
            assert instance.wait_for_workers(2).isdisjoint(old)
            wait_until(lambda: all(gone(pid) for pid in old))
            assert requests() == 20
            for _ in range(10):
                echo_call(instance.address())
            assert requests() == 30
            victim = min(instance.live_workers())
            os.kill(victim, signal.SIGKILL)
            instance.wait_for_replacement(victim)
            assert requests() == 30
            assert instance.stop() == 0

    def test_workers_set_in_the_code_make_an_arbiter(self, tmp_path):
        """A target whose Config asks for workers gets them: the launcher restarts itself as
        their arbiter, in the same process."""
        module = tmp_path / "two_workers.py"
        module.write_text(
            "import sys\n"
            f"sys.path.insert(0, {str(TESTS)!r})\n"
            "import kitegreen\n"
            "from conftest import Handler, testsvc_thrift\n"
            "server = kitegreen.RpcServer(testsvc_thrift.TestService, Handler(),\n"
            "    kitegreen.Config(workers=2, host='127.0.0.1', port=0, debug_port=0))\n"
        )
        with Launcher(f"{module}:server") as launcher:
            instance = Arbiter(launcher)
            instance.wait_for_workers(2)
            assert instance.named("listening")[0]["pid"] == launcher.proc.pid
            echo_call(instance.address())
            assert instance.stop() == 0

    @pytest.mark.parametrize(
        ("target", "expected"), [("nope:nothing", 2), (TARGET, 3)], ids=["target", "listen"]
    )
    def test_start_up_errors_keep_their_exit_status(self, target, expected):
        """A target that does not load exits 2, an address in use 3, as in one process."""
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen(1)
            port = str(taken.getsockname()[1])
            args = ("--host", "127.0.0.1", "--port", port, "--workers", "2")
            with Launcher(target, *args) as launcher:
                assert launcher.wait(15.0) == expected, launcher.output()
        assert "worker spawned" not in launcher.output()


class TestReload:
    def test_sighup_under_load_refuses_and_resets_nothing(self):
        """SIGHUP replaces every worker, one at a time, while clients call in a loop: no
        refused connection, no reset, no reply cut short."""
        with arbiter(workers=2) as instance:
            old = instance.live_workers()
            address = instance.address()
            callers = [Caller(address, keep_alive=k) for k in (False, False, True, True)]
            try:
                wait_until(lambda: all(c.ok for c in callers), timeout=10.0)
                before = sum(c.ok for c in callers)
                instance.proc.send_signal(signal.SIGHUP)
                instance.launcher.wait_for_event("reload complete", timeout=30.0)
                new = instance.wait_for_workers(2)
                during = sum(c.ok for c in callers) - before
                wait_until(lambda: sum(c.ok for c in callers) > before + during + 20)
            finally:
                for caller in callers:
                    caller.stop()
            assert [f for c in callers for f in c.failures] == []
            # A connection's first request is always answered, even as its worker stops.
            assert [c.clean_ends for c in callers if not c.keep_alive] == [0, 0]
            assert during > 0
            assert new.isdisjoint(old)
            wait_until(lambda: all(gone(pid) for pid in old))
            assert instance.stop() == 0

    def test_a_reload_runs_the_code_as_it_is_now_on_disk(self, tmp_path):
        """Each SIGHUP's workers import the target afresh: edits between reloads are served."""
        module = tmp_path / "app.py"
        module.write_text("TAG = 'one:'\n" + TAGGED)
        with arbiter(target=f"{module}:server", env=module_env()) as instance:
            address = instance.address()
            echo_call(address, _echo_reply("one:workers"))
            for generation, tag in ((1, "two:"), (2, "three:")):
                old = instance.live_workers()
                module.write_text(f"TAG = {tag!r}\n" + TAGGED)
                instance.proc.send_signal(signal.SIGHUP)
                wait_until(
                    lambda generation=generation: any(
                        e["generation"] == generation for e in instance.named("reload complete")
                    ),
                    timeout=30.0,
                    what=lambda generation=generation: (
                        f"reload {generation} to complete\n{instance.launcher.output()[-3000:]}"
                    ),
                )
                wait_until(lambda old=old: all(gone(pid) for pid in old))
                for _ in range(4):
                    echo_call(address, _echo_reply(tag + "workers"))
            assert instance.stop() == 0

    def test_a_reload_never_has_fewer_than_n_workers_ready(self):
        """A reload starts a new worker and waits for it to be ready before it stops an old
        one: the workers ready never drop below the number wanted (replayed from the
        arbiter's log, which records each change as it makes it)."""
        with arbiter(workers=3) as instance:
            ready = set(instance.live_workers())
            since = len(instance.launcher.events())
            instance.proc.send_signal(signal.SIGHUP)
            instance.launcher.wait_for_event("reload complete", timeout=60.0)
            assert instance.wait_for_workers(3).isdisjoint(ready)
            fewest = len(ready)
            stopped = 0
            for record in instance.launcher.events()[since:]:
                if record["pid"] != instance.proc.pid:
                    continue
                event = record["event"]
                if event == "worker ready":
                    ready.add(record["worker"])
                elif event in ("stopping an old worker: reload", *EXITED):
                    stopped += event == "stopping an old worker: reload"
                    ready.discard(record["worker"])
                fewest = min(fewest, len(ready))
            assert stopped == 3
            assert fewest == 3
            assert instance.stop() == 0

    def test_sighup_with_a_broken_application_keeps_the_workers(self, tmp_path):
        """A reload whose code no longer imports is refused; the old workers keep serving."""
        module = tmp_path / "app.py"
        module.write_text(HEALTHY)
        args = (*LOOPBACK, "--workers", "2")
        with Launcher(f"{module}:server", *args, env=module_env()) as launcher:
            instance = Arbiter(launcher)
            workers = instance.wait_for_workers(2)
            module.write_text("raise RuntimeError('broken deploy')\n")
            instance.proc.send_signal(signal.SIGHUP)
            record = launcher.wait_for_event("reload refused; the workers keep serving")
            assert "could not load" in record["reason"]
            assert "broken deploy" in launcher.output()
            echo_call(instance.address())
            assert instance.live_workers() == workers
            assert instance.stop() == 0

    def test_the_arbiter_supervises_while_a_reload_loads_the_application(self, tmp_path):
        """While a reload's probe is still importing the application, a killed worker is
        replaced and SIGTERM stops the instance at once (the probe is killed)."""
        module, hold, waiting = holding_target(tmp_path)
        with arbiter(target=f"{module}:server", env=module_env()) as instance:
            victim = min(instance.live_workers())
            hold.touch()
            instance.proc.send_signal(signal.SIGHUP)
            wait_until(lambda: waiting.exists() and waiting.read_text(), timeout=15.0)
            os.kill(victim, signal.SIGKILL)
            record = instance.launcher.wait_for_event("worker exited unasked; replacing it")
            assert record["worker"] == victim
            wait_until(lambda: len(instance.named("worker spawned")) == 3)
            instance.proc.send_signal(signal.SIGTERM)
            record = instance.launcher.wait_for_event("stopping")
            assert record["pid"] == instance.proc.pid
            # Lets the replacement finish its import and stop.
            hold.unlink()
            assert instance.launcher.wait(20.0) == 0, instance.launcher.output()[-3000:]
        assert instance.named("rolling reload") == []

    def test_a_reload_whose_new_workers_keep_crashing_is_aborted(self, tmp_path):
        """New code that imports but exits right after it starts: after 5 crashes of the new
        generation the reload is aborted, its workers stopped, the previous generation and its
        settings restored, and the instance keeps serving."""
        module = tmp_path / "app.py"
        module.write_text(HEALTHY)
        with arbiter(target=f"{module}:server", env=module_env()) as instance:
            module.write_text(CRASH_AFTER_START)
            instance.proc.send_signal(signal.SIGHUP)
            record = instance.launcher.wait_for_event(
                "reload aborted: the new workers keep exiting at start-up; the previous "
                "generation keeps serving with its settings",
                timeout=40.0,
            )
            # A worker the aborted reload replaced is replaced again, from the code on disk.
            module.write_text(HEALTHY)
            assert (record["generation"], record["restored_generation"]) == (1, 0)
            assert record["last_exit"] == "exit 3"
            crashed = {
                e["worker"]
                for e in instance.named("worker exited unasked; replacing it")
                if e["generation"] == 1
            }
            assert len(crashed) == 5
            instance.wait_for_workers(2, timeout=30.0)
            assert instance.runtime()["arbiter"]["generation"] == 0
            assert instance.named("workers keep exiting at start-up; stopping the instance") == []
            echo_call(instance.address())
            assert instance.stop() == 0


class TestSupervision:
    def test_a_killed_worker_is_replaced_within_5_seconds(self):
        """A worker killed with SIGKILL is replaced by a new one within 5 s."""
        with arbiter(workers=2) as instance:
            victim, survivor = sorted(instance.live_workers())
            os.kill(victim, signal.SIGKILL)
            killed_at = time.monotonic()
            wait_until(
                lambda: (
                    len(instance.live_workers() - {survivor}) == 1
                    and victim not in instance.live_workers()
                ),
                timeout=5.0,
                what=lambda: f"{victim} to be replaced\n{instance.launcher.output()[-2000:]}",
            )
            assert time.monotonic() - killed_at < 5.0
            (record,) = instance.named("worker exited unasked; replacing it")
            assert (record["worker"], record["exit"]) == (victim, "killed by SIGKILL")
            echo_call(instance.address())
            assert instance.stop() == 0

    def test_a_replacement_runs_with_the_settings_the_probe_validated(self, tmp_path):
        """A replacement does not read the config file again: a file broken since the start
        (or merely changed, which only SIGHUP is to apply) does not stop it."""
        config = tmp_path / "kite.yaml"
        config.write_text("limit_qps: 100\n")
        with arbiter("--config", str(config), workers=2) as instance:
            config.write_text("limit_qps: -5\n")
            victim = min(instance.live_workers())
            os.kill(victim, signal.SIGKILL)
            instance.wait_for_replacement(victim)
            assert instance.named("cannot launch") == []
            limits = [row["overload"]["qps_limit"] for row in instance.runtime()["workers"]]
            assert limits == [50, 50]
            assert instance.stop() == 0

    def test_a_blocked_worker_is_replaced_with_its_stack_logged(self):
        """A worker whose hub stays blocked for worker_timeout is ended by its watchdog, its
        stack logged by the arbiter, and replaced."""
        with arbiter("--worker-timeout", str(WORKER_TIMEOUT), workers=2) as instance:
            workers = instance.live_workers()
            caller = gevent.spawn(block_a_worker, instance.address())
            try:
                record = instance.launcher.wait_for_event(TIMED_OUT, timeout=20.0)
                assert record["worker"] in workers
                assert record["seconds"] >= WORKER_TIMEOUT
                assert "in block_hub" in record["stack"]
                assert "tests/service.py" in record["stack"]
                instance.wait_for_replacement(record["worker"])
                assert gone(record["worker"])
            finally:
                caller.kill()
            (exited,) = instance.named("worker exited unasked; replacing it")
            assert (exited["worker"], exited["exit"], exited["timed_out"]) == (
                record["worker"],
                "exit 1",
                True,
            )
            assert instance.stop() == 0

    def test_a_worker_that_cannot_run_is_killed_and_replaced(self):
        """A worker that cannot end itself (stopped, here) is killed by the arbiter once its
        heartbeat is stale past worker_timeout, and replaced."""
        with arbiter("--worker-timeout", str(WORKER_TIMEOUT), workers=2) as instance:
            victim = min(instance.live_workers())
            os.kill(victim, signal.SIGSTOP)
            record = instance.launcher.wait_for_event(
                "worker timed out and did not end itself (stopped, or stuck in the kernel); "
                "killing it",
                timeout=20.0,
            )
            assert record["worker"] == victim
            assert record["seconds"] > WORKER_TIMEOUT
            instance.wait_for_replacement(victim)
            assert instance.named(TIMED_OUT) == []
            assert instance.stop() == 0

    def test_health_is_503_while_a_worker_is_down(self, tmp_path):
        """/health is 503 from a worker's death until its replacement is ready."""
        module, hold, waiting = holding_target(tmp_path)
        with arbiter(target=f"{module}:server", env=module_env()) as instance:
            assert instance.health() == 200
            hold.touch()
            victim = min(instance.live_workers())
            os.kill(victim, signal.SIGKILL)
            # The replacement waits in its import until the test lets it go on.
            wait_until(lambda: waiting.exists() and waiting.read_text(), timeout=15.0)
            assert instance.health() == 503
            assert instance.runtime()["arbiter"]["workers_ready"] == 1
            hold.unlink()
            instance.wait_for_replacement(victim)
            assert instance.health() == 200
            assert instance.stop() == 0

    def test_without_descriptors_spawns_wait_and_reloads_are_refused(self):
        """An arbiter that runs out of descriptors neither dies nor stops its workers: a reload
        is refused, a spawn waits and is tried again, and succeeds once descriptors are free."""
        with arbiter(workers=2) as instance:
            pid = instance.proc.pid
            soft, hard = resource.prlimit(pid, resource.RLIMIT_NOFILE)
            open_fds = {int(fd) for fd in os.listdir(f"/proc/{pid}/fd")}
            # A new descriptor takes the lowest free number: with the limit there, none fits.
            lowest_free = next(fd for fd in itertools.count() if fd not in open_fds)
            resource.prlimit(pid, resource.RLIMIT_NOFILE, (lowest_free, hard))
            try:
                instance.proc.send_signal(signal.SIGHUP)
                record = instance.launcher.wait_for_event("cannot start the probe")
                assert "Too many open files" in record["error"]
                instance.launcher.wait_for_event("reload refused; the workers keep serving")
                instance.proc.send_signal(signal.SIGTTIN)
                record = instance.launcher.wait_for_event(
                    "cannot start a worker; trying again later"
                )
                assert "Too many open files" in record["error"]
                assert instance.proc.poll() is None
            finally:
                resource.prlimit(pid, resource.RLIMIT_NOFILE, (soft, hard))
            instance.wait_for_workers(3)
            echo_call(instance.address())
            assert instance.stop() == 0

    def test_ttin_and_ttou_add_and_remove_a_worker_and_share_the_limits(self):
        """TTIN adds a worker and TTOU takes the highest-numbered away (the one TTIN added:
        worker numbers stay 0 to N-1); each share of the connection limit follows."""
        with arbiter(workers=2) as instance:
            first = instance.live_workers()
            instance.proc.send_signal(signal.SIGTTIN)
            three = instance.wait_for_workers(3)
            assert {w["worker"] for w in instance.runtime()["workers"]} == {0, 1, 2}
            runtime = instance.runtime()
            share = math.ceil(DEFAULT_LIMIT_CONNECTIONS / 3)
            assert runtime["overload"]["worker_share"]["limit_connections"] == share
            assert runtime["overload"]["conn_limit"] == DEFAULT_LIMIT_CONNECTIONS
            wait_until(
                lambda: all(
                    w["overload"]["conn_limit"] == share for w in instance.runtime()["workers"]
                )
            )
            instance.proc.send_signal(signal.SIGTTOU)
            two = instance.wait_for_workers(2)
            assert two == first
            assert len(three - two) == 1
            assert instance.runtime()["arbiter"]["workers_wanted"] == 2
            assert instance.stop() == 0

    def test_limit_shares_follow_the_workers_serving(self):
        """Shares divide the limit by the workers serving: during a reload the old workers
        share with the new one; after TTOU the others' shares grow only once the worker taken
        away has exited."""
        with arbiter("--limit-connections", "12", workers=2) as instance:
            old = instance.live_workers()

            def shares(pid: int) -> list[int]:
                """The connection limits ``pid`` enforced: at its start, then each change."""
                started = [
                    e["limits"]["conn"] for e in instance.named("listening") if e["pid"] == pid
                ]
                changed = [
                    e["conn"] for e in instance.named("limit share changed") if e["pid"] == pid
                ]
                return started + changed

            instance.proc.send_signal(signal.SIGHUP)
            instance.launcher.wait_for_event("reload complete", timeout=30.0)
            new = instance.wait_for_workers(2)
            wait_until(lambda: all(gone(pid) for pid in old))
            # Three served at once, each on a third of the limit.
            assert all(4 in shares(pid) for pid in old), {pid: shares(pid) for pid in old}
            wait_until(lambda: all(shares(pid)[-1:] == [6] for pid in new))
            instance.proc.send_signal(signal.SIGTTIN)
            three = instance.wait_for_workers(3)
            wait_until(lambda: all(shares(pid)[-1:] == [4] for pid in three))
            ttou = len(instance.launcher.events())
            instance.proc.send_signal(signal.SIGTTOU)
            two = instance.wait_for_workers(2)
            wait_until(lambda: all(shares(pid)[-1:] == [6] for pid in two))
            records = list(enumerate(instance.launcher.events()))[ttou:]
            (taken,) = three - two
            # Its last line, written before it exits, hence before the others hear of its exit.
            exited = next(i for i, e in records if e["event"] == "stopped" and e["pid"] == taken)
            for pid in two:
                grew = next(
                    i
                    for i, e in records
                    if e["event"] == "limit share changed" and e["pid"] == pid and e["conn"] == 6
                )
                assert grew > exited
            assert instance.stop() == 0

    def test_sigusr1_makes_every_process_log_its_stacks(self):
        """SIGUSR1 to the arbiter: the arbiter and every worker log their stacks."""
        with arbiter(workers=2) as instance:
            workers = instance.live_workers()
            instance.proc.send_signal(signal.SIGUSR1)
            expected = {instance.proc.pid, *workers}
            wait_until(
                lambda: {e["pid"] for e in instance.named("greenlet and thread stacks")} == expected
            )
            assert instance.stop() == 0

    def test_workers_that_crash_at_start_up_stop_the_instance(self, tmp_path):
        """Workers that keep exiting right after start stop the arbiter with exit 4."""
        module = tmp_path / "crashing.py"
        module.write_text(CRASH_AFTER_START)
        args = (*LOOPBACK, "--workers", "2")
        with Launcher(f"{module}:server", *args, env=module_env()) as launcher:
            assert launcher.wait(30.0) == 4, launcher.output()[-3000:]
        record = launcher.find_event("workers keep exiting at start-up; stopping the instance")
        assert record is not None
        assert record["last_exit"] == "exit 3"

    def test_one_worker_crash_looping_beside_a_healthy_one_stops_the_instance(self, tmp_path):
        """A worker that keeps crashing is caught though another serves all along: the waits
        before its replacements grow, and after 5 crashes the instance stops with exit 4."""
        module = tmp_path / "one_slot_crashes.py"
        lock = tmp_path / "healthy.lock"
        module.write_text(
            "import fcntl, os, gevent\n"
            "from workers_target import server\n"
            f"held = open({str(lock)!r}, 'w')\n"
            "try:\n"
            "    # The first worker to take the lock keeps it and serves; the others crash.\n"
            "    fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)\n"
            "except BlockingIOError:\n"
            "    gevent.spawn_later(0.05, os._exit, 3)\n"
        )
        args = (*LOOPBACK, "--workers", "2")
        with Launcher(f"{module}:server", *args, env=module_env()) as launcher:
            assert launcher.wait(40.0) == 4, launcher.output()[-3000:]
        crashes = launcher.named("worker exited unasked; replacing it")
        assert len(crashes) == 5, launcher.output()[-3000:]
        assert all(c["start_up_crash"] for c in crashes)
        waits = [c["restart_in"] for c in crashes]
        assert all(later > earlier for earlier, later in itertools.pairwise(waits)), waits
        ready = {e["worker"] for e in launcher.named("worker ready")}
        healthy = ready - {c["worker"] for c in crashes}
        assert len(healthy) == 1, launcher.output()[-3000:]
        stopped = {e["worker"]: e["exit"] for e in launcher.named("worker stopped")}
        assert stopped == {healthy.pop(): "exit 0"}


class TestStop:
    def test_sigterm_drains_every_worker_and_leaves_no_process(self):
        """SIGTERM: calls in flight on every worker get their replies, then every process
        exits and the arbiter exits 0."""
        with arbiter(workers=2) as instance:
            workers = instance.live_workers()
            address = instance.address()

            def slow() -> bytes:
                with socket.create_connection(address, timeout=10.0) as sock:
                    sock.sendall(wire.encode("binary", "slow", seconds=1.5, message="done"))
                    return sock.recv(100)

            calls = []
            try:
                # Until a slow call is in flight on each worker.
                while {e["pid"] for e in instance.named("slow call started")} != workers:
                    calls.append(gevent.spawn(slow))
                    assert len(calls) < 20, instance.launcher.output()[-2000:]
                    wait_until(
                        lambda: len(instance.named("slow call started")) >= len(calls),
                        timeout=5.0,
                    )
                assert instance.stop() == 0, instance.launcher.output()[-3000:]
                replies = [call.get(timeout=5.0) for call in calls]
            finally:
                gevent.killall(calls)
            assert all(b"done" in reply for reply in replies)
            assert all(gone(pid) for pid in workers)
            stopped = {e["pid"] for e in instance.named("stopped")}
            assert stopped == {instance.proc.pid, *workers}

    def test_sigterm_exits_1_when_a_call_is_cut_off(self):
        """A call still running when exit_wait_time (2 s here) passes is cut off: its worker
        exits 1, and so does the instance."""
        with arbiter(workers=2) as instance:
            address = instance.address()

            def slow() -> bytes:
                with socket.create_connection(address, timeout=20.0) as sock:
                    sock.sendall(wire.encode("binary", "slow", seconds=15.0, message="late"))
                    return sock.recv(100)

            call = gevent.spawn(slow)
            try:
                instance.launcher.wait_for_event("slow call started")
                assert instance.stop() == 1, instance.launcher.output()[-3000:]
                assert call.get(timeout=5.0) == b""
            finally:
                call.kill()
            cut = [e for e in instance.named("worker stopped") if e["exit"] == "exit 1"]
            assert len(cut) == 1
            (stopped,) = [e for e in instance.named("stopped") if e["pid"] == instance.proc.pid]
            assert (stopped["clean"], stopped["status"]) == (False, 1)

    def test_health_is_503_while_the_instance_stops(self):
        """From the moment the arbiter begins to stop (its drain time included), /health says
        503, though the workers still serve."""
        with arbiter("--drain-time", "5", workers=2) as instance:
            assert instance.health() == 200
            instance.proc.send_signal(signal.SIGTERM)
            wait_until(
                lambda: [e for e in instance.named("stopping") if e["pid"] == instance.proc.pid]
            )
            assert instance.health() == 503
            echo_call(instance.address())
            assert instance.launcher.wait(20.0) == 0

    def test_workers_ignore_a_sigint_sent_to_the_whole_group(self):
        """Ctrl-C signals every process of the group: the workers leave the stop to the
        arbiter, which keeps serving through its drain time, then stops them; nothing is
        counted as a crash or replaced."""
        with arbiter("--drain-time", "5", workers=2) as instance:
            workers = instance.live_workers()
            arbiter_pid = instance.proc.pid
            instance.launcher.signal_group(signal.SIGINT)
            wait_until(lambda: [e for e in instance.named("stopping") if e["pid"] == arbiter_pid])
            # Draining: the workers still accept and serve.
            for _ in range(3):
                echo_call(instance.address())
            assert instance.launcher.wait(20.0) == 0, instance.launcher.output()[-3000:]
        assert instance.named("worker exited unasked; replacing it") == []
        assert len(instance.named("worker spawned")) == 2
        by_signal = [e for e in instance.named("signal received, stopping") if e["pid"] in workers]
        assert by_signal == []
        stopped = {e["worker"]: e["exit"] for e in instance.named("worker stopped")}
        assert stopped == dict.fromkeys(workers, "exit 0")

    def test_connections_arriving_once_the_workers_stop_get_a_clean_end(self):
        """Once every worker was told to stop, a new connection is taken from the backlog by
        the arbiter and ended with a FIN after its request is read: no reset, no refusal."""
        with arbiter("--drain-time", "0", "--exit-wait-time", "10", workers=2) as instance:
            workers = instance.live_workers()
            address = instance.address()

            def slow() -> bytes:
                with socket.create_connection(address, timeout=20.0) as sock:
                    sock.sendall(wire.encode("binary", "slow", seconds=4.0, message="done"))
                    return sock.recv(100)

            call = gevent.spawn(slow)
            instance.launcher.wait_for_event("slow call started")
            instance.proc.send_signal(signal.SIGTERM)
            # A worker logs "stopping" and stops accepting with no greenlet switch between.
            wait_until(
                lambda: {e["pid"] for e in instance.named("stopping")} >= workers, timeout=10.0
            )
            for _ in range(5):
                with socket.create_connection(address, timeout=5.0) as sock:
                    sock.sendall(ECHO)
                    with pytest.raises(EOFError) as ended:
                        _read_reply(sock)
                    assert ended.value.args[0] == 0
            assert instance.launcher.wait(20.0) == 0
            assert b"done" in call.get(timeout=10.0)

    def test_no_worker_outlives_a_killed_arbiter(self):
        """An arbiter killed with SIGKILL takes its workers with it."""
        with arbiter(workers=2) as instance:
            workers = instance.live_workers()
            instance.proc.kill()
            instance.launcher.wait(5.0)
            wait_until(lambda: all(gone(pid) for pid in workers), timeout=10.0)

    def test_a_blocked_worker_does_not_outlive_a_killed_arbiter(self):
        """A worker stuck in code that never yields cannot act on its arbiter's death (the
        kernel's SIGTERM, the channel's end-of-stream and the parent check all need its hub):
        its watchdog ends it within worker_timeout, long before the code would return."""
        with arbiter("--worker-timeout", str(WORKER_TIMEOUT), workers=2) as instance:
            workers = instance.live_workers()
            caller = gevent.spawn(block_a_worker, instance.address())
            try:
                # Until one worker's heartbeat has stopped: its hub is blocked.
                wait_until(
                    lambda: any(
                        row["heartbeat_age"] > 1.0 for row in instance.runtime()["workers"]
                    ),
                    timeout=15.0,
                    interval=0.2,
                )
                instance.proc.kill()
                instance.launcher.wait(5.0)
                wait_until(lambda: all(gone(pid) for pid in workers), timeout=WORKER_TIMEOUT + 10.0)
            finally:
                caller.kill()


class TestOneInstance:
    @pytest.fixture
    def agent(self) -> Iterator[ConsulDouble]:
        with ConsulDouble() as double:
            yield double

    def test_consul_sees_one_instance_deregistered_first(self, agent):
        """The instance registers once whatever N, and deregisters before any worker stops."""
        env = launcher_env(CONSUL_HTTP_ADDR=agent.address)
        with arbiter(
            "--register", "--register-delay", "0", "--drain-time", "0", workers=3, env=env
        ) as instance:
            service = agent.wait_for_registration("workers-test", timeout=10.0)
            assert service["Port"] == instance.address()[1]
            assert len(agent.services) == 1
            assert instance.stop() == 0
        assert agent.services == {}
        records = instance.launcher.events()
        deregistered = next(i for i, e in enumerate(records) if e["event"] == "deregistered")
        first_worker_stop = next(
            i for i, e in enumerate(records) if e["event"] == "asked to stop by the arbiter"
        )
        assert deregistered < first_worker_stop

    def test_the_arbiter_supervises_while_it_deregisters(self, agent):
        """A deregistration that takes its time does not hold the arbiter's loop: a worker that
        dies meanwhile is seen to at once, and the drain starts once Consul has answered."""
        env = launcher_env(CONSUL_HTTP_ADDR=agent.address)
        with arbiter(
            "--register", "--register-delay", "0", "--drain-time", "0", workers=2, env=env
        ) as instance:
            agent.wait_for_registration("workers-test", timeout=10.0)
            agent.slow_seconds = 2.0
            agent.mode = "slow"
            victim = min(instance.live_workers())
            instance.proc.send_signal(signal.SIGTERM)
            wait_until(
                lambda: [e for e in instance.named("stopping") if e["pid"] == instance.proc.pid]
            )
            os.kill(victim, signal.SIGKILL)
            # Unclean: a worker was killed.
            assert instance.launcher.wait(20.0) == 1, instance.launcher.output()[-3000:]
        records = instance.launcher.events()
        killed = next(
            i
            for i, e in enumerate(records)
            if e["event"] == "worker stopped" and e["worker"] == victim
        )
        deregistered = next(i for i, e in enumerate(records) if e["event"] == "deregistered")
        assert killed < deregistered
        assert instance.named("worker spawned")[2:] == []

    def test_a_registry_given_in_code_is_refused_rather_than_dropped(self, tmp_path):
        """RpcServer(registry=...) cannot be honoured by workers (the arbiter registers, and
        never imports the code): the launch fails with exit 2 and says why."""
        module = tmp_path / "own_registry.py"
        module.write_text(
            "import kitegreen\n"
            "from service import Handler, testsvc_thrift\n"
            "class Registry:\n"
            "    def register(self, reg): pass\n"
            "    def deregister(self, reg): pass\n"
            "server = kitegreen.RpcServer(testsvc_thrift.TestService, Handler(),\n"
            "    kitegreen.Config(host='127.0.0.1', port=0), registry=Registry())\n"
        )
        args = (*LOOPBACK, "--workers", "2", "--register")
        with Launcher(f"{module}:server", *args, env=module_env()) as launcher:
            assert launcher.wait(15.0) == 2, launcher.output()[-3000:]
        (record,) = launcher.named("cannot launch")
        assert "RpcServer(registry=...) cannot be used with --workers" in record["error"]
        assert launcher.named("worker spawned") == []

    def test_a_reporter_given_in_code_is_said_to_reach_the_workers_only(self, tmp_path):
        """RpcServer(reporter=...) reaches each worker's reports; the arbiter says that its own
        go to its log only."""
        module = tmp_path / "own_reporter.py"
        module.write_text(
            "import kitegreen\n"
            "from service import Handler, testsvc_thrift\n"
            "class Reporter:\n"
            "    def report(self, kind, message, suppressed): pass\n"
            "server = kitegreen.RpcServer(testsvc_thrift.TestService, Handler(),\n"
            "    kitegreen.Config(host='127.0.0.1', port=0), reporter=Reporter())\n"
        )
        with arbiter(target=f"{module}:server", env=module_env()) as instance:
            record = instance.launcher.wait_for_event(
                "RpcServer(reporter=...) with workers: each worker reports to it; the reports "
                "of the instance's Consul registration and remote configuration go to the "
                "arbiter's log and /runtime/kite only"
            )
            assert record["level"] == "warning"
            assert instance.stop() == 0

    def test_remote_config_reaches_every_worker_within_2_seconds(self, agent):
        """A limit put in Consul is watched once and reaches every worker, as its share."""
        env = launcher_env(CONSUL_HTTP_ADDR=agent.address)
        with arbiter("--remote-config", workers=2, env=env) as instance:
            workers = instance.live_workers()
            agent.wait_for_blocked(count=1, timeout=10.0)

            def applied() -> set[int]:
                return {
                    e["pid"]
                    for e in instance.named("limit share changed")
                    if e["source"] == "consul" and e["qps"] == 4
                }

            agent.kv_put("kite/limit/qps/workers-test", "7")
            # Watched in the log each worker writes as it applies it: a scrape of
            # /runtime/kite would ask every worker each time, and load the instance it times.
            wait_until(
                lambda: applied() >= workers,
                timeout=2.0,
                what=lambda: f"every worker to apply the limit (applied: {applied()})",
            )
            runtime = instance.runtime()
            assert [w["overload"]["qps_limit"] for w in runtime["workers"]] == [4, 4]
            assert runtime["overload"]["qps_limit"] == 7
            assert instance.stop() == 0


class TestAcceptBalance:
    """The accept gate, in this process, against a board of its own."""

    @staticmethod
    def board_with(*workers: tuple[int, bool]) -> tuple[Board, list[Any]]:
        board = Board(size=8)
        slots = []
        for index, (open_, accepting) in enumerate(workers):
            slot = board.slot(index)
            slot.set_open(open_)
            slot.set_accepting(accepting)
            slots.append(slot)
        return board, slots

    def test_accepts_while_within_slack_of_the_least_loaded(self):
        """A worker with at most SLACK more connections than another accepts at once."""
        board, slots = self.board_with((0, True), (5, True))
        gate = AcceptBalance(board, slots[0], lambda: SLACK, stale_after=5.0)
        assert gate() == 0

    def test_defers_once_then_takes_one(self):
        """Over its share a worker defers, and takes one connection before it looks again."""
        board, slots = self.board_with((0, True), (1, True))
        gate = AcceptBalance(board, slots[0], lambda: 1 + SLACK + 1, stale_after=5.0)
        assert gate() == DEFER
        assert gate() == 0
        assert gate() == DEFER

    def test_ignores_workers_not_accepting(self):
        """A worker that does not accept (it is stopping), however few connections it has,
        does not hold the others back."""
        board, slots = self.board_with((100, True), (0, False))
        gate = AcceptBalance(board, slots[0], lambda: 100, stale_after=5.0)
        assert gate.fewest_elsewhere() is None
        assert gate() == 0

    def test_ignores_workers_whose_heartbeat_is_stale(self):
        """An accepting worker whose heartbeat is older than stale_after (its hub is blocked)
        does not hold the others back; while it is fresh, it does."""
        board, slots = self.board_with((100, True), (0, True))
        stamped = time.monotonic()
        clock = [stamped + 10.0]
        gate = AcceptBalance(board, slots[0], lambda: 100, stale_after=5.0, clock=lambda: clock[0])
        assert gate.fewest_elsewhere() is None
        assert gate() == 0
        clock[0] = stamped + 1.0
        assert gate.fewest_elsewhere() == 0
        assert gate() == DEFER

    def test_publishes_its_own_count(self):
        """Each look at the gate publishes this worker's open connections for the others."""
        board, slots = self.board_with((0, True), (0, True))
        AcceptBalance(board, slots[0], lambda: 7, stale_after=5.0)()
        other = AcceptBalance(board, slots[1], lambda: 0, stale_after=5.0)
        assert other.fewest_elsewhere() == 7


@dataclasses.dataclass
class Started:
    """A worker as the crash policy sees it."""

    spawned_at: float
    ready_at: float | None = None


class TestCrashPolicy:
    """When a worker's exit counts as a start-up crash, and what clears the count; a clock of
    the test's own."""

    @pytest.fixture
    def clock(self) -> list[float]:
        return [100.0]

    @pytest.fixture
    def policy(self, clock: list[float]) -> CrashPolicy:
        return CrashPolicy(limit=5, window=10.0, clock=lambda: clock[0])

    def test_an_exit_before_ready_or_within_the_window_is_a_crash(self, policy, clock):
        """Never ready, or ready for less than the window: a crash; ready longer: not."""
        assert policy.exited(Started(spawned_at=99.0)) is not None
        assert policy.exited(Started(spawned_at=90.0, ready_at=95.0)) is not None
        assert policy.exited(Started(spawned_at=80.0, ready_at=90.0)) is None
        assert policy.crashes == 2

    def test_each_crash_doubles_the_wait_before_the_replacement(self, policy, clock):
        """The waits grow (0.1 s doubling, with up to 20% jitter), and no spawn comes before
        the wait has passed."""
        waits = []
        for _ in range(4):
            waits.append(policy.exited(Started(spawned_at=clock[0])))
            assert not policy.may_spawn()
            clock[0] += waits[-1]
            assert policy.may_spawn()
        assert all(0.1 * 2**i <= w <= 0.1 * 2**i * 1.2 for i, w in enumerate(waits)), waits

    def test_workers_ready_before_the_last_crash_prove_nothing(self, policy, clock):
        """One worker crash-looping beside a healthy one: the healthy one, serving long before
        the crashes, does not clear the count, and the fifth crash exhausts the policy."""
        healthy = Started(spawned_at=0.0, ready_at=1.0)
        for _ in range(5):
            assert not policy.exhausted
            policy.exited(Started(spawned_at=clock[0]))
            clock[0] += policy.wait()
            assert not policy.note_health([healthy])
        assert policy.exhausted

    def test_a_worker_spawned_after_the_last_crash_clears_the_count_once_proven(
        self, policy, clock
    ):
        """A replacement that stays ready for the window clears the count and the backoff."""
        for _ in range(3):
            policy.exited(Started(spawned_at=clock[0]))
            clock[0] += policy.wait()
        replacement = Started(spawned_at=clock[0], ready_at=clock[0] + 0.5)
        clock[0] += 10.0
        assert not policy.note_health([replacement])
        assert not policy.proven
        clock[0] += 0.5
        assert policy.note_health([replacement])
        assert (policy.crashes, policy.proven) == (0, True)
        assert policy.exited(Started(spawned_at=clock[0])) < 0.13


def figures(seq: int, requests: int) -> dict[str, Any]:
    """A worker's answer to a stats request: ``requests`` echo calls counted."""
    metrics = Metrics(lambda: {"connections_open": 1.0})
    for _ in range(requests):
        metrics.method("echo").observe(0.001, "ok")
    return {"seq": seq, "metrics": metrics.snapshot()}


class FakeWorker:
    """A worker as InstanceStats.refresh sees it: it answers once released."""

    def __init__(self, pid: int, answer: dict[str, Any]) -> None:
        self.pid = pid
        self.ready_at = 0.0
        self.channel = self
        self.closed = False
        self.asked = gevent.event.Event()
        self.release = gevent.event.Event()
        self._answer = answer

    def request(self, message: dict[str, Any], timeout: float) -> dict[str, Any] | None:
        self.asked.set()
        return self._answer if self.release.wait(timeout) else None


class TestInstanceStats:
    """The workers' figures as the arbiter sums them, in this process."""

    def test_a_worker_retired_during_a_scrape_is_counted_once(self):
        """A scrape's answer that arrives after its worker exited (and sent its final figures)
        is ignored: counted once, and its gauges gone."""
        stats = InstanceStats()
        stats.track(7)
        worker = FakeWorker(7, figures(1, 5))
        scrape = gevent.spawn(stats.refresh, [worker], 5.0)
        assert worker.asked.wait(5.0)
        assert stats.update(7, figures(2, 6))  # its final figures
        stats.retire(7)
        worker.release.set()
        scrape.get(timeout=5.0)
        assert requests_of(stats.totals()) == 6
        assert stats.live() == {}
        assert stats.totals()["gauges"] == {}

    def test_an_older_answer_does_not_replace_a_newer_one(self):
        """Of two answers, the one the worker numbered last is kept whatever the order."""
        stats = InstanceStats()
        stats.track(7)
        assert stats.update(7, figures(3, 9))
        assert not stats.update(7, figures(2, 4))
        assert requests_of(stats.totals()) == 9

    def test_figures_of_an_unknown_worker_are_ignored(self):
        """Figures are kept only for workers the arbiter tracks."""
        stats = InstanceStats()
        assert not stats.update(8, figures(1, 3))
        assert requests_of(stats.totals()) == 0


class TestControlChannel:
    """The arbiter<->worker channel, over a socketpair in this process."""

    @pytest.fixture
    def pair(self) -> Iterator[tuple[socket.socket, socket.socket]]:
        ours, theirs = socket.socketpair()
        with ours, theirs:
            yield ours, theirs

    @staticmethod
    def channel(sock: socket.socket, received: list[Any], **kwargs: Any) -> Channel:
        closed = kwargs.pop("closed", None)
        return Channel(
            sock,
            on_message=received.append,
            on_closed=closed.set if closed is not None else lambda: None,
            log=structlog.get_logger("test"),
            **kwargs,
        )

    def test_a_message_that_cannot_go_out_in_time_closes_the_channel(self, pair):
        """A peer that reads nothing: sending never blocks, and once a message cannot be
        sent in time the channel closes (what went of it would corrupt the next message)."""
        ours, _ = pair
        closed = gevent.event.Event()
        channel = self.channel(ours, [], closed=closed, send_timeout=0.2)
        channel.start()
        started = time.monotonic()
        for _ in range(40):
            assert channel.send({"type": "stats", "pad": "x" * 65536})
        assert time.monotonic() - started < 0.5  # queued, not sent
        assert closed.wait(10.0)
        assert channel.closed
        assert not channel.send({"type": "stats"})

    def test_a_line_in_many_pieces_is_one_message(self, pair):
        """A long message arriving a little at a time is read once, whole."""
        ours, theirs = pair
        received: list[Any] = []
        channel = self.channel(ours, received)
        channel.start()
        line = json.dumps({"type": "stats", "pad": "y" * 500_000}).encode() + b"\n"
        for start in range(0, len(line), 4096):
            theirs.sendall(line[start : start + 4096])
        wait_until(lambda: received, timeout=10.0)
        assert received == [json.loads(line)]
        channel.close()

    def test_a_line_over_the_limit_closes_the_channel(self, pair):
        """A line longer than MAX_LINE (1 MiB) is a bug of ours, not a message to buffer."""
        ours, theirs = pair
        closed = gevent.event.Event()
        channel = self.channel(ours, [], closed=closed)
        channel.start()
        with contextlib.suppress(OSError):
            theirs.sendall(b"z" * (MAX_LINE + 2 * 65536))
        assert closed.wait(10.0)

    def test_a_flooding_peer_does_not_starve_other_greenlets(self, pair):
        """Messages already waiting are handled a received batch at a time, with other
        greenlets run between batches."""
        COUNT = 8_000
        ours, theirs = pair
        received: list[Any] = []
        # About 100 KB: more than one read, less than the socket's buffer.
        lines = b"".join(json.dumps({"n": n}).encode() + b"\n" for n in range(COUNT))
        writer = gevent.spawn(theirs.sendall, lines)
        channel = self.channel(ours, received)
        channel.start()
        seen_by_another: list[int] = []
        gevent.spawn(lambda: seen_by_another.append(len(received))).join(timeout=10.0)
        wait_until(lambda: len(received) == COUNT, timeout=10.0)
        writer.join(timeout=10.0)
        assert seen_by_another
        assert seen_by_another[0] < COUNT
        channel.close()


class TestWorkerProcess:
    def test_an_exited_worker_is_never_signalled(self):
        """Once the hub has reaped a worker its pid may be another process's: signalling the
        worker is then a no-op, whatever runs under that pid now."""
        with subprocess.Popen(["sleep", "30"]) as other:
            try:
                closed = types.SimpleNamespace(send=lambda message: False)
                worker = WorkerProcess(other.pid, 1, 0, closed, slot=None, stack_file=None)
                worker.exited = True
                assert not worker.send_signal(signal.SIGTERM)
                worker.stop()  # the channel is closed: it falls back on a signal, not sent
                assert other.poll() is None
            finally:
                other.kill()


class TestParts:
    @pytest.mark.parametrize(
        ("limit", "workers", "expected"), [(10_000, 3, 3334), (7, 2, 4), (0, 4, 0), (1, 8, 1)]
    )
    def test_each_worker_enforces_its_share_of_a_limit(self, limit, workers, expected):
        """A worker's share is ceil(limit / workers); 0 (off) stays off."""
        assert share(limit, workers) == expected

    def test_settings_survive_the_trip_from_the_probe(self):
        """The probe's JSON gives back an equal Config, tuples and mappings included."""
        config = Config(
            port=0,
            workers=3,
            drain_time=1.5,
            trusted_proxies=("10.0.0.0/8",),
            endpoint_qps_limits={"echo": 5},
            consul_token="s3cret",
        )
        assert config_from_json(config_to_json(config)) == config

    def test_snapshots_sum_counters_and_histograms(self):
        """merge_snapshots adds requests, buckets, errors and overloads up, method by method."""
        first, second = Metrics(lambda: {}), Metrics(lambda: {"connections_open": 2})
        first.method("echo").observe(0.001, "ok")
        second.method("echo").observe(0.5, "internal")
        second.method("ping").observe(0.001, "ok")
        second.overload("qps")
        total = merge_snapshots([first.snapshot(), second.snapshot()])
        assert total["methods"]["echo"]["requests"] == 2
        assert total["methods"]["echo"]["errors"]["internal"] == 1
        assert sum(total["methods"]["echo"]["buckets"]) == 2
        assert total["methods"]["ping"]["requests"] == 1
        assert total["overloads"]["qps"] == 1
        assert total["gauges"]["connections_open"] == 2


class TestAcceptGate:
    def test_a_deferring_gate_delays_the_accept_without_losing_the_connection(self, handler):
        """RpcServer(accept_gate=...) leaves the listener alone while the gate defers."""
        calls: list[float] = []

        def gate() -> float:
            calls.append(time.monotonic())
            return 0.2 if len(calls) == 1 else 0.0

        server = kitegreen.RpcServer(testsvc_thrift.TestService, handler, loopback_config())
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        server.start(listener=listener, max_accept=1, accept_gate=gate)
        try:
            started = time.monotonic()
            echo_call(server.address)
            assert time.monotonic() - started >= 0.19
            assert len(calls) >= 2
        finally:
            server.stop(timeout=2.0)
            listener.close()

    def test_max_accept_below_one_is_a_config_error(self, handler):
        """start(max_accept=0) is refused with the project's ConfigError; the listener it was
        given is left open for its owner."""
        server = kitegreen.RpcServer(testsvc_thrift.TestService, handler, loopback_config())
        with socket.socket() as listener:
            listener.bind(("127.0.0.1", 0))
            listener.listen(16)
            with pytest.raises(kitegreen.ConfigError, match="max_accept must be >= 1, got 0"):
                server.start(listener=listener, max_accept=0)
            assert listener.fileno() >= 0
