"""How settings are named outside the code: the ``KITE_`` environment variables and kite's own.

Shared by the loader, which reads them, and the help and docs, which show them.
"""

from __future__ import annotations

import types
from collections.abc import Mapping

ENV_PREFIX = "KITE_"
CONFIG_FILE_ENV = "KITE_CONFIG_FILE"

# Environment variables kite (and Consul's own tooling) use, mapped to our fields. The
# canonical KITE_<FIELD> spelling is read after these, so it wins when both are set.
ENV_ALIASES: Mapping[str, str] = types.MappingProxyType(
    {
        "KITE_SERVICE_PORT": "port",
        "KITE_SERVICE_ADDR": "host",
        "SERVICE_CLUSTER": "cluster",
        "SERVICE_MESH_INGRESS_ADDR": "service_mesh_ingress_addr",
        "CONSUL_HTTP_ADDR": "consul_addr",
        "CONSUL_HTTP_TOKEN": "consul_token",
    }
)


def env_names(name: str) -> list[str]:
    """The environment variables that set the field ``name``, the one that wins first."""
    return [ENV_PREFIX + name.upper()] + [v for v, f in ENV_ALIASES.items() if f == name]
