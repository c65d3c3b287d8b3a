"""From a header frame to what the handler sees: request metadata, the deadline, the real IP.

Which headers mean what (TTHeader keys from cloudwego/gopkg and kitex ``transmeta``; THeader
keys from fbthrift and baseplate) is decided here, once, so the request loop only asks.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

from kitegreen.codec.headers import HeaderFrame, IntKey, StrKey, THeaderKey
from kitegreen.context import RequestInfo

IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

_TRANSIT = StrKey.PREFIX_TRANSIT
_PERSIST = StrKey.PREFIX_PERSIST
# Upstream transit values are the caller's caller's; they are not this hop's to read.
_UPSTREAM = StrKey.PREFIX_TRANSIT_UPSTREAM


# As plain ints: an IntEnum member costs ~200 ns to look up and hash, per use.
_RPC_TIMEOUT = int(IntKey.RPC_TIMEOUT)
_FROM_SERVICE = int(IntKey.FROM_SERVICE)
_FROM_METHOD = int(IntKey.FROM_METHOD)


def deadline(frame: HeaderFrame, arrived: float) -> float | None:
    """When the caller gives up, on the ``time.monotonic()`` clock; None without a timeout."""
    if frame.kind == "ttheader":
        timeout = frame.int_value(_RPC_TIMEOUT)
    else:
        # One key read from the header bytes: str_info would split every header into a dict.
        timeout = frame.str_value(THeaderKey.CLIENT_TIMEOUT) or frame.str_value(
            THeaderKey.DEADLINE_BUDGET
        )
    millis = _milliseconds(timeout)
    return None if millis is None else arrived + millis / 1000.0


def request_info(frame: HeaderFrame, arrived: float) -> RequestInfo:
    """The :class:`RequestInfo` of one header frame that arrived (first byte) at ``arrived``."""
    strs = frame.str_info
    ints = frame.int_info
    transit: dict[str, str] = {}
    persistent: dict[str, str] = {}
    for key, value in strs.items():
        if key.startswith(_TRANSIT) and not key.startswith(_UPSTREAM):
            transit[key[len(_TRANSIT) :]] = value
        elif key.startswith(_PERSIST):
            persistent[key[len(_PERSIST) :]] = value
    if frame.acl_token is not None:
        # gopkg's decoder files the ACL token among the string key-values, and a Kitex server
        # reads it as the transient metainfo value ``gdpr-token``: the same here.
        strs = {**strs, StrKey.GDPR_TOKEN: frame.acl_token}
        transit[StrKey.GDPR_TOKEN[len(_TRANSIT) :]] = frame.acl_token
    return RequestInfo(
        header=frame.kind,
        caller_service=ints.get(_FROM_SERVICE),
        caller_method=ints.get(_FROM_METHOD),
        log_id=frame.log_id,
        deadline=deadline(frame, arrived),
        transit=transit,
        persistent=persistent,
        headers=strs,
        int_headers=ints,
    )


def _milliseconds(text: str | None) -> int | None:
    """A positive decimal number of milliseconds, or None for anything else."""
    # isascii(): str.isdigit() is true of '²' and of other scripts' digits too.
    if not text or not text.isascii() or not text.isdigit() or len(text) > 12:
        return None
    value = int(text)
    return value if value > 0 else None


def networks(cidrs: Iterable[str]) -> tuple[IpNetwork, ...]:
    """``Config.trusted_proxies`` as networks (the config already checked each one)."""
    return tuple(ipaddress.ip_network(cidr, strict=False) for cidr in cidrs)


def is_trusted(peer: str | None, trusted: tuple[IpNetwork, ...]) -> bool:
    """Whether the TCP peer ``peer`` is one of the ``trusted`` proxies."""
    if peer is None or not trusted:
        return False
    try:
        address = ipaddress.ip_address(peer)
    except ValueError:
        return False
    return any(address in network for network in trusted)


def claimed_ip(frame: HeaderFrame) -> str | None:
    """The client address a proxy put in the ``rip`` header (``ip``, ``ip:port`` or
    ``[ip]:port``), normalised; None when absent or not an address."""
    raw = frame.str_value(StrKey.REAL_IP)
    if not raw:
        return None
    host = raw
    if host.startswith("["):
        host = host[1 : host.find("]")] if "]" in host else ""
    elif host.count(":") == 1:
        host = host.partition(":")[0]
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        return None
