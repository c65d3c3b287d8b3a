"""Log shape: structlog, one line per event, JSON for machines or console for people.

Only the launcher calls :func:`configure`; a server embedded in an application logs through
whatever structlog configuration that application has. Logs go to standard error, as
gunicorn's and most servers' do: standard output stays free for what a command prints
(``--check-config``), and a terminal gets the console format without being asked.

Records of the standard library's ``logging`` (the application's and its libraries') go
through the same processors and renderer, by a handler on the root logger whose formatter is
structlog's ``ProcessorFormatter``: they come out as kitegreen's own lines do, with ``logger``
(the logger's name) and the request's context (``method``, ``peer``, ``log_id``, bound by the
request loop in the connection's greenlet, which is where a handler's ``logging`` call runs).
"""

from __future__ import annotations

import copy
import logging
import logging.config
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TextIO

import structlog
from structlog.typing import EventDict

from kitegreen.exceptions import ConfigError
from kitegreen.observability import tracing

KITEGREEN = "kitegreen"
"""The name of kitegreen's handler and formatter: on the root logger, and in a ``--log-config``
document, which may use them (``handlers: [kitegreen]``, ``formatter: kitegreen``)."""


def configure(
    fmt: str = "auto",
    level: str = "info",
    stream: TextIO | None = None,
    log_config: str | os.PathLike[str] | None = None,
) -> None:
    """Set structlog and the standard library's ``logging`` up for a kitegreen process.

    Args:
        fmt: ``json`` (one object per line, grep- and jq-friendly), ``console``, or ``auto``:
            console when ``stream`` is a terminal, json otherwise.
        level: the lowest level written, any case: debug, info, warning, error or critical.
            It applies to kitegreen's lines and to the root logger.
        stream: where lines go; standard error when None.
        log_config: a ``logging.config.dictConfig`` document (YAML, TOML or JSON) for the
            standard library's loggers, applied after kitegreen's handler and formatter are
            made; see :func:`apply_log_config`.

    Raises:
        ConfigError: ``log_config`` cannot be read or is not a valid dictConfig document.
    """
    stream = stream or sys.stderr
    if fmt == "auto":
        fmt = "console" if _is_terminal(stream) else "json"
    levelno: int = logging.getLevelName(level.upper())
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        tracing.add_trace_ids,
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
        wrapper_class=structlog.make_filtering_bound_logger(levelno),
        # One write() per line, newline included (print() makes two): with --workers N several
        # processes share standard error, and a pipe keeps a write of up to 4 KiB whole, where
        # two writes per line could interleave with another process's line.
        logger_factory=structlog.WriteLoggerFactory(stream),
        cache_logger_on_first_use=True,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[structlog.stdlib.add_logger_name, add_extra, *shared],
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *renderer],
    )
    # StreamHandler writes the line and its newline in one write(), as above.
    handler = logging.StreamHandler(stream)
    handler.set_name(KITEGREEN)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    for old in [h for h in root.handlers if h.get_name() == KITEGREEN]:
        root.removeHandler(old)
    # Python's warnings are printed bare otherwise, in the middle of the JSON stream.
    logging.captureWarnings(True)
    if log_config is None:
        root.addHandler(handler)
        root.setLevel(levelno)
        return
    apply_log_config(Path(log_config), handler, formatter, levelno)


def apply_log_config(
    path: Path, handler: logging.Handler, formatter: logging.Formatter, levelno: int
) -> None:
    """Apply the ``logging.config.dictConfig`` document in ``path``.

    The document may refer to kitegreen's handler and formatter by the name ``kitegreen``
    (its own definitions of that name win). Without a ``root`` section, the root logger gets
    kitegreen's handler, so that records no handler of the document takes still come out
    formatted. The root logger's level is ``levelno`` unless the document gives one.
    ``version`` defaults to 1.

    Raises:
        ConfigError: the file cannot be read, or ``dictConfig`` refuses the document.
    """
    from kitegreen.config.loader import read_document

    document = read_document(path, "log config file")
    if not isinstance(document, Mapping):
        raise ConfigError(
            f"log config file {path} must hold a dictConfig mapping, got {type(document).__name__}",
            field="log_config",
        )
    config: dict[str, Any] = copy.deepcopy(dict(document))
    config.setdefault("version", 1)
    # An empty section in YAML is None.
    config["formatters"] = {
        KITEGREEN: {"()": lambda: formatter},
        **(config.get("formatters") or {}),
    }
    config["handlers"] = {KITEGREEN: {"()": lambda: handler}, **(config.get("handlers") or {})}
    config.setdefault("root", {"handlers": [KITEGREEN]})
    # dictConfig sets a level only where the document gives one.
    logging.getLogger().setLevel(levelno)
    try:
        logging.config.dictConfig(config)
    except (ValueError, TypeError, AttributeError, ImportError) as exc:
        # dictConfig wraps the cause in "Unable to configure handler 'x'"; both help.
        cause = f": {exc.__cause__}" if exc.__cause__ is not None else ""
        raise ConfigError(
            f"log config file {path} is not a valid dictConfig document: {exc}{cause}",
            field="log_config",
        ) from None


def handler_descriptors() -> set[int]:
    """The descriptors the standard library's logging handlers write to (files, sockets).

    A forked worker closes every descriptor it was not told to keep; these are kept, or a
    handler made by a ``--log-config`` document in the arbiter would write to a closed
    descriptor, or to whatever the worker opened next under its number: a client's socket.
    """
    loggers = [logging.getLogger()]
    loggers += [
        v for v in logging.Logger.manager.loggerDict.values() if isinstance(v, logging.Logger)
    ]
    fds: set[int] = set()
    for logger in loggers:
        for handler in logger.handlers:
            for owner in ("stream", "socket", "sock"):
                fileno = getattr(getattr(handler, owner, None), "fileno", None)
                if fileno is None:
                    continue
                try:
                    fds.add(int(fileno()))
                except (OSError, ValueError, TypeError):  # closed, or not a real descriptor
                    continue
    return fds


def log_greenlet_errors() -> None:
    """Log a greenlet's uncaught exception as one line, with its traceback, instead of gevent's
    bare text; idempotent.

    gevent's hub prints the traceback and then ``<Greenlet ...> failed with KeyError`` to
    standard error in several writes, in the middle of the JSON stream (a handler that spawns
    a greenlet which raises is enough). Only the launcher calls this, since it owns its
    process. The hub's class is changed rather than this hub: a forked worker starts a new hub
    (``workers/fork.py``). If logging fails, gevent's own printing is the fallback.
    """
    import gevent

    hub_class = type(gevent.get_hub())
    gevent_print = hub_class.print_exception
    if getattr(gevent_print, "_kitegreen", False):
        return
    log = structlog.get_logger("gevent")

    def print_exception(hub: Any, context: Any, kind: Any, value: Any, tb: Any) -> None:
        try:
            where = None if context is None else hub.format_context(context)
            log.error("greenlet failed", greenlet=where, exc_info=(kind, value, tb))
        except Exception:  # noqa: BLE001 - this must not raise; gevent's printing still works
            gevent_print(hub, context, kind, value, tb)

    print_exception._kitegreen = True  # type: ignore[attr-defined]
    hub_class.print_exception = print_exception


_RECORD_ATTRIBUTES = frozenset(
    logging.LogRecord("name", 0, "pathname", 0, "msg", (), None).__dict__
) | {"message", "asctime"}
"""A LogRecord's own attributes, and those a ``logging.Formatter`` adds when another handler
formatted the record first: anything else on a record came from ``extra=``."""


def add_extra(logger: Any, method: str, event: EventDict) -> EventDict:
    """A structlog processor for ``logging`` records: the fields given with ``extra=``.

    structlog's ``ExtraAdder`` would also copy ``message`` and ``asctime`` when another
    handler's formatter ran first, and would let an extra field replace ``event``.
    """
    record = event.get("_record")
    if record is not None:
        for key, value in record.__dict__.items():
            if key not in _RECORD_ATTRIBUTES and key not in event:
                event[key] = value
    return event


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
