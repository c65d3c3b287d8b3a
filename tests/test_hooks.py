"""Hooks (``kitegreen/hooks.py``): each runs in the documented process and order, in one process
and with ``--workers 2`` through a reload and a stop, given in code or in a config file; a hook
that raises has its documented effect."""

from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import Any

import pytest
from clients import thriftpy2_client
from conftest import TESTS, wait_until
from launching import Launcher, launcher_env
from service import testsvc_thrift

import kitegreen
from kitegreen.config.hook_settings import HOOK_NAMES
from kitegreen.exceptions import ConfigError
from kitegreen.hooks import Hooks

pytestmark = [pytest.mark.timeout(60)]

TARGET = "tests/hooks_target.py:server"
PLAIN_TARGET = "tests/launcher_target.py:server"
LOOPBACK = ("--host", "127.0.0.1", "--port", "0", "--no-enable-debug-server")


def hook_env(record: Path, **extra: str) -> dict[str, str]:
    return launcher_env(PYTHONPATH=str(TESTS), HOOKS_RECORD=str(record), **extra)


def records(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line]


def names(path: Path) -> list[str]:
    return [r["hook"] for r in records(path)]


def echo(address: tuple[str, int]) -> str:
    with thriftpy2_client(testsvc_thrift.TestService, address) as client:
        return str(client.echo("hooked"))


@pytest.mark.slow
class TestSingleProcess:
    def test_every_hook_runs_in_the_process_in_order(self, tmp_path: Path) -> None:
        """One process runs on_starting, post_worker_init, when_ready, then on SIGTERM
        worker_exit and on_exit, all in the launcher's own process; post_fork and on_reload
        never run (nothing forks, SIGHUP is ignored)."""
        record = tmp_path / "hooks.jsonl"
        with Launcher(TARGET, *LOOPBACK, env=hook_env(record)) as launcher:
            address = launcher.address()
            wait_until(lambda: "when_ready" in names(record), what="when_ready")
            assert echo(address) == "hooked"
            launcher.proc.send_signal(signal.SIGHUP)
            launcher.proc.send_signal(signal.SIGTERM)
            assert launcher.wait(15.0) == 0, launcher.output()
        found = records(record)
        assert [r["hook"] for r in found] == [
            "on_starting",
            "post_worker_init",
            "when_ready",
            "worker_exit",
            "on_exit",
        ]
        assert {(r["role"], r["pid"], r["getpid"]) for r in found} == {
            ("single", launcher.proc.pid, launcher.proc.pid)
        }
        by_hook = {r["hook"]: r for r in found}
        assert not by_hook["on_starting"]["has_server"]
        assert by_hook["post_worker_init"]["has_server"]
        assert by_hook["when_ready"]["address"] == list(address)
        assert by_hook["on_starting"]["service"] == "hooks-test"

    def test_hooks_from_a_config_file(self, tmp_path: Path) -> None:
        """Hooks named ``module:function`` in the config file run as the ones given in code."""
        record = tmp_path / "hooks.jsonl"
        config = tmp_path / "kite.yml"
        config.write_text(
            "".join(f"{name}: hooks_record:{name}\n" for name in HOOK_NAMES if name != "post_fork")
        )
        with Launcher(
            PLAIN_TARGET, *LOOPBACK, "--config", str(config), env=hook_env(record)
        ) as launcher:
            launcher.address()
            wait_until(lambda: "when_ready" in names(record), what="when_ready")
            launcher.proc.send_signal(signal.SIGTERM)
            assert launcher.wait(15.0) == 0, launcher.output()
        assert names(record) == [
            "on_starting",
            "post_worker_init",
            "when_ready",
            "worker_exit",
            "on_exit",
        ]

    def test_a_failing_on_starting_aborts_the_start(self, tmp_path: Path) -> None:
        """on_starting raising: logged with its traceback, nothing bound, exit status 2, and
        no other hook runs."""
        record = tmp_path / "hooks.jsonl"
        env = hook_env(record, HOOKS_FAIL="on_starting")
        with Launcher(TARGET, *LOOPBACK, env=env) as launcher:
            assert launcher.wait(15.0) == 2, launcher.output()
            failed = launcher.find_event("hook failed")
            assert launcher.find_event("listening") is None
        assert failed is not None
        assert failed["hook"] == "on_starting"
        assert "fails on purpose" in failed["exception"]
        assert "Traceback" in failed["exception"]
        assert names(record) == []

    def test_a_failing_when_ready_stops_with_status_2(self, tmp_path: Path) -> None:
        """when_ready raising: the server stops again, worker_exit and on_exit still run, exit
        status 2."""
        record = tmp_path / "hooks.jsonl"
        env = hook_env(record, HOOKS_FAIL="when_ready")
        with Launcher(TARGET, *LOOPBACK, env=env) as launcher:
            assert launcher.wait(15.0) == 2, launcher.output()
            assert launcher.find_event("hook failed")["hook"] == "when_ready"
        assert names(record) == ["on_starting", "post_worker_init", "worker_exit", "on_exit"]

    def test_a_failing_worker_exit_is_ignored(self, tmp_path: Path) -> None:
        """worker_exit raising is logged; the stop goes on, on_exit runs, exit status 0."""
        record = tmp_path / "hooks.jsonl"
        env = hook_env(record, HOOKS_FAIL="worker_exit")
        with Launcher(TARGET, *LOOPBACK, env=env) as launcher:
            launcher.address()
            wait_until(lambda: "when_ready" in names(record), what="when_ready")
            launcher.proc.send_signal(signal.SIGTERM)
            assert launcher.wait(15.0) == 0, launcher.output()
            assert launcher.find_event("hook failed")["hook"] == "worker_exit"
        assert names(record)[-1] == "on_exit"


@pytest.mark.slow
class TestWorkers:
    @pytest.mark.parametrize("preload", [False, True], ids=["default", "preload"])
    def test_each_hook_runs_in_its_process_through_a_reload_and_a_stop(
        self, tmp_path: Path, preload: bool
    ) -> None:
        """With --workers 2 and hooks given in code: on_starting in the arbiter; post_fork then
        post_worker_init in each worker; when_ready in the arbiter once both are ready; SIGHUP
        runs on_reload in the arbiter, the old workers' worker_exit and the new ones'
        post_fork and post_worker_init; SIGTERM the new workers' worker_exit, then on_exit in
        the arbiter, last. The same with --preload, where the reload does not take the hooks
        for changed settings."""
        record = tmp_path / "hooks.jsonl"
        args = (*LOOPBACK, "--workers", "2", *(("--preload",) if preload else ()))
        with Launcher(TARGET, *args, env=hook_env(record)) as launcher:
            arbiter = launcher.proc.pid
            address = launcher.address()
            wait_until(lambda: "when_ready" in names(record), timeout=20.0, what="when_ready")
            assert echo(address) == "hooked"
            first = records(record)
            launcher.proc.send_signal(signal.SIGHUP)
            launcher.wait_for_event("reload complete", timeout=30.0)
            wait_until(lambda: names(record).count("worker_exit") == 2, what="old workers' exit")
            reloaded = records(record)[len(first) :]
            launcher.proc.send_signal(signal.SIGTERM)
            assert launcher.wait(20.0) == 0, launcher.output()
            stopped = records(record)[len(first) + len(reloaded) :]
            kept = launcher.named("these settings change only with a restart; kept as they were")
        assert kept == []

        assert first[0]["hook"] == "on_starting"
        assert first[0]["pid"] == arbiter
        assert first[-1]["hook"] == "when_ready"
        assert first[-1]["pid"] == arbiter
        assert first[-1]["address"] == list(address)
        old = _workers(first[1:-1], arbiter)
        assert {r["worker"] for r in first[1:-1]} == {0, 1}

        assert reloaded[0]["hook"] == "on_reload"
        assert reloaded[0]["pid"] == arbiter
        new = _workers([r for r in reloaded[1:] if r["hook"] != "worker_exit"], arbiter)
        assert not new & old
        exits = [r for r in reloaded if r["hook"] == "worker_exit"]
        assert {r["pid"] for r in exits} == old
        assert all(r["role"] == "worker" and r["has_server"] for r in exits)

        assert [r["hook"] for r in stopped] == ["worker_exit", "worker_exit", "on_exit"]
        assert {r["pid"] for r in stopped[:2]} == new
        assert stopped[-1]["pid"] == arbiter
        assert stopped[-1]["role"] == "arbiter"
        assert all(r["pid"] == r["getpid"] for r in first + reloaded + stopped)

    def test_a_failing_when_ready_stops_the_instance(self, tmp_path: Path) -> None:
        """when_ready raising in the arbiter: the instance stops gracefully, exit status 2."""
        record = tmp_path / "hooks.jsonl"
        env = hook_env(record, HOOKS_FAIL="when_ready")
        with Launcher(TARGET, *LOOPBACK, "--workers", "2", env=env) as launcher:
            assert launcher.wait(30.0) == 2, launcher.output()
            assert launcher.find_event("hook failed")["hook"] == "when_ready"
        assert names(record)[-1] == "on_exit"
        assert names(record).count("worker_exit") == 2

    def test_a_failing_post_fork_is_a_start_up_crash(self, tmp_path: Path) -> None:
        """post_fork raising in every worker: each exits before serving, the arbiter counts
        start-up crashes and gives up with exit status 4; when_ready never runs, on_exit
        does."""
        record = tmp_path / "hooks.jsonl"
        env = hook_env(record, HOOKS_FAIL="post_fork")
        with Launcher(TARGET, *LOOPBACK, "--workers", "2", env=env) as launcher:
            assert launcher.wait(45.0) == 4, launcher.output()[-3000:]
            failed = launcher.named("hook failed")
            assert failed
            assert {r["hook"] for r in failed} == {"post_fork"}
            assert launcher.find_event("worker ready") is None
        found = names(record)
        assert "when_ready" not in found
        assert found[-1] == "on_exit"


def _workers(found: list[dict[str, Any]], arbiter: int) -> set[int]:
    """The pids of workers whose hooks are ``found``: per pid post_fork then
    post_worker_init, in a worker, never in the arbiter."""
    pids = {r["pid"] for r in found}
    assert arbiter not in pids
    for pid in pids:
        own = [r for r in found if r["pid"] == pid]
        assert [r["hook"] for r in own] == ["post_fork", "post_worker_init"], found
        assert [r["has_server"] for r in own] == [False, True]
        assert all(r["role"] == "worker" for r in own)
    assert len(pids) == 2
    return pids


class TestSettings:
    def test_a_hook_is_a_callable_or_an_import_path(self) -> None:
        """Anything else is refused with the field named."""
        with pytest.raises(ConfigError, match="on_exit must be a callable or an import path"):
            kitegreen.Config(on_exit="not a path")
        assert kitegreen.Config.load(env={"KITE_ON_EXIT": "os.path:join"}).on_exit == (
            "os.path:join"
        )

    def test_an_unimportable_hook_is_a_config_error(self) -> None:
        """A hook whose module or attribute is missing fails when the hooks load, naming it."""
        config = kitegreen.Config(when_ready="os.path:no_such_function")
        with pytest.raises(ConfigError, match=r"when_ready 'os\.path:no_such_function' cannot"):
            Hooks(config, "single", None)

    def test_check_config_shows_a_callable_as_its_import_path(self) -> None:
        """--check-config prints a hook given in code as ``module:function``."""
        from kitegreen.config.help import describe

        config = kitegreen.Config(on_exit=json.dumps)
        assert describe(config)["on_exit"] == "json:dumps"
