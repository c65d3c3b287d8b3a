"""``docs/configuration.md``, generated from the :class:`~kitegreen.Config` fields' metadata.

The same metadata that ``--help`` prints (:mod:`kitegreen.config.help`) becomes one Markdown
table per ``--help`` group, so the reference page cannot drift from the code: a test compares
the committed file with :func:`render`. Regenerate it with::

    .venv/bin/python -m kitegreen.config.docs > docs/configuration.md
"""

from __future__ import annotations

import dataclasses
import sys
import textwrap
import typing
from typing import Any

from kitegreen.config.help import default_text, placeholder
from kitegreen.config.loader import _FILE_ALIASES
from kitegreen.config.names import CONFIG_FILE_ENV, ENV_ALIASES, env_names
from kitegreen.config.settings import GROUPS, Config, Doc, flag_names

_TYPES: dict[str, Any] = typing.get_type_hints(Config)

COMMAND = ".venv/bin/python -m kitegreen.config.docs > docs/configuration.md"
"""The command that regenerates the committed page, quoted by the staleness test."""

_INTRO = f"""\
<!-- Generated from kitegreen/config/settings.py by `{COMMAND}`; do not edit. -->

# Configuration

Every setting is a field of `kitegreen.Config`, a frozen dataclass validated when it is built.

## Where settings come from

Highest first:

1. launcher flags (`--limit-qps 2000`);
2. environment variables: `KITE_<FIELD>` (`KITE_LIMIT_QPS=2000`), and the names kite and Consul
   use, listed with each setting below (when both are set, `KITE_<FIELD>` wins);
3. a YAML or TOML file, named by `--config FILE` or `{CONFIG_FILE_ENV}`: a mapping of field
   names to values. Keys match case- and underscore-insensitively, so kite's CamelCase keys
   work (`ServicePort`, `LimitQps`), and kite's own names are accepted too:
{{file_aliases}};
4. the `Config` given to `RpcServer` in code;
5. the defaults below.

A `KITE_` variable that names no setting is left alone (it may be kite's own); a file key or a
flag that names no setting is refused with the nearest one
(`unknown setting 'prot' in config file kite.yml; did you mean 'port'?`). A malformed file is
refused with its path and the line
(`config file kite.yml is not valid YAML at line 3, column 1: ...`).

## Values

- Durations are seconds, or Go-style strings: `500ms`, `3s`, `1m` (units `ns`, `us`, `ms`,
  `s`, `m`, `h`).
- Switches take `true`/`false`, `yes`/`no`, `on`/`off` or `1`/`0`; as flags, `--x` and
  `--no-x`.
- Lists (`trusted_proxies`) and mappings (`endpoint_qps_limits`) are comma-separated in flags
  and the environment (`10.0.0.0/8,fd00::/8`, `echo=100,ping=500`), or lists and mappings in a
  file.
- A limit of 0 switches that limit off.
- A bad value is refused with the field, the source and what was expected:
  `kitegreen: limit_qps must be an integer >= 0, got -5 (from KITE_LIMIT_QPS)`.

`kitegreen MODULE:ATTR --check-config` prints the effective settings as JSON (a secret shown
only as set) and binds nothing. Settings marked *restart* are held by the arbiter when running
with `--workers`: a rolling reload (SIGHUP) keeps them, and only a restart changes them.

## Settings
"""


def _cell(text: str) -> str:
    """``text`` made safe inside a Markdown table cell."""
    return text.replace("|", "\\|")


def _row(field: dataclasses.Field[Any]) -> str:
    doc: Doc = field.metadata["doc"]
    if _TYPES[field.name] is bool:
        flags = ", ".join(f"`{flag}`, `--no-{flag[2:]}`" for flag in flag_names(field.name))
    else:
        shown = _cell(placeholder(field.name))
        flags = ", ".join(f"`{flag} {shown}`" for flag in flag_names(field.name))
    env = ", ".join(f"`{name}`" for name in env_names(field.name))
    meaning = _cell(doc.help)
    if doc.restart:
        meaning += " (*restart*)"
    return f"| `{field.name}` | {flags} | {env} | {_cell(default_text(field)) or '-'} | {meaning} |"


def render() -> str:
    """The whole of ``docs/configuration.md``."""
    aliases = textwrap.fill(
        ", ".join(f"`{alias}` for `{name}`" for alias, name in sorted(_FILE_ALIASES.items())),
        width=96,
        initial_indent="   ",
        subsequent_indent="   ",
        break_on_hyphens=False,
    )
    parts = [_INTRO.replace("{file_aliases}", aliases)]
    fields = dataclasses.fields(Config)
    for group, about in GROUPS.items():
        parts.append(f"\n### {group.capitalize()}\n")
        if about:
            parts.append(f"\n{about[0].upper()}{about[1:]}.\n")
        parts.append("\n| setting | flag | environment | default | meaning |\n")
        parts.append("|---|---|---|---|---|\n")
        parts.extend(_row(f) + "\n" for f in fields if f.metadata["doc"].group == group)
    parts.append(
        "\nEnvironment variables read besides `KITE_<FIELD>`: "
        + ", ".join(f"`{var}` (`{ENV_ALIASES[var]}`)" for var in sorted(ENV_ALIASES))
        + f", and `{CONFIG_FILE_ENV}` (the config file).\n"
    )
    return "".join(parts)


if __name__ == "__main__":
    sys.stdout.write(render())
