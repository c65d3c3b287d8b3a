"""Bytes to messages and back, never a socket: wire detection, the compiled Thrift codec
(``_thrift``, binary and compact) and the header protocols.

Nothing here imports :mod:`kitegreen.transport` or does I/O; the transport hands this package
whole messages in memory.
"""

from __future__ import annotations

from pathlib import Path

try:
    from kitegreen.codec import _thrift as _thrift
except ImportError as exc:  # pragma: no cover - depends on how the package was installed
    # The usual cause: `pip install .` put the built package in site-packages, and Python
    # then imported kitegreen from a checkout in the current directory, which has the C
    # source but no compiled module. Say so instead of a bare "cannot import name".
    raise ImportError(
        f"kitegreen's compiled codec is not built in {Path(__file__).parent}: Python is "
        "importing kitegreen from a source checkout that was not built in place. Install the "
        "checkout with `pip install -e .`, or run from another directory."
    ) from exc
