"""Running the launcher as a subprocess in tests: ``python -m kitegreen ...`` with its log read by
greenlets, for the launcher's and the workers' tests."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import gevent
from conftest import TESTS, wait_until

from kitegreen import Config

ROOT = TESTS.parent
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

    The launcher leads a process group of its own (a new session, as a service manager or a
    terminal would start it), which its probe and workers inherit: :meth:`signal_group` sends
    a signal to all of them, as Ctrl-C or systemd's ``KillMode=control-group`` would.

    Always used as a context manager: on exit every process still in the group is killed, the
    launcher is reaped, and its pipes closed.
    """

    def __init__(
        self,
        *args: str,
        env: dict[str, str] | None = None,
        command: tuple[str, ...] = PYTHON_M,
    ) -> None:
        self.command = [*command, *args]
        self.proc = subprocess.Popen(
            self.command,
            cwd=ROOT,
            env=env if env is not None else launcher_env(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        self.stdout: list[str] = []
        self.stderr: list[str] = []
        self._records: list[dict[str, Any]] = []
        self._by_event: dict[str, list[dict[str, Any]]] = {}
        self._parsed = 0
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
            self.kill_group()
            self.proc.wait(timeout=5.0)
            gevent.joinall(self._readers, timeout=5.0)
        finally:
            gevent.killall(self._readers)
            for stream in (self.proc.stdout, self.proc.stderr):
                if stream is not None:
                    stream.close()

    def group(self) -> list[int]:
        """The processes left in the launcher's group that run its command (its workers, its
        probe, the launcher itself).

        The command is checked as well as the group: once every process of the group has
        exited, the group's number may be reused by an unrelated process that leads a group.
        """
        pgid = self.proc.pid
        wanted = "\0".join(self.command[:3])
        found = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
                cmdline = Path(f"/proc/{entry}/cmdline").read_text()
            except OSError:
                continue
            # The fields after the command's name, which may hold spaces and parentheses.
            fields = stat.rpartition(")")[2].split()
            if int(fields[2]) == pgid and cmdline.startswith(wanted):
                found.append(int(entry))
        return found

    def signal_group(self, signum: signal.Signals) -> None:
        """Send ``signum`` to the launcher's whole process group, as a terminal's Ctrl-C does."""
        os.killpg(self.proc.pid, signum)

    def kill_group(self) -> None:
        """SIGKILL whatever is left of the launcher's group (see :meth:`group`)."""
        for pid in self.group():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    def events(self) -> list[dict[str, Any]]:
        """The JSON log lines written so far (the launcher logs to standard error); parsed once
        each, as they arrive."""
        lines = self.stderr
        while self._parsed < len(lines):
            line = lines[self._parsed]
            self._parsed += 1
            with contextlib.suppress(ValueError):
                record = json.loads(line)
                if isinstance(record, dict):
                    self._records.append(record)
                    self._by_event.setdefault(str(record.get("event")), []).append(record)
        return list(self._records)

    def named(self, event: str) -> list[dict[str, Any]]:
        """Every log record named ``event`` so far."""
        self.events()
        return list(self._by_event.get(event, ()))

    def find_event(self, event: str) -> dict[str, Any] | None:
        """The first log record named ``event`` so far, or None."""
        found = self.named(event)
        return found[0] if found else None

    def wait_for_event(self, event: str, timeout: float = 10.0) -> dict[str, Any]:
        """The first log record named ``event``, waiting for it up to ``timeout``."""
        wait_until(
            lambda: self.find_event(event) is not None or self.proc.poll() is not None,
            timeout=timeout,
            what=lambda: f"a {event!r} log line;\n{self.output()}",
        )
        found = self.find_event(event)
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


def json_lines(lines: list[str]) -> list[dict[str, Any]]:
    """The lines that are JSON objects, parsed."""
    out = []
    for line in list(lines):
        with contextlib.suppress(ValueError):
            record = json.loads(line)
            if isinstance(record, dict):
                out.append(record)
    return out
