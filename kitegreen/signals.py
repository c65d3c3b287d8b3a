"""Signal handlers that only request: each signal runs its action in a new greenlet.

gevent calls a signal handler from its hub, where nothing may block; spawning is all the handler
does, and the action (stopping, draining, logging stacks, queueing a request for the arbiter)
runs as a greenlet like any other. The launcher's single process, the arbiter of
``--workers N`` and each worker install their actions through this one function.
"""

from __future__ import annotations

import signal
from collections.abc import Callable, Mapping
from typing import Any


def install_signal_handlers(actions: Mapping[signal.Signals, Callable[[], object]]) -> list[Any]:
    """Run ``actions[signum]`` in a new greenlet each time signal ``signum`` arrives.

    Returns:
        gevent's handles, whose ``cancel()`` restores the default handling.
    """
    import gevent

    return [gevent.signal_handler(sig, gevent.spawn, action) for sig, action in actions.items()]
