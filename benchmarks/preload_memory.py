"""Memory of N workers with and without ``--preload``, for an application whose import
allocates ``PRELOAD_MB`` MB (``benchmarks/preload_target.py``).

    python benchmarks/preload_memory.py [--workers 4] [--mb 200]

For each mode: start the launcher, wait for every worker to be ready, read each process's
``/proc/PID/smaps_rollup`` (Rss; Pss, the honest share of shared pages; USS, its private pages),
stop it. Prints a Markdown table (MB).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TARGET = "benchmarks/preload_target.py:server"


def rollup(pid: int) -> dict[str, float]:
    """Rss, Pss and USS (Private_Clean + Private_Dirty) of ``pid``, in MB."""
    fields: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        name, _, rest = line.partition(":")
        fields[name] = int(rest.split()[0])
    kb = 1024.0
    return {
        "rss": fields["Rss"] / kb,
        "pss": fields["Pss"] / kb,
        "uss": (fields["Private_Clean"] + fields["Private_Dirty"]) / kb,
    }


def children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat.rpartition(")")[2].split()[1]) == pid:
                found.append(int(entry))
    return found


def measure(workers: int, mb: int, preload: bool, timeout: float = 120.0) -> dict[str, object]:
    """Start the launcher, wait for ``workers`` ready workers, measure, stop it."""
    args = [sys.executable, "-m", "kitegreen", TARGET, "-w", str(workers)]
    args += ["--port", "0", "--debug-port", "0", "--log-format", "json"]
    if preload:
        args.append("--preload")
    env = {**os.environ, "PRELOAD_MB": str(mb), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(args, cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None
    ready: set[int] = set()
    deadline = time.monotonic() + timeout
    try:
        for line in proc.stderr:
            record = json.loads(line) if line.startswith("{") else {}
            if record.get("event") == "worker ready":
                ready.add(int(record["worker"]))
            if len(ready) == workers or time.monotonic() > deadline:
                break
        time.sleep(1.0)  # let the workers settle after their first heartbeat
        arbiter = rollup(proc.pid)
        per_worker = [rollup(pid) for pid in sorted(ready)]
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    return {"preload": preload, "arbiter": arbiter, "workers": per_worker}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--mb", type=int, default=200)
    args = parser.parse_args()
    print(f"{args.workers} workers, {args.mb} MB allocated at import (MB)\n")
    print("| mode | process | Rss | Pss | USS |")
    print("| --- | --- | ---: | ---: | ---: |")
    for preload in (False, True):
        result = measure(args.workers, args.mb, preload)
        mode = "--preload" if preload else "default"
        rows = [("arbiter", result["arbiter"])]
        rows += [(f"worker {i}", w) for i, w in enumerate(result["workers"])]  # type: ignore[arg-type]
        total = {k: sum(r[k] for _, r in rows) for k in ("rss", "pss", "uss")}  # type: ignore[index]
        for name, r in [*rows, ("total", total)]:
            print(f"| {mode} | {name} | {r['rss']:.0f} | {r['pss']:.0f} | {r['uss']:.0f} |")  # type: ignore[index]


if __name__ == "__main__":
    main()
