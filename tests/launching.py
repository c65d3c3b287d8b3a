"""Running the launcher as a subprocess in tests: ``python -m kitegreen ...`` with its log read by
greenlets, for the launcher's and the workers' tests."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
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

    Always used as a context manager: on exit the process is killed if it still runs, reaped,
    and its pipes closed.
    """

    def __init__(
        self,
        *args: str,
        env: dict[str, str] | None = None,
        command: tuple[str, ...] = PYTHON_M,
    ) -> None:
        self.proc = subprocess.Popen(
            [*command, *args],
            cwd=ROOT,
            env=env if env is not None else launcher_env(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        self.stdout: list[str] = []
        self.stderr: list[str] = []
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
            self.proc.wait(timeout=5.0)
            gevent.joinall(self._readers, timeout=5.0)
        finally:
            gevent.killall(self._readers)
            for stream in (self.proc.stdout, self.proc.stderr):
                if stream is not None:
                    stream.close()

    def events(self) -> list[dict[str, Any]]:
        """The JSON log lines written so far (the launcher logs to standard error)."""
        return json_lines(self.stderr)

    def find_event(self, event: str) -> dict[str, Any] | None:
        """The first log record named ``event`` so far, or None."""
        return next((e for e in self.events() if e.get("event") == event), None)

    def wait_for_event(self, event: str, timeout: float = 10.0) -> dict[str, Any]:
        """The first log record named ``event``, waiting for it up to ``timeout``."""
        wait_until(
            lambda: self.find_event(event) is not None or self.proc.poll() is not None,
            timeout=timeout,
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
