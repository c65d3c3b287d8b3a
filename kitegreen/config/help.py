"""The launcher's setting flags and ``--help`` text, generated from the fields' metadata.

Each :class:`~kitegreen.Config` field documents itself (:class:`~kitegreen.config.settings.Doc`);
this module turns that into argparse groups: the flag, a typed placeholder (``SECONDS``,
``INT``, ``{json,console}``, ``--x/--no-x`` for booleans), the help line, the default read
from the field itself and the environment variables that set it::

    --limit-qps INT     most requests per second, server-wide (default 50000)
                        [env KITE_LIMIT_QPS]
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from collections.abc import Mapping
from typing import Any

from kitegreen.config.hook_settings import import_path
from kitegreen.config.names import env_names
from kitegreen.config.settings import (
    DEFAULT_CONSUL_ADDR,
    GROUPS,
    Config,
    Doc,
    flag_names,
    setting_doc,
)
from kitegreen.exceptions import ConfigError

_TYPES: dict[str, Any] = typing.get_type_hints(Config)
_TYPE_PLACEHOLDERS: Mapping[Any, str] = types.MappingProxyType(
    {int: "INT", float: "SECONDS", str: "TEXT"}
)
REDACTED = "(set, not shown)"
"""What ``--check-config`` shows in place of a secret that is set."""


_ENV_TAG = " [env "


class HelpFormatter(argparse.HelpFormatter):
    """argparse's formatter, with room for the longer placeholders before the help column and
    each flag's ``[env ...]`` kept whole, so that no variable name is split across lines."""

    def __init__(self, prog: str) -> None:
        super().__init__(prog, max_help_position=36)

    def _split_lines(self, text: str, width: int) -> list[str]:
        meaning, tag, variables = text.partition(_ENV_TAG)
        if not tag:
            return super()._split_lines(text, width)
        whole = f"{tag.strip()} {variables}"
        if len(whole) > width:
            return [*super()._split_lines(meaning, width), whole]
        # Wrapped as one word: NUL is not whitespace to argparse's wrapper.
        glued = whole.replace(" ", "\0")
        return [
            line.replace("\0", " ") for line in super()._split_lines(f"{meaning} {glued}", width)
        ]


def add_setting_flags(parser: argparse.ArgumentParser) -> None:
    """Add a flag for every :class:`~kitegreen.Config` field, in its ``--help`` group.

    Every flag defaults to None (not given), so that the loader can tell a flag from the
    environment and the file below it; values stay text for the loader to parse and check.
    """
    groups = {key: parser.add_argument_group(key, what or None) for key, what in GROUPS.items()}
    for f in dataclasses.fields(Config):
        doc: Doc = f.metadata["doc"]
        group = groups[doc.group]
        text = help_line(f).replace("%", "%%")
        if _TYPES[f.name] is bool:
            group.add_argument(
                *flag_names(f.name),
                dest=f.name,
                action=argparse.BooleanOptionalAction,
                default=None,
                help=text,
            )
        else:
            group.add_argument(
                *flag_names(f.name),
                dest=f.name,
                metavar=placeholder(f.name),
                default=None,
                help=text,
            )


def placeholder(name: str) -> str:
    """The value placeholder of the field ``name``: its own, its choices, or its type's."""
    doc = setting_doc(name)
    if doc.placeholder:
        return doc.placeholder
    if doc.choices:
        return "{" + ",".join(doc.choices) + "}"
    hint = _TYPES[name]
    if isinstance(hint, types.UnionType):
        hint = next(arg for arg in typing.get_args(hint) if arg is not type(None))
    return _TYPE_PLACEHOLDERS.get(hint, "VALUE")


def help_line(field: dataclasses.Field[Any]) -> str:
    """One field's help: what it means, its default, the environment variables that set it."""
    doc: Doc = field.metadata["doc"]
    default = default_text(field)
    shown = f" (default: {default})" if default else ""
    return f"{doc.help}{shown}{_ENV_TAG}{', '.join(env_names(field.name))}]"


def default_text(field: dataclasses.Field[Any]) -> str:
    """The field's default as ``--help`` shows it; empty when there is nothing to show."""
    doc: Doc = field.metadata["doc"]
    if doc.default_text:
        return doc.default_text
    value: Any = field.default
    if value is dataclasses.MISSING and callable(field.default_factory):
        value = field.default_factory()
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, float):
        return f"{value:g}"
    if value in ("", None) or (isinstance(value, (tuple, Mapping)) and not value):
        return ""
    return str(value)


def describe(config: Config) -> dict[str, Any]:
    """``config`` as plain JSON data, secrets redacted: what ``--check-config`` prints.

    Settings whose default is derived (``debug_port``, ``drain_time``, ``consul_addr``) show
    the value the server will use, so that, say, the metrics port can be read without
    starting it; a ``debug_port`` of 0 means a free port, logged at start, and None that there
    is no debug server.
    """
    out: dict[str, Any] = {}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if f.metadata["doc"].secret and value:
            value = REDACTED
        elif isinstance(value, Mapping):
            value = dict(value)
        elif isinstance(value, tuple):
            value = list(value)
        elif callable(value):
            try:
                value = import_path(f.name, value)
            except ConfigError:
                value = repr(value)
        out[f.name] = value
    out.update(_derived(config))
    return out


def _derived(config: Config) -> dict[str, Any]:
    """The values the server computes for the settings left to their derived defaults."""
    # Who registers: the same rule as registry.make_registrar.
    registers = (
        config.register and config.effective_listen_type == "tcp" and not config.service_mesh_mode
    )
    return {
        "debug_port": (
            config.effective_debug_port(config.port) if config.enable_debug_server else None
        ),
        "drain_time": config.effective_drain_time(registers),
        "consul_addr": config.consul_addr or DEFAULT_CONSUL_ADDR,
    }
