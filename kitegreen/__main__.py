"""``python -m kitegreen MODULE:ATTR``: see :mod:`kitegreen.cli`."""

from __future__ import annotations

from kitegreen.cli import main

if __name__ == "__main__":
    raise SystemExit(main(prog="python -m kitegreen"))
