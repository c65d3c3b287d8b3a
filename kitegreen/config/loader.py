"""Layering a :class:`~kitegreen.Config` from a file, the environment and launcher flags.

Precedence, highest first: launcher flags, environment variables, the config file, the values
given in code (``RpcServer(config=...)``), the defaults. Every value read from outside is
parsed knowing where it came from, so an error names the field, the source and what was
expected::

    ConfigError: limit_qps must be an integer >= 0, got -5 (from KITE_LIMIT_QPS)
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import sys
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from kitegreen.config.names import CONFIG_FILE_ENV, ENV_ALIASES, ENV_PREFIX
from kitegreen.config.settings import Config, flag_name, install_loader
from kitegreen.exceptions import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib


# kite's kite.yml spelled settings in CamelCase; file keys are matched case- and
# underscore-insensitively, and these names from kite map onto ours.
_FILE_ALIASES: Mapping[str, str] = types.MappingProxyType(
    {
        "serviceport": "port",
        "serviceaddr": "host",
        "servicecluster": "cluster",
        "limitconn": "limit_connections",
        "limitconns": "limit_connections",
        "connlimit": "limit_connections",
        "qpslimit": "limit_qps",
        "realip": "get_real_ip",
        "enabledebug": "enable_debug_server",
    }
)

# Words a numeric setting accepts besides numbers, and what each stands for.
_KEYWORDS: Mapping[str, Mapping[str, Callable[[], Any]]] = types.MappingProxyType(
    {"workers": types.MappingProxyType({"auto": lambda: os.cpu_count() or 1})}
)

_FIELDS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(Config))
_TYPES: dict[str, Any] = typing.get_type_hints(Config)
_NORMALISED = {f.replace("_", ""): f for f in _FIELDS}
_DURATION = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*(ns|us|µs|ms|s|m|h)?\s*$")
_DURATION_UNITS = {
    None: 1.0,
    "s": 1.0,
    "ms": 1e-3,
    "us": 1e-6,
    "µs": 1e-6,
    "ns": 1e-9,
    "m": 60.0,
    "h": 3600.0,
}
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}
_TOML_POSITION = re.compile(r"^(?P<what>.*?)\s*\(at (?P<where>line \d+, column \d+)\)$")


def load(
    *,
    base: Config,
    file: str | os.PathLike[str] | None = None,
    env: Mapping[str, str] | None = None,
    flags: Mapping[str, Any] | None = None,
) -> Config:
    """Layer the config file, the environment and flags on top of ``base``.

    See :meth:`Config.load`, the public way in, for the arguments.

    Raises:
        ConfigError: a value is malformed or out of range; the message names the source.
    """
    env = os.environ if env is None else env
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}

    path = file if file is not None else env.get(CONFIG_FILE_ENV) or None
    if path is not None:
        for name, raw in read_file(Path(path)).items():
            _set(values, sources, name, raw, f"config file {path}")
    for var, name in ENV_ALIASES.items():
        if env.get(var):
            _set(values, sources, name, env[var], var)
    # Only variables naming a field are read: other KITE_ variables belong to kite's own
    # tooling and to the platform, so an unknown one is not ours to refuse.
    for name in _FIELDS:
        var = ENV_PREFIX + name.upper()
        if var in env and env[var] != "":
            _set(values, sources, name, env[var], var)
    for name, raw in (flags or {}).items():
        if raw is not None:
            source = flag_name(name) if name in _TYPES else "--" + name.replace("_", "-")
            _set(values, sources, name, raw, source)

    try:
        return dataclasses.replace(base, **values)
    except ConfigError as exc:
        where = sources.get(exc.field or "")
        raise (exc.with_source(where) if where else exc) from None


def load_config(
    base: Config | None = None,
    *,
    file: str | os.PathLike[str] | None = None,
    env: Mapping[str, str] | None = None,
    argv: Sequence[str] | None = None,
    flags: Mapping[str, Any] | None = None,
) -> Config:
    """The settings of a server started from code, layered as the launcher layers them.

    Precedence, highest first: flags (``flags``, then ``argv``), the environment (``KITE_*``
    and kite's own variable names), the config file, ``base`` (the values in code), the
    defaults. So an application that embeds the server (with a WSGI app in one process, say)
    is configured by its deployment exactly as ``kitegreen MODULE:ATTR`` would be::

        config = kitegreen.load_config(kitegreen.Config(service_name="orders", port=9090))
        server = kitegreen.RpcServer(orders_thrift.Orders, Handler(), config)

    Args:
        base: the values given in code; the defaults when None.
        file: a YAML or TOML config file; when None, ``--config`` in ``argv``, else
            ``KITE_CONFIG_FILE`` in the environment, names it, if either is set.
        env: where ``KITE_*`` variables are read; ``os.environ`` when None.
        argv: the launcher's setting flags (``["--port", "9000", "--workers", "2"]``, also
            ``--config PATH`` and ``-b HOST:PORT``); nothing else may be in it.
        flags: values keyed by field name, over everything else (None values are ignored).

    Returns:
        A new, validated Config.

    Raises:
        ConfigError: a value is malformed or out of range, or ``argv`` holds something that
            is not a setting flag; the message names the source.
    """
    given: dict[str, Any] = {}
    if argv is not None:
        argv_file, given = _parse_argv(argv)
        file = file if file is not None else argv_file
    given.update({k: v for k, v in (flags or {}).items() if v is not None})
    return load(base=base or Config(), file=file, env=env, flags=given)


def _parse_argv(argv: Sequence[str]) -> tuple[str | None, dict[str, Any]]:
    """``--config`` and the setting flags in ``argv``, parsed as the launcher parses them."""
    import argparse

    from kitegreen.config import gunicorn
    from kitegreen.config.help import add_setting_flags

    class _Parser(argparse.ArgumentParser):
        def error(self, message: str) -> typing.NoReturn:
            raise ConfigError(f"argv: {message}")

    parser = _Parser(prog="load_config", add_help=False, allow_abbrev=False)
    parser.add_argument("--config")
    parser.add_argument("-b", "--bind", action="append")
    add_setting_flags(parser)
    args, extras = parser.parse_known_args(list(argv))
    if extras:
        raise ConfigError(f"argv: {extras[0]!r} is not a setting flag")
    given = {name: getattr(args, name) for name in _FIELDS if getattr(args, name) is not None}
    if args.bind:
        try:
            given.update(gunicorn.bind_flags(args.bind, given))
        except ValueError as exc:
            raise ConfigError(f"argv: {exc}") from None
    return args.config, given


def env_variables() -> dict[str, str]:
    """Every environment variable the loader reads, mapped to the field it sets."""
    names = {ENV_PREFIX + f.upper(): f for f in _FIELDS}
    names.update(ENV_ALIASES)
    names[CONFIG_FILE_ENV] = "(the config file to read)"
    return names


def read_file(path: Path) -> dict[str, Any]:
    """The settings in a YAML or TOML file, keyed by field name.

    Raises:
        ConfigError: the file cannot be read or parsed (naming the file and the line), or
            holds a key that is not a setting (suggesting the nearest one).
    """
    data = read_document(path, "config file", json=False)
    if not isinstance(data, dict):
        raise ConfigError(
            f"config file {path} must hold a mapping of settings, got {type(data).__name__}"
        )
    out: dict[str, Any] = {}
    for key, value in data.items():
        norm = _normalise_key(str(key))
        name = _NORMALISED.get(norm) or _FILE_ALIASES.get(norm)
        if name is None:
            raise ConfigError(f"unknown setting {key!r} in config file {path}; {_nearest(norm)}")
        out[name] = value
    return out


def read_document(path: Path, what: str, *, json: bool = True) -> Any:
    """The data in a YAML, TOML or (with ``json``) JSON file, chosen by its suffix.

    Args:
        path: the file.
        what: what the file is, for error messages (``config file``, ``log config file``).
        json: whether a ``.json`` file is accepted.

    Raises:
        ConfigError: the file cannot be read or parsed; the message names it and the line.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read {what} {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"{what} {path} is not UTF-8 text: byte {exc.start} is {exc.object[exc.start]:#x}"
        ) from None
    suffix = path.suffix.lower()
    if suffix == ".toml":
        return _parse_toml(path, text, what)
    if suffix in (".yml", ".yaml"):
        return _parse_yaml(path, text, what)
    if json and suffix == ".json":
        return _parse_json(path, text, what)
    got = suffix or "no suffix"
    kinds = ".yml, .yaml, .toml or .json" if json else ".yml, .yaml or .toml"
    raise ConfigError(f"{what} {path} must end in {kinds}, got {got!r}")


def _parse_json(path: Path, text: str, what: str) -> Any:
    import json

    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(
            f"{what} {path} is not valid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}"
        ) from None


def _parse_yaml(path: Path, text: str, what: str) -> Any:
    import yaml

    try:
        return yaml.safe_load(text) or {}
    except yaml.MarkedYAMLError as exc:
        # PyYAML names the stream "<unicode string>"; the file and the line are what help.
        mark = exc.problem_mark or exc.context_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = exc.problem or exc.context or "malformed"
        raise ConfigError(f"{what} {path} is not valid YAML{where}: {problem}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{what} {path} is not valid YAML: {exc}") from None


def _parse_toml(path: Path, text: str, what: str) -> Any:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        # tomllib puts the position at the end, "(at line 2, column 7)"; lead with it, as the
        # YAML message does.
        match = _TOML_POSITION.match(str(exc))
        detail = f" at {match['where']}: {match['what']}" if match else f": {exc}"
        raise ConfigError(f"{what} {path} is not valid TOML{detail}") from None


def _normalise_key(key: str) -> str:
    return key.replace("_", "").replace("-", "").lower()


def _nearest(norm: str) -> str:
    """ "did you mean 'port'?", or where the settings are listed when nothing is near."""
    candidates = {**_NORMALISED, **_FILE_ALIASES}
    close = difflib.get_close_matches(norm, candidates, n=1, cutoff=0.75)
    if close:
        return f"did you mean {candidates[close[0]]!r}?"
    return "python -m kitegreen --help lists the settings"


def _set(values: dict[str, Any], sources: dict[str, str], name: str, raw: Any, source: str) -> None:
    if name not in _TYPES:
        raise ConfigError(
            f"unknown setting {name!r}; {_nearest(_normalise_key(name))}", field=name, source=source
        )
    try:
        values[name] = _parse(name, raw)
    except ConfigError as exc:
        raise exc.with_source(source) from None
    sources[name] = source


def _parse(name: str, raw: Any) -> Any:
    """Turn a raw value (a string from the environment, or YAML/TOML data) into the field's type."""
    keywords = _KEYWORDS.get(name, {})
    if isinstance(raw, str) and raw.strip().lower() in keywords:
        return keywords[raw.strip().lower()]()
    hint = _TYPES[name]
    if isinstance(hint, types.UnionType):  # X | None: empty means None
        if raw is None or (isinstance(raw, str) and raw.strip() == ""):
            return None
        hint = next(arg for arg in typing.get_args(hint) if arg is not type(None))
    origin = typing.get_origin(hint)
    if hint is bool:
        return _parse_bool(name, raw)
    if hint is int:
        return _parse_int(name, raw, keywords)
    if hint is float:
        return _parse_duration(name, raw)
    if hint is str:
        if isinstance(raw, (dict, list)):
            raise ConfigError(f"{name} must be a string, got {raw!r}", field=name)
        return str(raw)
    if origin is tuple:
        return _parse_list(name, raw)
    if origin is Mapping:
        return _parse_pairs(name, raw)
    raise AssertionError(f"no parser for {name}: {hint!r}")  # pragma: no cover - a new type


def _parse_bool(name: str, raw: Any) -> bool:
    if isinstance(raw, bool):
        return raw
    text = str(raw).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise ConfigError(f"{name} must be true or false, got {raw!r}", field=name)


def _parse_int(name: str, raw: Any, keywords: Mapping[str, Any]) -> int:
    if isinstance(raw, int) and not isinstance(raw, bool):
        return raw
    try:
        return int(str(raw).strip())
    except ValueError:
        expected = " or ".join(["an integer", *keywords])
        raise ConfigError(f"{name} must be {expected}, got {raw!r}", field=name) from None


def _parse_duration(name: str, raw: Any) -> float:
    if isinstance(raw, (int, float)) and not isinstance(raw, bool):
        return float(raw)
    match = _DURATION.match(str(raw))
    if not match:
        raise ConfigError(
            f"{name} must be a duration in seconds (3, 0.5) or with a unit (500ms, 3s, 1m), "
            f"got {raw!r}",
            field=name,
        )
    return float(match.group(1)) * _DURATION_UNITS[match.group(2)]


def _parse_list(name: str, raw: Any) -> tuple[Any, ...]:
    """A YAML/TOML list as it is; a string split at commas (``10.0.0.0/8, fd00::/8``)."""
    if isinstance(raw, (list, tuple)):
        return tuple(raw)
    if isinstance(raw, str):
        return tuple(item.strip() for item in raw.split(",") if item.strip())
    raise ConfigError(f"{name} must be a list or a comma-separated string, got {raw!r}", field=name)


def _parse_pairs(name: str, raw: Any) -> dict[str, Any]:
    """A mapping as it is; ``method=qps,method=qps`` from the environment or a flag."""
    if isinstance(raw, Mapping):
        return dict(raw)
    pairs: dict[str, int] = {}
    for item in filter(None, (p.strip() for p in str(raw).split(","))):
        method, sep, qps = item.partition("=")
        if not sep or not qps.strip().isdigit():
            raise ConfigError(
                f"{name} must be method=qps pairs separated by commas, got {raw!r}", field=name
            )
        pairs[method.strip()] = int(qps)
    return pairs


install_loader(load, env_variables)
