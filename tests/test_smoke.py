from __future__ import annotations

import pytest

from clients import WIRES, apache_client, thriftpy2_client
from conftest import testsvc_thrift


@pytest.mark.parametrize(("protocol", "transport"), WIRES)
def test_both_clients(server, protocol, transport):
    with thriftpy2_client(testsvc_thrift.TestService, server.address, protocol, transport) as c:
        assert c.echo("hi") == "hi"
    with apache_client(server.address, protocol, transport) as c:
        assert c.echo("hi") == "hi"
        assert c.add(2, 3) == 5
