"""Listening sockets: TCP, Unix, and the service-mesh ingress (kite's ``Listen``).

The socket is created here rather than by gevent's ``StreamServer`` so that every failure
(address in use, an unresolvable host, a path that is not a socket) becomes a
:class:`~kitegreen.ListenError` that says what was asked for and what went wrong.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import stat
from dataclasses import dataclass
from typing import Any

from kitegreen.config import Config
from kitegreen.exceptions import ListenError

UNIX_SOCKET_MODE = 0o666
"""Local clients of any user may connect, as with a TCP port; restrict with the directory."""


@dataclass(frozen=True, slots=True)
class ListenSpec:
    """What to listen on, resolved from a :class:`Config`.

    Attributes:
        kind: ``tcp`` or ``unix``.
        host: the TCP host (empty for unix).
        port: the TCP port (0 for unix).
        path: the Unix socket path (empty for tcp).
    """

    kind: str
    host: str = ""
    port: int = 0
    path: str = ""

    @classmethod
    def from_config(cls, config: Config) -> ListenSpec:
        """Resolve where ``config`` says to listen, service-mesh mode included.

        Raises:
            ListenError: the service-mesh ingress address is neither host:port nor a path.
        """
        if config.service_mesh_mode:
            addr = config.service_mesh_ingress_addr
            # kite's rule: an address with a slash is a socket path, anything else host:port.
            if "/" in addr:
                return cls("unix", path=addr)
            host, sep, port = addr.rpartition(":")
            if not sep or not port.isdigit() or int(port) > 65535:
                raise ListenError(
                    f"service_mesh_ingress_addr must be host:port or a socket path, got {addr!r}"
                )
            return cls("tcp", host=host.strip("[]") or "0.0.0.0", port=int(port))
        if config.effective_listen_type == "unix":
            return cls("unix", path=config.unix_socket)
        return cls("tcp", host=config.host, port=config.port)

    @property
    def address(self) -> tuple[str, int] | str:
        """What was asked for: ``(host, port)`` for TCP, the path for a Unix socket."""
        return self.path if self.kind == "unix" else (self.host, self.port)


def describe_address(address: tuple[str, int] | str) -> str:
    """An address as people write it: ``127.0.0.1:8888``, ``[::1]:8888``, ``unix:/path``; the
    one place kitegreen formats a listening address.

    Args:
        address: ``(host, port)`` for TCP, the path for a Unix socket.
    """
    if isinstance(address, str):
        return f"unix:{address}"
    host, port = address
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def listen(spec: ListenSpec, backlog: int) -> socket.socket:
    """Create, bind and listen on the socket ``spec`` describes.

    Raises:
        ListenError: the address is in use, cannot be resolved, or the Unix path is occupied
            by something that is not a dead socket.
    """
    if spec.kind == "unix":
        return _listen_unix(spec.path, backlog)
    if spec.kind == "tcp":
        return _listen_tcp(spec.host, spec.port, backlog)
    raise ListenError(f"listen type must be tcp or unix, got {spec.kind!r}")


def _listen_tcp(host: str, port: int, backlog: int) -> socket.socket:
    where = describe_address((host, port))
    try:
        infos = socket.getaddrinfo(
            host or None, port, socket.AF_UNSPEC, socket.SOCK_STREAM, 0, socket.AI_PASSIVE
        )
    except (socket.gaierror, UnicodeError) as exc:
        raise ListenError(f"cannot listen on {where}: host does not resolve ({exc})") from None
    family, socktype, proto, _, sockaddr = infos[0]
    sock = socket.socket(family, socktype, proto)
    try:
        # Lets a restarted server bind while old connections sit in TIME_WAIT; it does not let
        # two live servers share the port (that would need SO_REUSEPORT).
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(sockaddr)
        sock.listen(backlog)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise ListenError(f"cannot listen on {where}: address already in use") from None
        if exc.errno == errno.EADDRNOTAVAIL:
            raise ListenError(
                f"cannot listen on {where}: address not available on this machine"
            ) from None
        if exc.errno == errno.EACCES:
            raise ListenError(f"cannot listen on {where}: permission denied") from None
        raise ListenError(f"cannot listen on {where}: {exc.strerror or exc}") from None
    return sock


def _listen_unix(path: str, backlog: int) -> socket.socket:
    _clear_stale_socket(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
        os.chmod(path, UNIX_SOCKET_MODE)
        sock.listen(backlog)
    except OSError as exc:
        sock.close()
        raise ListenError(f"cannot listen on unix:{path}: {exc.strerror or exc}") from None
    return sock


def _clear_stale_socket(path: str) -> None:
    """Remove a socket file left by a dead process; refuse anything else at ``path``."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise ListenError(f"cannot listen on unix:{path}: {exc.strerror or exc}") from None
    if not stat.S_ISSOCK(st.st_mode):
        raise ListenError(
            f"cannot listen on unix:{path}: the path exists and is not a socket; "
            "it was left untouched"
        )
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        # Nobody accepts on it: a dead server's leftover, safe to replace.
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        return
    except OSError as exc:
        raise ListenError(f"cannot listen on unix:{path}: {exc.strerror or exc}") from None
    finally:
        probe.close()
    raise ListenError(f"cannot listen on unix:{path}: another process is listening on it")


def remove_unix_socket(path: str, inode: int) -> None:
    """Unlink our socket file on stop, unless another server has replaced it since."""
    with contextlib.suppress(OSError):
        if os.lstat(path).st_ino == inode:
            os.unlink(path)


class Binding:
    """A listening socket's address, and the Unix socket file it owns, for the single
    process's engine and the arbiter alike.

    Args:
        spec: what was asked for.
        sock: the bound, listening socket.
        owned: whether this process created it (only then is a Unix socket file removed at
            :meth:`release`); a worker's shared listener is not its own.
    """

    def __init__(self, spec: ListenSpec, sock: Any, *, owned: bool) -> None:
        self.spec = spec
        self.owned = owned
        self._inode: int | None = None
        self.address: tuple[str, int] | str
        if spec.kind == "unix":
            self.address = spec.path
            if owned:
                self._inode = os.stat(spec.path).st_ino
        else:
            host, port = sock.getsockname()[:2]
            self.address = (str(host), int(port))

    @property
    def port(self) -> int:
        """The bound TCP port; 0 for a Unix socket."""
        return self.address[1] if isinstance(self.address, tuple) else 0

    def release(self) -> None:
        """Remove our Unix socket file (unless another server replaced it); idempotent."""
        inode, self._inode = self._inode, None
        if inode is not None:
            remove_unix_socket(self.spec.path, inode)
