"""``--reload``: the launcher run as a subprocess on a target written to a temporary directory,
called with thriftpy2's client over loopback while the test edits the target's file."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from clients import thriftpy2_client
from conftest import TESTS, wait_until
from launching import Launcher, launcher_env
from service import testsvc_thrift

from kitegreen.workers.watch import application_directory

LOOPBACK = ("--host", "127.0.0.1", "--port", "0", "--debug-port", "0", "--exit-wait-time", "1")
TAGGED = (
    "from service import Handler, testsvc_thrift\n"
    "import kitegreen\n"
    "class Tagged(Handler):\n"
    "    def echo(self, message):\n"
    "        return TAG + message\n"
    "server = kitegreen.RpcServer(testsvc_thrift.TestService, Tagged(),\n"
    "    kitegreen.Config(service_name='reload-test'))\n"
)
"""A target whose echo says which version of the code answered: ``TAG = ...`` goes first."""
RELOAD_WITHIN = 2.0
"""Seconds from a file saved to its code answering (the issue's bound)."""
REFUSED = "reload refused; the workers keep serving"
WATCHING = "watching for changes; a change reloads the workers"
"""Logged once the watcher's watches are armed: a save before it is not seen, by design."""


def tagged(tag: str, extra: str = "") -> str:
    return f"TAG = {tag!r}\n" + TAGGED + extra


def echo(address: tuple[str, int]) -> str:
    """One echo call on a connection of its own (a worker being replaced still answers it)."""
    with thriftpy2_client(testsvc_thrift.TestService, address, timeout=5.0) as client:
        reply: str = client.echo("x")
        return reply


def served_within(launcher: Launcher, expected: str, seconds: float) -> float:
    """Seconds until ``expected`` is echoed, polling fresh connections; fails past
    ``seconds``, saying what the launcher logged meanwhile (which reload step was missing)."""
    address = launcher.address()
    start = time.monotonic()
    seen: list[str] = []

    def answered() -> bool:
        seen.append(echo(address))
        return seen[-1] == expected

    def what() -> str:
        steps = [
            f"{e.get('timestamp')} {e.get('event')} {e.get('reason') or e.get('files') or ''}"
            for e in launcher.events()[-15:]
        ]
        return f"{expected!r}, saw {seen[-3:]}; the launcher's last events:\n" + "\n".join(steps)

    wait_until(answered, seconds, interval=0.02, what=what)
    return time.monotonic() - start


@pytest.fixture
def app(tmp_path: Path) -> Path:
    module = tmp_path / "app.py"
    module.write_text(tagged("one:"))
    return module


def launch(module: Path, *args: str, pythonpath: str = str(TESTS)) -> Launcher:
    # Bytecode is written as usual, whatever the developer's environment says: --reload must
    # not run a stale .pyc when an edit keeps the file's size within the same second (CI
    # caught it; a shell with PYTHONDONTWRITEBYTECODE=1 hid it).
    env = launcher_env(PYTHONPATH=pythonpath)
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    return Launcher(f"{module}:server", *LOOPBACK, "--reload", *args, env=env)


@pytest.mark.slow
@pytest.mark.timeout(60)
class TestReload:
    @pytest.mark.parametrize("workers", ["1", "2"])
    def test_an_edit_is_served_within_2_seconds(self, app, workers):
        """With one worker or two: each save of the handler's file is answered by the new code
        within 2 s, with no SIGHUP (edits of the same size, in the same second); the watcher
        ends with the instance."""
        with launch(app, "--workers", workers) as launcher:
            launcher.wait_for_event("worker ready", timeout=20.0)
            launcher.wait_for_event(WATCHING, timeout=20.0)
            address = launcher.address()
            assert echo(address) == "one:x"
            first = app.stat()
            for tag in ("two:", "six:"):
                app.write_text(tagged(tag))
                # Each edit keeps the first version's mtime and size, as a save within the same
                # second does: a .pyc cached from an earlier version would pass for current.
                os.utime(app, ns=(first.st_atime_ns, first.st_mtime_ns))
                served_within(launcher, tag + "x", RELOAD_WITHIN)
            changed = launcher.named("files changed; reloading")
            assert changed
            assert changed[0]["files"] == [str(app)]
            launcher.proc.terminate()
            assert launcher.wait(20.0) == 0, launcher.output()[-3000:]
            assert launcher.group() == []

    def test_a_syntax_error_keeps_the_old_code_serving_until_fixed(self, app):
        """A save that does not compile is refused: the error is logged, the old code keeps
        answering; the save that fixes it is served within 2 s."""
        with launch(app) as launcher:
            launcher.wait_for_event("worker ready", timeout=20.0)
            launcher.wait_for_event(WATCHING, timeout=20.0)
            address = launcher.address()
            assert echo(address) == "one:x"
            app.write_text(tagged("two:", "def broken(:\n"))
            launcher.wait_for_event(REFUSED, timeout=20.0)
            assert "SyntaxError" in launcher.output()
            for _ in range(5):
                assert echo(address) == "one:x"
            app.write_text(tagged("six:"))
            served_within(launcher, "six:x", RELOAD_WITHIN)
            assert len(launcher.named(REFUSED)) == 1
            launcher.proc.terminate()
            assert launcher.wait(20.0) == 0, launcher.output()[-3000:]

    def test_files_other_than_python_and_idl_are_not_watched(self, app):
        """A change to a file that is neither Python nor Thrift IDL reloads nothing; an IDL
        change does."""
        with launch(app) as launcher:
            launcher.wait_for_event("worker ready", timeout=20.0)
            launcher.wait_for_event(WATCHING, timeout=20.0)
            (app.parent / "notes.txt").write_text("not code\n")
            (app.parent / "svc.thrift").write_text("service S {}\n")
            record = launcher.wait_for_event("files changed; reloading", timeout=10.0)
            assert record["files"] == [str(app.parent / "svc.thrift")]
            launcher.wait_for_event("reload complete", timeout=20.0)
            assert len(launcher.named("files changed; reloading")) == 1

    def test_without_watchfiles_the_launch_says_how_to_install_it(self, app, tmp_path):
        """--reload where watchfiles cannot be imported: exit 2, with the extra to install."""
        missing = tmp_path / "missing"
        (missing / "watchfiles").mkdir(parents=True)
        (missing / "watchfiles" / "__init__.py").write_text(
            "raise ImportError(\"No module named 'watchfiles'\")\n"
        )
        with launch(app, pythonpath=f"{missing}{os.pathsep}{TESTS}") as launcher:
            assert launcher.wait(20.0) == 2, launcher.output()[-3000:]
            record = launcher.wait_for_event("cannot start")
            assert "pip install 'kitegreen[reload]'" in record["error"]
            assert "worker spawned" not in launcher.output()

    def test_the_watcher_does_not_outlive_a_killed_arbiter(self, app):
        """The watching child ends with its arbiter, even one killed with SIGKILL."""
        with launch(app) as launcher:
            record = launcher.wait_for_event(WATCHING, timeout=20.0)
            launcher.wait_for_event("worker ready", timeout=20.0)
            assert record["watcher"] in launcher.group()
            launcher.proc.kill()
            launcher.wait(10.0)
            wait_until(lambda: launcher.group() == [], 10.0, interval=0.05)


class TestApplicationDirectory:
    """What --reload watches for a target, found without importing it."""

    def test_a_file_target_watches_its_directory(self, tmp_path):
        assert application_directory(f"{tmp_path / 'app.py'}:server") == tmp_path

    def test_a_module_target_watches_its_top_level_package(self, tmp_path, monkeypatch):
        package = tmp_path / "shop"
        (package / "api").mkdir(parents=True)
        for init in (package / "__init__.py", package / "api" / "__init__.py"):
            init.write_text("")
        (tmp_path / "single.py").write_text("")
        monkeypatch.chdir(tmp_path)
        assert application_directory("shop.api.main:server") == package
        assert application_directory("single:server") == tmp_path

    def test_an_unknown_module_watches_the_working_directory(self, tmp_path, monkeypatch):
        monkeypatch.chdir(tmp_path)
        assert application_directory("no_such_module_here:server") == tmp_path
