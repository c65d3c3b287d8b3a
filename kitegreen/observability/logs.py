"""Log shape: structlog, one line per event, JSON for machines or console for people.

Only the launcher calls :func:`configure`; a server embedded in an application logs through
whatever structlog configuration that application has. Logs go to standard error, as
gunicorn's and most servers' do: standard output stays free for what a command prints
(``--check-config``), and a terminal gets the console format without being asked.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any, TextIO

import structlog


def configure(fmt: str = "auto", level: str = "info", stream: TextIO | None = None) -> None:
    """Set structlog up for a kitegreen process.

    Args:
        fmt: ``json`` (one object per line, grep- and jq-friendly), ``console``, or ``auto``:
            console when ``stream`` is a terminal, json otherwise.
        level: the lowest level written: debug, info, warning, error or critical.
        stream: where lines go; standard error when None.
    """
    stream = stream or sys.stderr
    if fmt == "auto":
        fmt = "console" if _is_terminal(stream) else "json"
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        add_pid,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderer: list[Any]
    if fmt == "json":
        renderer = [structlog.processors.format_exc_info, structlog.processors.JSONRenderer()]
    else:
        renderer = [structlog.dev.ConsoleRenderer(colors=False)]
    structlog.configure(
        processors=shared + renderer,
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        # One write() per line, newline included (print() makes two): with --workers N several
        # processes share standard error, and a pipe keeps a write of up to 4 KiB whole, where
        # two writes per line could interleave with another process's line.
        logger_factory=structlog.WriteLoggerFactory(stream),
        cache_logger_on_first_use=True,
    )


def add_pid(logger: Any, method: str, event: dict[str, Any]) -> dict[str, Any]:
    """A structlog processor: the process ID on every line, unless the line gives one.

    With ``--workers N`` an arbiter and N workers write to the same standard error; the pid
    tells whose line it is (read at each call, so it is right in a forked worker).
    """
    event.setdefault("pid", os.getpid())
    return event


def _is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # a stream without a descriptor, or a closed one
        return False
