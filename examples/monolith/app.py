"""A gevent monolith: a WSGI app (``gevent.pywsgi``) and a Thrift service in one process.

    python examples/monolith/app.py

The Thrift server's settings are layered as the launcher layers them
(:func:`kitegreen.load_config`): the values below, then a config file (``KITE_CONFIG_FILE``),
then ``KITE_*`` variables, then flags (``--port 9091``); ``MONOLITH_HTTP_PORT`` sets the HTTP
port (8080; 0: a free one). SIGTERM or SIGINT stops both servers together
(:func:`kitegreen.stop_on_signals`): each stops accepting, lets its requests in flight finish
(up to ``exit_wait_time``) and the process exits 0 (1 if requests had to be cut off).

Once both listen, one JSON line on standard output says where: ``{"http": ..., "thrift": ...}``.
"""

from __future__ import annotations

# First, before anything imports socket or ssl: the WSGI app's libraries then cooperate with
# gevent as the Thrift handlers do.
from gevent import monkey

monkey.patch_all()

import json  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
from collections.abc import Callable, Iterable  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402
from urllib.parse import parse_qs  # noqa: E402

import gevent  # noqa: E402
import structlog  # noqa: E402
import thriftpy2  # noqa: E402
from gevent import pywsgi  # noqa: E402
from gevent.pool import Pool  # noqa: E402

import kitegreen  # noqa: E402

IDL = Path(__file__).with_name("monolith.thrift")
monolith_thrift = thriftpy2.load(str(IDL), module_name="monolith_thrift")
log = structlog.get_logger("monolith")
MAX_SLOW = 10.0
HTTP_CONNECTIONS = 1000


class Orders:
    """The Thrift handler."""

    def echo(self, message: str) -> str:
        return message

    def slow(self, seconds: float, message: str) -> str:
        log.info("slow call started", seconds=seconds)
        gevent.sleep(min(max(seconds, 0.0), MAX_SLOW))
        return message


def wsgi_app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    """``GET /`` says ok; ``GET /slow?seconds=S`` answers after S seconds (at most 10)."""
    if environ["PATH_INFO"] == "/slow":
        seconds = float(parse_qs(environ.get("QUERY_STRING", "")).get("seconds", ["1"])[0])
        log.info("slow request started", seconds=seconds)
        gevent.sleep(min(max(seconds, 0.0), MAX_SLOW))
        body = b"slow done\n"
    elif environ["PATH_INFO"] == "/":
        body = b"ok\n"
    else:
        start_response("404 Not Found", [("Content-Type", "text/plain")])
        return [b"not found\n"]
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]


def main(argv: list[str]) -> int:
    config = kitegreen.load_config(
        kitegreen.Config(service_name="monolith", host="127.0.0.1", port=9090), argv=argv
    )
    rpc = kitegreen.RpcServer(monolith_thrift.Orders, Orders(), config)
    http_port = int(os.environ.get("MONOLITH_HTTP_PORT", "8080"))
    # A pool, so that a stop waits for the requests in flight (gevent's servers wait only for
    # a pool's greenlets), for as long as the Thrift server would.
    http = pywsgi.WSGIServer(
        (config.host, http_port), wsgi_app, spawn=Pool(HTTP_CONNECTIONS), log=None
    )
    rpc.start()
    try:
        http.start()
    except BaseException:
        rpc.stop()
        raise
    stopping = kitegreen.stop_on_signals(rpc, http, timeout=config.exit_wait_time)
    address = rpc.address
    thrift = address if isinstance(address, str) else address[1]  # a Unix socket's path
    print(json.dumps({"http": http.server_port, "thrift": thrift, "host": config.host}))
    sys.stdout.flush()
    clean = stopping.wait()
    log.info("monolith stopped", clean=clean)
    return 0 if clean else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
