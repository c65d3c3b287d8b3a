"""Hooks that record themselves: each appends ``{"hook", "role", "pid", "worker", ...}`` as a
JSON line to the file ``$HOOKS_RECORD``; the hook named in ``$HOOKS_FAIL`` raises instead.

Imported by name (``hooks_record:on_starting``) in the arbiter and the workers, so the tests put
``tests/`` on ``PYTHONPATH``; ``tests/hooks_target.py`` gives them in code.
"""

from __future__ import annotations

import json
import os
from typing import Any


def _record(context: Any) -> None:
    if os.environ.get("HOOKS_FAIL") == context.hook:
        raise RuntimeError(f"{context.hook} fails on purpose")
    line = {
        "hook": context.hook,
        "role": context.role,
        "pid": context.pid,
        "getpid": os.getpid(),
        "worker": context.worker,
        "has_server": context.server is not None,
        "address": context.address,
        "service": context.config.service_name,
    }
    fd = os.open(os.environ["HOOKS_RECORD"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, (json.dumps(line) + "\n").encode())
    finally:
        os.close(fd)


on_starting = post_fork = post_worker_init = when_ready = _record
on_reload = worker_exit = on_exit = _record
