"""gunicorn's habits on kitegreen's command line: ``-b/--bind``, and gunicorn's flags that
kitegreen does not have, each met with its equivalent or the reason there is none.

A team swapping gunicorn (+gunicorn_thrift) for kitegreen arrives with gunicorn's flags in its
scripts. The nearest spelling is the wrong answer for many of them (``--timeout`` is not
``--idle-timeout``, ``--max-requests`` is not ``--max-frame-size``), so they are answered from
a table instead.
"""

from __future__ import annotations

from typing import Any

_LISTEN_FLAGS = {
    "host": "--host",
    "port": "--port",
    "unix_socket": "--unix",
    "listen_type": "--listen-type",
}
"""The settings ``-b/--bind`` sets, and their own flags."""


def bind_flags(binds: list[str], flags: dict[str, Any]) -> dict[str, Any]:
    """The listen settings that ``-b/--bind`` (gunicorn's way of spelling them) stands for.

    ``HOST:PORT``, ``[IPV6]:PORT`` and a bare ``HOST`` (the port setting unchanged) listen on
    TCP; ``unix:PATH`` on a Unix socket. The listen type is set too, so that the flag beats a
    Unix socket (or a TCP address) set in the environment, the file or the code.

    Args:
        binds: every ``-b`` given.
        flags: the other setting flags given, keyed by field name.

    Raises:
        ValueError: more than one address, one that is not HOST:PORT or unix:PATH, or one
            given with the flags it sets.
    """
    if len(binds) > 1:
        raise ValueError(
            f"-b/--bind given {len(binds)} times: kitegreen listens on one address "
            "(run one instance per address)"
        )
    clash = [flag for name, flag in _LISTEN_FLAGS.items() if name in flags]
    if clash:
        raise ValueError(f"-b/--bind sets where to listen; give it or {', '.join(clash)}")
    address = binds[0]
    for prefix in ("unix://", "unix:"):
        if address.startswith(prefix):
            path = address[len(prefix) :]
            if not path:
                raise ValueError(f"-b/--bind {address!r}: unix: needs a path")
            return {"unix_socket": path, "listen_type": "unix"}
    if address.startswith("fd://"):
        raise ValueError(
            f"-b/--bind {address!r}: listening on an inherited descriptor is not supported"
        )
    if address.startswith("["):  # [IPV6]:PORT or [IPV6]
        host, sep, rest = address[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise ValueError(f"-b/--bind {address!r}: expected [IPV6]:PORT")
        port = rest[1:] if rest else None
    elif address.count(":") == 1:
        host, _, port = address.partition(":")
    else:  # a name, an IPv4 address, or a bare IPv6 address
        host, port = address, None
    out: dict[str, Any] = {"listen_type": "tcp"}
    if host:
        out["host"] = host
    if port is not None:
        if not port.isdigit() or int(port) > 65535:
            raise ValueError(
                f"-b/--bind {address!r}: the port must be a number from 0 to 65535, got {port!r}"
            )
        out["port"] = port
    return out


_TIMEOUT = (
    "--worker-timeout",
    "gunicorn's --timeout: seconds a worker's hub may stay blocked before the arbiter replaces it",
)
_NOT_A_FILE = (
    "",
    "logs go to standard error, one line per event; to send them to a file or syslog too, "
    "give a dictConfig document to --log-config",
)
_KEEP_ALIVE = ("--idle-timeout", "how long a kept-alive connection may wait for its next request")
_TRUSTED = (
    "--trusted-proxies",
    "networks whose connections may tell the caller's address in a header",
)
_NO_TLS = ("", "TLS is not supported: terminate it in a sidecar or a proxy")
_NO_USER = ("", "kitegreen does not switch user or group: start it as the user it runs as")

GUNICORN_FLAGS: dict[str, tuple[str, str]] = {
    "--timeout": _TIMEOUT,
    "-t": _TIMEOUT,
    "--graceful-timeout": (
        "--exit-wait-time",
        "how long a stop lets requests in flight finish before cutting them off",
    ),
    "--keep-alive": _KEEP_ALIVE,
    "--keepalive": _KEEP_ALIVE,
    "--threads": (
        "",
        "kitegreen has no threads to set: each connection is served by a greenlet, and "
        "--limit-connections bounds how many are open",
    ),
    "--worker-class": ("", "kitegreen's workers are always gevent's; there is none to choose"),
    "-k": ("", "kitegreen's workers are always gevent's; there is none to choose"),
    "--worker-connections": ("--limit-connections", "most connections open at once"),
    "--access-logfile": (
        "--access-log",
        "one line per request, on standard error with the other lines; a file: --log-config",
    ),
    "--access-logformat": (
        "",
        "the access line's fields are fixed (docs/logging.md); render them with --log-format",
    ),
    "--error-logfile": _NOT_A_FILE,
    "--log-file": _NOT_A_FILE,
    "--log-syslog": _NOT_A_FILE,
    "--loglevel": ("--log-level", "the lowest level logged, any case"),
    "--log-config-dict": ("--log-config", "a dictConfig document in a YAML, TOML or JSON file"),
    "--log-config-json": ("--log-config", "a dictConfig document in a YAML, TOML or JSON file"),
    "-c": ("--config", "settings in a YAML or TOML file; gunicorn's Python files are not read"),
    "--print-config": ("--check-config", "prints the effective settings as JSON and exits"),
    "--daemon": ("", "kitegreen does not daemonize: run it under a supervisor (systemd, ...)"),
    "-D": ("", "kitegreen does not daemonize: run it under a supervisor (systemd, ...)"),
    "--pid": ("", "kitegreen writes no pid file: its supervisor knows its pid"),
    "-p": ("", "kitegreen writes no pid file: its supervisor knows its pid"),
    "--forwarded-allow-ips": _TRUSTED,
    "--proxy-allow-from": _TRUSTED,
    "--name": (
        "--service-name",
        "names the service in logs, metrics and Consul; the process title is not set",
    ),
    "-n": (
        "--service-name",
        "names the service in logs, metrics and Consul; the process title is not set",
    ),
    "--statsd-host": ("", "metrics are Prometheus's, on the debug server's /metrics"),
    "--certfile": _NO_TLS,
    "--keyfile": _NO_TLS,
    "--ca-certs": _NO_TLS,
    "--user": _NO_USER,
    "-u": _NO_USER,
    "--group": _NO_USER,
    "-g": _NO_USER,
    "--chdir": ("", "kitegreen does not change directory: start it in the application's"),
    "--limit-request-line": (
        "--max-frame-size",
        "the largest Thrift frame, string or container accepted from a peer",
    ),
}
"""gunicorn's flags that kitegreen does not have: the flag to use instead (empty: none), and
what it means or why there is none. A misspelling is met with the nearest flag; a gunicorn
habit, with its equivalent (``--timeout`` is not ``--idle-timeout``)."""


def instead_of(flag: str) -> str:
    """What to say about ``flag`` if it is one of gunicorn's; empty if it is not."""
    if flag not in GUNICORN_FLAGS:
        return ""
    instead, why = GUNICORN_FLAGS[flag]
    return f"did you mean {instead}? ({why})" if instead else why
