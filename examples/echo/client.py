"""Call the echo example: ``python examples/echo/client.py [--port 8888] [message]``."""

from __future__ import annotations

import argparse
from pathlib import Path

import thriftpy2
from thriftpy2.rpc import make_client

IDL = Path(__file__).with_name("echo.thrift")
echo_thrift = thriftpy2.load(str(IDL), module_name="echo_thrift")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("message", nargs="?", default="hello, kitegreen")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8888)
    args = parser.parse_args()
    client = make_client(echo_thrift.Echo, args.host, args.port, timeout=3000)
    try:
        client.ping()
        print("echo:", client.echo(args.message))
        print("whoami:", client.whoami())
        try:
            client.echo("")
        except echo_thrift.EchoError as exc:
            print(f"declared exception: {exc.message} (code {exc.code})")
    finally:
        client.close()


if __name__ == "__main__":
    main()
