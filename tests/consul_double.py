"""A Consul agent double: Consul's HTTP API, over real HTTP, for the real py-consul client.

No Consul server can be installed where the tests run, so :class:`ConsulDouble` plays a local
agent (and the servers behind it) on ``127.0.0.1``: a gevent ``pywsgi`` server with a small WSGI
app, so that a blocking query parks one greenlet and never blocks other requests. It needs a
process where gevent has patched the standard library (``tests/conftest.py`` does it first).

What it follows from Consul's documented HTTP API:

* ``PUT /v1/agent/service/register`` (keys matched case-insensitively, as Consul decodes
  them; a service's checks get the IDs ``service:<ID>``, or ``service:<ID>:<n>`` when it has
  several), ``PUT /v1/agent/service/deregister/<id>`` (404 "Unknown service ID" when unknown),
  ``GET /v1/agent/services``, ``GET /v1/agent/service/<id>``, ``GET /v1/agent/checks``,
  ``PUT /v1/agent/check/register``, ``PUT /v1/agent/check/deregister/<id>``,
  ``PUT /v1/agent/check/pass|warn|fail/<id>?note=`` and ``PUT /v1/agent/check/update/<id>``
  (404 "Unknown check ID" for an unknown check, 500 "does not have associated TTL" for a check
  that is not a TTL check). TTL checks expire to critical ("TTL expired") when not updated in
  time; re-registering keeps the status of an existing check, as Consul does.
* ``GET /v1/kv/<key>`` (``recurse``, ``keys``, ``separator``, ``raw``; 404 when nothing
  matches), ``PUT /v1/kv/<key>`` (``flags``, ``cas``; answers ``true``/``false``),
  ``DELETE /v1/kv/<key>`` (``recurse``, ``cas``), blocking reads with ``index`` and ``wait``.
* A raft-like index: every write moves a global index; a KV read reports the key's
  ModifyIndex, or for a prefix the highest ModifyIndex or deletion (tombstone) index under it,
  or else the KV table's index (a missing key: the index of the last KV write or delete).
* ``GET /v1/status/leader``, ``GET /v1/status/peers``, a minimal ``GET /v1/agent/self``.
* Every response carries ``X-Consul-Index``, ``X-Consul-KnownLeader`` and
  ``X-Consul-LastContact``. The ACL token (``?token=``, ``X-Consul-Token`` or
  ``Authorization: Bearer``, in Consul's order) of each request is recorded; with
  :attr:`ConsulDouble.acl_token` set, others are refused with 403.

What it does not do: the catalog, health, session (KV ``acquire``/``release`` answer 400),
transaction, event and Connect endpoints; hash-based blocking on agent endpoints; the wait's
random jitter; reaping services after ``DeregisterCriticalServiceAfter``; running HTTP, gRPC or
script checks. TCP checks are probed only when :attr:`ConsulDouble.probe_tcp_checks` is set.
"""

from __future__ import annotations

import base64
import json
import logging
import re
import socket
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import gevent
from gevent.event import Event
from gevent.pool import Pool
from gevent.pywsgi import WSGIHandler, WSGIServer

log = logging.getLogger(__name__)

MODES = ("normal", "slow", "garbage", "error500")
LEADER = "127.0.0.1:8300"
GARBAGE_BODY = b"<html><body>502 Bad Gateway: this is not JSON</body></html>"
ERROR500_BODY = b"rpc error making call: No cluster leader"
MAX_VALUE_SIZE = 512 * 1024
CONSUL_DEFAULT_WAIT = 300.0
"""Consul's wait for a blocking query that names none (5 minutes)."""

_DURATION_UNITS = {
    "ns": 1e-9,
    "us": 1e-6,
    "µs": 1e-6,
    "μs": 1e-6,
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
}
_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|μs|ms|s|m|h)")
_HEALTH = ("passing", "warning", "critical")


def parse_duration(value: Any) -> float:
    """Seconds in a Go duration ("5s", "100ms", "1m30s", "0"); a number is nanoseconds, as in Go.

    Raises:
        ValueError: not a duration.
    """
    if isinstance(value, bool):
        raise ValueError(f"not a duration: {value!r}")
    if isinstance(value, (int, float)):
        return float(value) * 1e-9
    if not isinstance(value, str):
        raise ValueError(f"not a duration: {value!r}")
    text = value.strip()
    sign = 1.0
    if text[:1] in "+-" and text:
        sign = -1.0 if text[0] == "-" else 1.0
        text = text[1:]
    if text == "0":
        return 0.0
    pos, total = 0, 0.0
    for match in _DURATION_PART.finditer(text):
        if match.start() != pos:
            break
        total += float(match.group(1)) * _DURATION_UNITS[match.group(2)]
        pos = match.end()
    if not text or pos != len(text):
        raise ValueError(f"not a duration: {value!r}")
    return sign * total


class SeenRequest(NamedTuple):
    """One request the double received: equal to a plain ``(method, path, token)`` tuple."""

    method: str
    path: str
    token: str | None


@dataclass
class _KVEntry:
    key: str
    value: bytes | None
    flags: int
    create_index: int
    modify_index: int
    lock_index: int = 0
    session: str | None = None

    def as_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "LockIndex": self.lock_index,
            "Key": self.key,
            "Flags": self.flags,
            "Value": base64.b64encode(self.value).decode("ascii") if self.value else None,
            "CreateIndex": self.create_index,
            "ModifyIndex": self.modify_index,
        }
        if self.session:
            doc["Session"] = self.session
        return doc


@dataclass
class _Reply:
    status: int
    body: bytes = b""
    content_type: str = "application/json"
    index: int | None = None
    headers: list[tuple[str, str]] = field(default_factory=list)


class _HTTPError(Exception):
    def __init__(self, status: int, text: str) -> None:
        super().__init__(text)
        self.status = status
        self.text = text


def _json_reply(doc: Any, status: int = 200, index: int | None = None) -> _Reply:
    return _Reply(status, json.dumps(doc).encode("utf-8"), index=index)


def _text_reply(status: int, text: str, index: int | None = None) -> _Reply:
    return _Reply(status, text.encode("utf-8"), "text/plain; charset=utf-8", index=index)


# Check definition keys, lower-cased without underscores (Consul decodes both spellings), to the
# canonical names of Consul's documentation.
_CHECK_KEYS = {
    "checkid": "CheckID",
    "id": "CheckID",
    "name": "Name",
    "status": "Status",
    "notes": "Notes",
    "serviceid": "ServiceID",
    "tcp": "TCP",
    "http": "HTTP",
    "method": "Method",
    "header": "Header",
    "body": "Body",
    "args": "Args",
    "scriptargs": "Args",
    "script": "Script",
    "dockercontainerid": "DockerContainerID",
    "shell": "Shell",
    "grpc": "GRPC",
    "grpcusetls": "GRPCUseTLS",
    "tlsskipverify": "TLSSkipVerify",
    "tlsservername": "TLSServerName",
    "h2ping": "H2PING",
    "udp": "UDP",
    "osservice": "OSService",
    "aliasservice": "AliasService",
    "aliasnode": "AliasNode",
    "interval": "Interval",
    "timeout": "Timeout",
    "ttl": "TTL",
    "deregistercriticalserviceafter": "DeregisterCriticalServiceAfter",
    "successbeforepassing": "SuccessBeforePassing",
    "failuresbeforewarning": "FailuresBeforeWarning",
    "failuresbeforecritical": "FailuresBeforeCritical",
    "outputmaxsize": "OutputMaxSize",
}
_SERVICE_KEYS = {
    "id": "ID",
    "name": "Name",
    "tags": "Tags",
    "address": "Address",
    "port": "Port",
    "meta": "Meta",
    "check": "Check",
    "checks": "Checks",
    "weights": "Weights",
    "enabletagoverride": "EnableTagOverride",
    "taggedaddresses": "TaggedAddresses",
    "kind": "Kind",
    "proxy": "Proxy",
    "connect": "Connect",
    "socketpath": "SocketPath",
    "locality": "Locality",
}
_INTERVAL_TYPES = (
    ("TCP", "tcp"),
    ("HTTP", "http"),
    ("GRPC", "grpc"),
    ("H2PING", "h2ping"),
    ("UDP", "udp"),
    ("OSService", "os_service"),
)


def _canonical(doc: Any, names: dict[str, str]) -> dict[str, Any]:
    if not isinstance(doc, dict):
        raise _HTTPError(400, f"Request decode failed: expected an object, got {doc!r}")
    return {names.get(k.lower().replace("_", ""), k): v for k, v in doc.items()}


def _check_type(defn: dict[str, Any]) -> str:
    """Consul's check type of a definition, validating it as Consul does (400 when invalid)."""
    try:
        if defn.get("TTL") not in (None, "", 0):
            if parse_duration(defn["TTL"]) <= 0:
                raise _HTTPError(400, "Invalid check: TTL must be > 0 for TTL checks")
            return "ttl"
        if defn.get("AliasService"):
            return "alias"
        interval = defn.get("Interval")
        has_interval = interval not in (None, "", 0) and parse_duration(interval) > 0
        for timeout_key in ("Timeout", "DeregisterCriticalServiceAfter"):
            if defn.get(timeout_key) not in (None, ""):
                parse_duration(defn[timeout_key])
    except ValueError as exc:
        raise _HTTPError(400, f"Request decode failed: {exc}") from exc
    if has_interval:
        for key, kind in _INTERVAL_TYPES:
            if defn.get(key):
                return kind
        if defn.get("Args") or defn.get("Script"):
            return "docker" if defn.get("DockerContainerID") else "script"
    raise _HTTPError(
        400,
        "Invalid check: Must provide TTL or ScriptArgs/DockerContainerID/HTTP/TCP/GRPC/H2PING/"
        "UDP/OSService and Interval",
    )


def _split_hostport(target: str) -> tuple[str, int]:
    host, _, port = target.rpartition(":")
    return host.strip("[]"), int(port)


class ConsulDouble:
    """A local Consul agent double on ``127.0.0.1``; see the module docstring for the API covered.

    Args:
        datacenter: the agent's datacenter (another ``?dc=`` answers 500 "No path to
            datacenter", as Consul does).
        node_name: the agent's node name, shown in checks.
        acl_token: when set, requests with another token are refused with 403.
        max_wait: seconds a blocking query may hold at most (Consul: 10 minutes).
    """

    def __init__(
        self,
        *,
        datacenter: str = "dc1",
        node_name: str = "consul-double",
        acl_token: str | None = None,
        max_wait: float = 60.0,
    ) -> None:
        self.host = "127.0.0.1"
        self.datacenter = datacenter
        self.node_name = node_name
        self.acl_token = acl_token
        self.max_wait = max_wait
        self.mode = "normal"
        """``normal``, ``slow`` (delay every response by :attr:`slow_seconds`), ``garbage``
        (200 with a body that is not JSON) or ``error500`` (500 with a text body). In the last
        two the request does nothing."""
        self.slow_seconds = 1.0
        self.probe_tcp_checks = False
        """Run TCP checks (connect to their address) as an agent does; off by default."""
        self.probe_interval_cap = 0.2
        """Seconds between TCP probes at most, whatever the check's Interval."""
        self.services: dict[str, dict[str, Any]] = {}
        """Service ID -> the service as ``GET /v1/agent/services`` shows it."""
        self.registrations: dict[str, dict[str, Any]] = {}
        """Service ID -> the JSON body of its last registration, as sent."""
        self.requests: list[SeenRequest] = []
        """Every request seen: ``(method, path, token)``; the token is None when none was sent."""
        self.request_details: list[dict[str, Any]] = []
        """Every request seen, with its query parameters and body."""
        self._checks: dict[str, dict[str, Any]] = {}
        self._ttl: dict[str, float] = {}  # TTL check ID -> its TTL in seconds
        self._ttl_deadline: dict[str, float] = {}
        self._probes: dict[str, gevent.Greenlet] = {}
        self._kv: dict[str, _KVEntry] = {}
        self._touched: dict[str, int] = {}  # key -> index of its last write or delete
        self._index = 10  # a fresh cluster's raft log is never empty
        self._kv_index = 0
        self._change = Event()
        self._stop_event = Event()
        self._stopping = False
        self._server: WSGIServer | None = None
        self._port = 0
        self._active = 0
        self._idle = Event()
        self._idle.set()
        self._blocked = 0
        self._clients: list[Any] = []

    # -- lifecycle -----------------------------------------------------------------------

    def start(self) -> ConsulDouble:
        """Listen on 127.0.0.1 (an ephemeral port the first time); idempotent."""
        if self._server is not None:
            return self
        self._stopping = False
        self._stop_event.clear()
        self._listen()
        return self

    def stop(self) -> None:
        """Answer blocked queries, stop listening, close clients made by :meth:`client`.

        Idempotent.
        """
        self._stopping = True
        self._stop_event.set()
        self._notify()
        self._kill_probes()
        if self._server is not None:
            # Let woken blocking queries and delayed responses finish writing, then drop the
            # idle keep-alive connections.
            self._idle.wait(2.0)
            server, self._server = self._server, None
            server.stop(timeout=0)
        clients, self._clients = self._clients, []
        for client in clients:
            client.http.session.close()

    def __enter__(self) -> ConsulDouble:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def go_down(self) -> None:
        """Stop listening and drop every connection, blocked queries included: connections
        are then refused. State is kept (see :meth:`restart_empty`)."""
        if self._server is not None:
            server, self._server = self._server, None
            server.stop(timeout=0)

    def come_back(self) -> None:
        """Listen again on the same port after :meth:`go_down`."""
        if self._server is None:
            self._listen()

    @property
    def is_up(self) -> bool:
        return self._server is not None

    @property
    def port(self) -> int:
        return self._port

    @property
    def address(self) -> str:
        """``127.0.0.1:PORT``, as ``CONSUL_HTTP_ADDR`` and kitegreen's ``consul_addr`` take it."""
        return f"{self.host}:{self._port}"

    @property
    def url(self) -> str:
        return f"http://{self.address}"

    def _listen(self) -> None:
        server = WSGIServer(
            (self.host, self._port),
            self._app,
            spawn=Pool(),
            handler_class=_Handler,
            log=None,
            error_log=log,
        )
        server.start()
        self._port = server.address[1]
        self._server = server

    def client(self, token: str | None = None, timeout: float = 2.0, **kwargs: Any) -> Any:
        """A real ``consul.Consul`` for this double; its session is closed by :meth:`stop`.

        The token is set after construction so that ``CONSUL_HTTP_TOKEN`` in the environment
        does not replace it.
        """
        import consul

        c = consul.Consul(
            host=self.host, port=self._port, scheme="http", connections_timeout=timeout, **kwargs
        )
        c.token = token
        self._clients.append(c)
        return c

    # -- test controls -------------------------------------------------------------------

    @property
    def checks(self) -> dict[str, dict[str, Any]]:
        """Check ID -> the check as ``GET /v1/agent/checks`` shows it (TTLs applied)."""
        self._expire_ttls()
        return self._checks

    @property
    def index(self) -> int:
        """The current raft-like index."""
        return self._index

    @property
    def blocked_queries(self) -> int:
        """How many blocking queries are waiting right now."""
        return self._blocked

    def check_status(self, check_id: str) -> str | None:
        """``passing``, ``warning``, ``critical``, or None for an unknown check."""
        check = self.checks.get(check_id)
        return None if check is None else check["Status"]

    def kv_put(self, key: str, value: bytes | str | None, flags: int = 0) -> int:
        """Write ``key`` as a client would; returns its new ModifyIndex."""
        if isinstance(value, str):
            value = value.encode("utf-8")
        return self._kv_set(key, value, flags)

    def kv_delete(self, key: str, recurse: bool = False) -> int:
        """Delete ``key`` (or every key under the prefix); returns the index of the write."""
        self._kv_del(key, recurse)
        return self._index

    def kv_get(self, key: str) -> bytes | None:
        """The value of ``key``, or None when missing (or empty)."""
        entry = self._kv.get(key)
        return None if entry is None else entry.value

    @property
    def kv(self) -> dict[str, bytes | None]:
        """A copy of the KV store: key -> value."""
        return {k: e.value for k, e in sorted(self._kv.items())}

    def restart_empty(self) -> None:
        """Forget every service and check, as an agent restarted without its state does.

        The KV store stays: the servers keep it.
        """
        self._kill_probes()
        self.services.clear()
        self.registrations.clear()
        self._checks.clear()
        self._ttl.clear()
        self._ttl_deadline.clear()
        self._bump()

    def wait_for(self, predicate: Callable[[], Any], timeout: float) -> Any:
        """Wait until ``predicate()`` is truthy, re-checking on every change of the double's
        state and at least every 50 ms; returns its last value (falsy after ``timeout``)."""
        deadline = time.monotonic() + timeout
        while True:
            change = self._change
            value = predicate()
            remaining = deadline - time.monotonic()
            if value or remaining <= 0:
                return value
            change.wait(min(remaining, 0.05))

    def wait_for_registration(self, service_name: str, timeout: float = 5.0) -> dict[str, Any]:
        """The first service registered with ``name`` ``service_name``, once there is one.

        Raises:
            TimeoutError: none within ``timeout`` seconds.
        """

        def find() -> dict[str, Any] | None:
            for service in self.services.values():
                if service["Service"] == service_name:
                    return service
            return None

        found = self.wait_for(find, timeout)
        if not found:
            raise TimeoutError(
                f"no service {service_name!r} registered within {timeout}s; "
                f"services: {sorted(self.services)}"
            )
        return found

    def wait_for_blocked(self, count: int = 1, timeout: float = 5.0) -> None:
        """Wait until ``count`` blocking queries are parked.

        Raises:
            TimeoutError: not within ``timeout`` seconds.
        """
        if not self.wait_for(lambda: self._blocked >= count, timeout):
            raise TimeoutError(f"{self._blocked} blocking queries after {timeout}s, not {count}")

    # -- state ---------------------------------------------------------------------------

    def _notify(self) -> None:
        change, self._change = self._change, Event()
        change.set()

    def _bump(self) -> int:
        """One raft write: the global index moves on and waiters look again."""
        self._index += 1
        self._notify()
        return self._index

    def _kv_set(self, key: str, value: bytes | None, flags: int) -> int:
        index = self._bump()
        entry = self._kv.get(key)
        if entry is None:
            self._kv[key] = _KVEntry(key, value or None, flags, index, index)
        else:
            entry.value, entry.flags, entry.modify_index = value or None, flags, index
        self._kv_index = self._touched[key] = index
        return index

    def _kv_del(self, key: str, recurse: bool) -> None:
        index = self._bump()
        keys = [k for k in self._kv if k.startswith(key)] if recurse else [key]
        for k in keys:
            if self._kv.pop(k, None) is not None:
                self._touched[k] = self._kv_index = index  # the tombstone's index

    def _kv_prefix_index(self, prefix: str) -> int:
        """Consul's index of a prefix listing: the highest ModifyIndex or tombstone under it,
        or else the KV table's index."""
        if prefix == "":
            return self._kv_index
        best = max((i for k, i in self._touched.items() if k.startswith(prefix)), default=0)
        return best or self._kv_index

    def _expire_ttls(self) -> None:
        now = time.monotonic()
        for check_id, deadline in list(self._ttl_deadline.items()):
            if now < deadline:
                continue
            del self._ttl_deadline[check_id]
            check = self._checks.get(check_id)
            if check is None or check["Status"] == "critical":
                continue
            last = check["Output"]
            check["Status"] = "critical"
            check["Output"] = (
                f"TTL expired (last output before timeout follows): {last}"
                if last
                else "TTL expired"
            )
            self._bump()

    def _set_check(self, check_id: str, status: str, output: str) -> None:
        check = self._checks[check_id]
        if (check["Status"], check["Output"]) != (status, output):
            check["Status"], check["Output"] = status, output
            self._bump()

    def _kill_probes(self) -> None:
        probes, self._probes = list(self._probes.values()), {}
        gevent.killall(probes, block=True, timeout=1.0)

    def _start_probe(self, check_id: str, target: str, interval: float, timeout: float) -> None:
        old = self._probes.pop(check_id, None)
        if old is not None:
            old.kill(block=False)
        self._probes[check_id] = gevent.spawn(self._probe, check_id, target, interval, timeout)

    def _probe(self, check_id: str, target: str, interval: float, timeout: float) -> None:
        every = min(max(interval, 0.01), self.probe_interval_cap)
        while check_id in self._checks and not self._stopping:
            try:
                host, port = _split_hostport(target)
                with socket.create_connection((host, port), timeout=min(timeout, 1.0)):
                    pass
            except (OSError, ValueError) as exc:
                status, output = "critical", f"dial tcp {target}: {exc}"
            else:
                status, output = "passing", f"TCP connect {target}: Success"
            if check_id in self._checks:
                self._set_check(check_id, status, output)
            self._stop_event.wait(every)

    def _add_check(
        self, defn: dict[str, Any], check_id: str, name: str, service: dict[str, Any] | None
    ) -> None:
        kind = _check_type(defn)
        status = defn.get("Status") or "critical"
        if status not in _HEALTH:
            raise _HTTPError(400, "Status for checks must 'passing', 'warning', 'critical'")
        previous = self._checks.get(check_id)
        output = ""
        if previous is not None:  # Consul keeps the state of a re-registered check
            status, output = previous["Status"], previous["Output"]
        definition = {
            k: v
            for k, v in defn.items()
            if k not in ("CheckID", "Name", "Status", "Notes", "ServiceID")
        }
        self._checks[check_id] = {
            "Node": self.node_name,
            "CheckID": check_id,
            "Name": name,
            "Status": status,
            "Notes": defn.get("Notes") or "",
            "Output": output,
            "ServiceID": service["ID"] if service else "",
            "ServiceName": service["Service"] if service else "",
            "ServiceTags": list(service["Tags"]) if service else [],
            "Type": kind,
            "Interval": "" if kind == "ttl" else str(defn.get("Interval") or ""),
            "Timeout": str(defn.get("Timeout") or ""),
            "ExposedPort": 0,
            "Definition": definition,
            "CreateIndex": 0,
            "ModifyIndex": 0,
        }
        self._ttl.pop(check_id, None)
        self._ttl_deadline.pop(check_id, None)
        probe = self._probes.pop(check_id, None)
        if probe is not None:
            probe.kill(block=False)
        if kind == "ttl":
            self._ttl[check_id] = parse_duration(defn["TTL"])
            self._ttl_deadline[check_id] = time.monotonic() + self._ttl[check_id]
        elif kind == "tcp" and self.probe_tcp_checks:
            timeout = parse_duration(defn["Timeout"]) if defn.get("Timeout") else 10.0
            self._start_probe(check_id, str(defn["TCP"]), parse_duration(defn["Interval"]), timeout)

    def _remove_check(self, check_id: str) -> None:
        self._checks.pop(check_id, None)
        self._ttl.pop(check_id, None)
        self._ttl_deadline.pop(check_id, None)
        probe = self._probes.pop(check_id, None)
        if probe is not None:
            probe.kill(block=False)

    # -- HTTP ----------------------------------------------------------------------------

    def _app(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        self._active += 1
        self._idle.clear()
        try:
            reply = self._handle(environ)
            headers = [
                ("Content-Type", reply.content_type),
                ("Content-Length", str(len(reply.body))),
                (
                    "X-Consul-Index",
                    str(max(self._index if reply.index is None else reply.index, 1)),
                ),
                ("X-Consul-KnownLeader", "true"),
                ("X-Consul-LastContact", "0"),
                *reply.headers,
            ]
            start_response(f"{reply.status} {_REASONS.get(reply.status, 'Status')}", headers)
        except BaseException:
            self._done()
            raise
        return _Body([reply.body], self._done)

    def _done(self) -> None:
        self._active -= 1
        if self._active <= 0:
            self._active = 0
            self._idle.set()

    def _handle(self, environ: dict[str, Any]) -> _Reply:
        method = environ["REQUEST_METHOD"].upper()
        # PEP 3333: PATH_INFO is the percent-decoded path, as latin-1.
        path = environ.get("PATH_INFO", "").encode("latin-1").decode("utf-8", "replace")
        query = {
            k: v[-1]
            for k, v in urllib.parse.parse_qs(
                environ.get("QUERY_STRING", ""), keep_blank_values=True
            ).items()
        }
        token = query.get("token") or environ.get("HTTP_X_CONSUL_TOKEN") or None
        auth = environ.get("HTTP_AUTHORIZATION", "")
        if token is None and auth.lower().startswith("bearer "):
            token = auth[7:].strip() or None
        length = int(environ.get("CONTENT_LENGTH") or 0)
        body = environ["wsgi.input"].read(length) if length else b""
        self.requests.append(SeenRequest(method, path, token))
        self.request_details.append(
            {"method": method, "path": path, "query": query, "token": token, "body": body}
        )
        mode = self.mode
        if mode == "slow":
            self._stop_event.wait(self.slow_seconds)
        elif mode == "garbage":
            return _Reply(200, GARBAGE_BODY, "text/html")
        elif mode == "error500":
            return _text_reply(500, ERROR500_BODY.decode())
        try:
            if (
                self.acl_token is not None
                and token != self.acl_token
                and not path.startswith("/v1/status/")
            ):
                raise _HTTPError(403, "Permission denied")
            dc = query.get("dc")
            if dc and dc != self.datacenter:
                raise _HTTPError(500, "No path to datacenter")
            return self._route(method, path, query, body)
        except _HTTPError as exc:
            return _text_reply(exc.status, exc.text)

    def _route(self, method: str, path: str, query: dict[str, str], body: bytes) -> _Reply:
        if path == "/v1/kv" or path.startswith("/v1/kv/"):
            key = path[len("/v1/kv/") :]
            if method == "GET":
                return self._kv_get_http(key, query)
            if method == "PUT":
                return self._kv_put_http(key, query, body)
            if method == "DELETE":
                return self._kv_delete_http(key, query)
            raise _HTTPError(405, f"method {method} not allowed")
        routes: list[tuple[str, str, Callable[..., _Reply]]] = [
            ("GET", "/v1/status/leader", lambda: _json_reply(LEADER)),
            ("GET", "/v1/status/peers", lambda: _json_reply([LEADER])),
            ("GET", "/v1/agent/self", self._agent_self),
            ("GET", "/v1/agent/services", self._agent_services),
            ("GET", "/v1/agent/checks", self._agent_checks),
            ("PUT", "/v1/agent/service/register", lambda: self._register_service(body, query)),
            ("PUT", "/v1/agent/check/register", lambda: self._register_check(body)),
        ]
        for route_method, route_path, handler in routes:
            if path == route_path:
                if method != route_method:
                    raise _HTTPError(405, f"method {method} not allowed")
                return handler()
        prefixes: list[tuple[str, str, Callable[[str], _Reply]]] = [
            ("PUT", "/v1/agent/service/deregister/", self._deregister_service),
            ("GET", "/v1/agent/service/", self._service_definition),
            ("PUT", "/v1/agent/check/deregister/", self._deregister_check),
            (
                "PUT",
                "/v1/agent/check/pass/",
                lambda cid: self._ttl_update(cid, "passing", query.get("note", "")),
            ),
            (
                "PUT",
                "/v1/agent/check/warn/",
                lambda cid: self._ttl_update(cid, "warning", query.get("note", "")),
            ),
            (
                "PUT",
                "/v1/agent/check/fail/",
                lambda cid: self._ttl_update(cid, "critical", query.get("note", "")),
            ),
            ("PUT", "/v1/agent/check/update/", lambda cid: self._check_update(cid, body)),
        ]
        for route_method, prefix, handler in prefixes:
            if path.startswith(prefix) and len(path) > len(prefix):
                if method != route_method:
                    raise _HTTPError(405, f"method {method} not allowed")
                return handler(path[len(prefix) :])
        return _text_reply(404, "404 page not found\n")

    # -- agent endpoints -----------------------------------------------------------------

    def _agent_self(self) -> _Reply:
        return _json_reply(
            {
                "Config": {
                    "Datacenter": self.datacenter,
                    "NodeName": self.node_name,
                    "Server": False,
                    "Version": "1.99.0-double",
                },
                "Member": {"Name": self.node_name, "Addr": self.host, "Port": 8301, "Status": 1},
                "Meta": {},
            }
        )

    def _agent_services(self) -> _Reply:
        return _json_reply(self.services)

    def _agent_checks(self) -> _Reply:
        return _json_reply(self.checks)

    def _service_definition(self, service_id: str) -> _Reply:
        service = self.services.get(service_id)
        if service is None:
            raise _HTTPError(404, f"unknown service ID: {service_id}")
        return _json_reply(service)

    def _decode(self, body: bytes) -> Any:
        try:
            return json.loads(body or b"null")
        except ValueError as exc:
            raise _HTTPError(400, f"Request decode failed: {exc}") from exc

    def _register_service(self, body: bytes, query: dict[str, str]) -> _Reply:
        raw = self._decode(body)
        doc = _canonical(raw, _SERVICE_KEYS)
        name = doc.get("Name")
        if not name or not isinstance(name, str):
            raise _HTTPError(400, "Missing service name")
        service_id = doc.get("ID") or name
        port = doc.get("Port") or 0
        if not isinstance(port, int) or isinstance(port, bool):
            raise _HTTPError(400, "Request decode failed: Port must be an integer")
        address = doc.get("Address") or ""
        if address in ("0.0.0.0", "::", "[::]"):
            raise _HTTPError(400, "Invalid service address")
        tags = doc.get("Tags") or []
        if not isinstance(tags, list):
            raise _HTTPError(400, "Request decode failed: Tags must be a list")
        defs = []
        if doc.get("Check"):
            defs.append(_canonical(doc["Check"], _CHECK_KEYS))
        for check in doc.get("Checks") or []:
            defs.append(_canonical(check, _CHECK_KEYS))
        for defn in defs:  # validate every check before changing anything
            _check_type(defn)
        service: dict[str, Any] = {
            "ID": service_id,
            "Service": name,
            "Tags": [str(t) for t in tags],
            "Meta": dict(doc.get("Meta") or {}),
            "Port": port,
            "Address": address,
            "Weights": dict(doc.get("Weights") or {"Passing": 1, "Warning": 1}),
            "EnableTagOverride": bool(doc.get("EnableTagOverride", False)),
            "Datacenter": self.datacenter,
        }
        for optional in ("TaggedAddresses", "Kind", "Proxy", "Connect", "SocketPath", "Locality"):
            if doc.get(optional):
                service[optional] = doc[optional]
        self.services[service_id] = service
        self.registrations[service_id] = raw
        wanted = set()
        for n, defn in enumerate(defs, start=1):
            check_id = defn.get("CheckID") or (
                f"service:{service_id}:{n}" if len(defs) > 1 else f"service:{service_id}"
            )
            wanted.add(check_id)
            self._add_check(defn, check_id, defn.get("Name") or f"Service '{name}' check", service)
        for check in list(self._checks.values()):
            if check["ServiceID"] != service_id:
                continue
            check["ServiceName"], check["ServiceTags"] = name, list(service["Tags"])
            if "replace-existing-checks" in query and check["CheckID"] not in wanted:
                self._remove_check(check["CheckID"])
        self._bump()
        return _Reply(200)

    def _deregister_service(self, service_id: str) -> _Reply:
        if service_id not in self.services:
            raise _HTTPError(
                404,
                f'Unknown service ID "{service_id}". Ensure that the service ID is passed, '
                "not the service name.",
            )
        del self.services[service_id]
        self.registrations.pop(service_id, None)
        for check in list(self._checks.values()):
            if check["ServiceID"] == service_id:
                self._remove_check(check["CheckID"])
        self._bump()
        return _Reply(200)

    def _register_check(self, body: bytes) -> _Reply:
        defn = _canonical(self._decode(body), _CHECK_KEYS)
        name = defn.get("Name")
        if not name:
            raise _HTTPError(400, "Missing check name")
        service = None
        if defn.get("ServiceID"):
            service = self.services.get(defn["ServiceID"])
            if service is None:
                raise _HTTPError(500, f'ServiceID "{defn["ServiceID"]}" does not exist')
        self._add_check(defn, defn.get("CheckID") or name, name, service)
        self._bump()
        return _Reply(200)

    def _deregister_check(self, check_id: str) -> _Reply:
        self._known_check(check_id)
        self._remove_check(check_id)
        self._bump()
        return _Reply(200)

    def _known_check(self, check_id: str) -> None:
        if check_id not in self._checks:
            raise _HTTPError(
                404,
                f'Unknown check ID "{check_id}". Ensure that the check ID is passed, '
                "not the check name.",
            )

    def _ttl_update(self, check_id: str, status: str, output: str) -> _Reply:
        self._expire_ttls()
        self._known_check(check_id)
        if check_id not in self._ttl:
            raise _HTTPError(500, f'CheckID "{check_id}" does not have associated TTL')
        self._ttl_deadline[check_id] = time.monotonic() + self._ttl[check_id]
        self._set_check(check_id, status, output)
        return _Reply(200)

    def _check_update(self, check_id: str, body: bytes) -> _Reply:
        raw = self._decode(body) or {}
        if not isinstance(raw, dict):
            raise _HTTPError(400, "Request decode failed: expected an object")
        doc = {k.lower(): v for k, v in raw.items()}
        status = doc.get("status")
        if status not in _HEALTH:
            raise _HTTPError(400, f"Invalid check status: '{status or ''}'")
        return self._ttl_update(check_id, status, str(doc.get("output") or ""))

    # -- KV endpoints --------------------------------------------------------------------

    def _kv_read(self, key: str, query: dict[str, str]) -> _Reply:
        if "keys" in query:
            sep = query.get("separator", "")
            found: set[str] = set()
            for k in self._kv:
                if not k.startswith(key):
                    continue
                rest = k[len(key) :]
                cut = rest.find(sep) if sep else -1
                found.add(k if cut < 0 else key + rest[: cut + len(sep)])
            index = self._kv_prefix_index(key)
            if not found:
                return _Reply(404, index=index)
            return _json_reply(sorted(found), index=index)
        if "recurse" in query:
            index = self._kv_prefix_index(key)
            entries = [e.as_json() for k, e in sorted(self._kv.items()) if k.startswith(key)]
            if not entries:
                return _Reply(404, index=index)
            return _json_reply(entries, index=index)
        entry = self._kv.get(key)
        if entry is None:
            return _Reply(404, index=self._kv_index)
        if "raw" in query:
            return _Reply(
                200, entry.value or b"", "application/octet-stream", index=entry.modify_index
            )
        return _json_reply([entry.as_json()], index=entry.modify_index)

    def _kv_fingerprint(self, key: str, query: dict[str, str]) -> int:
        """What a blocking read on ``key`` watches: the key, or everything under the prefix."""
        if "keys" in query or "recurse" in query:
            return self._kv_prefix_index(key)
        return self._touched.get(key, 0)

    def _kv_get_http(self, key: str, query: dict[str, str]) -> _Reply:
        try:
            min_index = int(query.get("index") or 0)
        except ValueError as exc:
            raise _HTTPError(400, "Invalid index") from exc
        try:
            wait = parse_duration(query["wait"]) if query.get("wait") else CONSUL_DEFAULT_WAIT
        except ValueError as exc:
            raise _HTTPError(400, "Invalid wait time") from exc
        reply = self._kv_read(key, query)
        if min_index <= 0 or (reply.index or 1) > min_index:
            return reply
        # A blocking query: hold until what the query reads changes past the index, or the
        # wait (capped at max_wait) passes, or the double stops.
        deadline = time.monotonic() + max(0.0, min(wait, self.max_wait))
        seen = self._kv_fingerprint(key, query)
        self._blocked += 1
        self._notify()
        try:
            while not self._stopping:
                change = self._change
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                change.wait(remaining)
                now = self._kv_fingerprint(key, query)
                if now != seen:
                    seen = now
                    reply = self._kv_read(key, query)
                    if (reply.index or 1) > min_index:
                        break
        finally:
            self._blocked -= 1
        return reply

    def _kv_put_http(self, key: str, query: dict[str, str], body: bytes) -> _Reply:
        if not key:
            raise _HTTPError(400, "Missing key name")
        if "acquire" in query or "release" in query:
            raise _HTTPError(400, "ConsulDouble does not implement sessions (acquire/release)")
        if len(body) > MAX_VALUE_SIZE:
            raise _HTTPError(413, f"Request body too large, max size: {MAX_VALUE_SIZE} bytes")
        try:
            flags = int(query.get("flags") or 0)
            cas = int(query["cas"]) if query.get("cas") not in (None, "") else None
        except ValueError as exc:
            raise _HTTPError(400, f"Invalid flags or cas: {exc}") from exc
        if cas is not None:
            entry = self._kv.get(key)
            current = 0 if entry is None else entry.modify_index
            if cas != current:
                self._bump()  # the write went through raft, and did nothing
                return _json_reply(False)
        self._kv_set(key, body, flags)
        return _json_reply(True)

    def _kv_delete_http(self, key: str, query: dict[str, str]) -> _Reply:
        recurse = "recurse" in query
        if query.get("cas") not in (None, "") and not recurse:
            try:
                cas = int(query["cas"])
            except ValueError as exc:
                raise _HTTPError(400, f"Invalid cas: {exc}") from exc
            entry = self._kv.get(key)
            if cas <= 0 or entry is None or entry.modify_index != cas:
                self._bump()
                return _json_reply(False)
        self._kv_del(key, recurse)
        return _json_reply(True)


class _Handler(WSGIHandler):
    """pywsgi's handler, except that a request killed by :meth:`ConsulDouble.go_down` gets no
    answer (pywsgi would send a 500): the connection just drops, as with a crashed agent."""

    def handle_error(self, t: Any, v: Any, tb: Any) -> None:
        if issubclass(t, gevent.GreenletExit):
            self.close_connection = True
            return
        super().handle_error(t, v, tb)


class _Body(list):  # type: ignore[type-arg]
    """A WSGI body whose ``close()`` (called once it is written) marks the request done."""

    def __init__(self, chunks: list[bytes], on_close: Callable[[], None]) -> None:
        super().__init__(chunks)
        self._on_close = on_close

    def close(self) -> None:
        on_close, self._on_close = self._on_close, None
        if on_close is not None:
            on_close()


_REASONS = {
    200: "OK",
    400: "Bad Request",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    413: "Request Entity Too Large",
    500: "Internal Server Error",
}
