"""Log shape: structlog, one line per event, JSON for machines or console for people.

Only the launcher calls :func:`configure`; a server embedded in an application logs through
whatever structlog configuration that application has.
"""

from __future__ import annotations

import logging
import sys
from typing import Any, TextIO

import structlog


def configure(fmt: str = "json", level: str = "info", stream: TextIO | None = None) -> None:
    """Set structlog up for a kitegreen process.

    Args:
        fmt: ``json`` (one object per line, grep- and jq-friendly) or ``console``.
        level: the lowest level written: debug, info, warning, error or critical.
        stream: where lines go; standard output when None.
    """
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
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
        logger_factory=structlog.PrintLoggerFactory(stream or sys.stdout),
        cache_logger_on_first_use=True,
    )
