"""The launcher's exit statuses, the same in one process and with workers (``--workers``).

Imports nothing: the launcher reads these before it monkey-patches.
"""

from __future__ import annotations

EXIT_OK = 0
"""A clean stop: every request in flight finished."""
EXIT_UNCLEAN_STOP = 1
"""Requests in flight were cut off (``exit_wait_time`` passed, SIGQUIT); for a worker, also
its watchdog ending it."""
EXIT_USAGE = 2
"""A usage, configuration or target error: the application or its settings do not load."""
EXIT_LISTEN = 3
"""The listener could not be created."""
EXIT_WORKERS_FAILED = 4
"""Workers kept exiting at start-up (``kitegreen/workers/crashes.py``)."""
EXIT_CRASHED = 70
"""A worker or a probe raised out of kitegreen's own code (``EX_SOFTWARE``): a bug."""
