"""``--preload``: the arbiter imports the application once and its workers share that memory;
SIGHUP then reloads the settings and keeps the code. The launcher runs as a subprocess on
``benchmarks/preload_target.py`` (an import that allocates and touches ``PRELOAD_MB`` MB)."""

from __future__ import annotations

import shutil
import signal
from pathlib import Path
from typing import Any

import pytest
import thriftpy2
from clients import thriftpy2_client
from conftest import TESTS, wait_until
from launching import Launcher, launcher_env

pytestmark = [pytest.mark.timeout(120), pytest.mark.slow]

BENCHMARKS = TESTS.parent / "benchmarks"
TARGET = str(BENCHMARKS / "preload_target.py") + ":server"
LOOPBACK = ("--host", "127.0.0.1", "--port", "0", "--no-enable-debug-server")
bench_thrift = thriftpy2.load(str(BENCHMARKS / "bench.thrift"), module_name="bench_thrift")
BALLAST_MB = 200
MB = 1024.0


def rollup(pid: int) -> dict[str, float]:
    """Pss and USS (its private pages) of ``pid`` in MB, from ``/proc/PID/smaps_rollup``."""
    fields: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        name, _, rest = line.partition(":")
        fields[name] = int(rest.split()[0])
    return {
        "pss": fields["Pss"] / MB,
        "uss": (fields["Private_Clean"] + fields["Private_Dirty"]) / MB,
    }


def ready_workers(launcher: Launcher, count: int) -> set[int]:
    wait_until(
        lambda: len(launcher.named("worker ready")) >= count or launcher.proc.poll() is not None,
        timeout=60.0,
        what=lambda: f"{count} workers ready;\n{launcher.output()[-3000:]}",
    )
    assert launcher.proc.poll() is None, launcher.output()[-3000:]
    return {int(r["worker"]) for r in launcher.named("worker ready")}


def importers(path: Path) -> list[int]:
    return [int(line) for line in path.read_text().split()] if path.exists() else []


def echo(launcher: Launcher, message: str) -> Any:
    with thriftpy2_client(bench_thrift.Bench, launcher.address()) as client:
        return client.echo(message)


class TestMemory:
    @pytest.mark.parametrize("preload", [False, True], ids=["default", "preload"])
    def test_workers_share_what_the_import_allocated(self, tmp_path: Path, preload: bool) -> None:
        """With --preload only the arbiter imports the application and each of 2 workers'
        Pss is well under the 200 MB the import touched (the pages are shared, not copied:
        its private memory is a small fraction); without it each worker imports and holds its
        own 200 MB."""
        imports = tmp_path / "imports"
        env = launcher_env(PRELOAD_MB=str(BALLAST_MB), PRELOAD_IMPORTS=str(imports))
        args = (*LOOPBACK, "-w", "2", *(("--preload",) if preload else ()))
        with Launcher(TARGET, *args, env=env) as launcher:
            workers = ready_workers(launcher, 2)
            assert echo(launcher, "x") == "v1:x"
            memory = {pid: rollup(pid) for pid in workers}
            launcher.proc.send_signal(signal.SIGTERM)
            assert launcher.wait(30.0) == 0, launcher.output()[-3000:]
        if preload:
            assert importers(imports) == [launcher.proc.pid]
            for pid, figures in memory.items():
                assert figures["pss"] < BALLAST_MB / 2, (pid, figures)
                assert figures["uss"] < BALLAST_MB / 4, (pid, figures)
        else:
            assert launcher.proc.pid not in importers(imports)
            assert workers <= set(importers(imports))
            for pid, figures in memory.items():
                assert figures["uss"] > BALLAST_MB, (pid, figures)


class TestReload:
    def test_sighup_reloads_the_settings_not_the_code(self, tmp_path: Path) -> None:
        """With --preload, SIGHUP applies a changed config file (the limits change) while an
        edit to the code is not served: the new workers are forked from the arbiter's copy,
        and nothing imports the application again."""
        shutil.copy(BENCHMARKS / "bench.thrift", tmp_path / "bench.thrift")
        target = tmp_path / "app.py"
        code = (BENCHMARKS / "preload_target.py").read_text()
        target.write_text(code)
        config = tmp_path / "kite.yml"
        config.write_text("limit_qps: 1000\n")
        imports = tmp_path / "imports"
        env = launcher_env(PRELOAD_MB="1", PRELOAD_IMPORTS=str(imports))
        args = (*LOOPBACK, "-w", "2", "--preload", "--config", str(config))
        with Launcher(f"{target}:server", *args, env=env) as launcher:
            first = ready_workers(launcher, 2)
            assert echo(launcher, "x") == "v1:x"
            target.write_text(code.replace('TAG = "v1:"', 'TAG = "v2:"'))
            config.write_text("limit_qps: 600\n")
            launcher.proc.send_signal(signal.SIGHUP)
            launcher.wait_for_event("reload complete", timeout=60.0)
            now = {int(r["worker"]) for r in launcher.named("worker ready")} - first
            assert len(now) == 2
            assert echo(launcher, "x") == "v1:x"
            changed = [r for r in launcher.named("limits changed") if r["source"] == "reload"]
            assert changed
            assert changed[-1]["qps"] == 600
            launcher.proc.send_signal(signal.SIGTERM)
            assert launcher.wait(30.0) == 0, launcher.output()[-3000:]
        assert importers(imports) == [launcher.proc.pid]
