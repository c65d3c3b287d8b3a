"""A/B: kitegreen's server CPU per request from two source trees, measured interleaved.

``python benchmarks/ab.py --baseline DIR`` runs kitegreen with its limits off (the
``kitegreen-unlimited`` server of ``run.py``) from this checkout and from ``DIR`` (another
checkout of kitegreen with its extension built, e.g. ``git worktree add /tmp/base HEAD~1`` then
``python setup.py build_ext --inplace`` there), alternating A, B, A, B, ... with the same load
generator, cores and cell each time, and prints server CPU µs per request per round and the
medians. On a shared machine only figures measured this way, side by side, are comparable.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import run  # noqa: E402 - the benchmarks folder is not a package


def measure(tree: Path | None, args: argparse.Namespace, messages: dict, pin: bool) -> dict:
    """One cell on a fresh server from ``tree`` (None: this checkout)."""
    if tree is None:
        os.environ.pop("PYTHONPATH", None)
    else:
        os.environ["PYTHONPATH"] = str(tree)
    server = run.start_server("kitegreen-unlimited", args.wire, messages["ping", args.wire], pin)
    try:
        cpu0 = run.cpu_seconds(server.proc.pid)
        result = run.run_loadgen(
            server.port,
            messages[args.method, args.wire],
            args.conns,
            args.warmup,
            args.duration,
            pin,
        )
        cpu1 = run.cpu_seconds(server.proc.pid)
    finally:
        server.stop()
        os.environ.pop("PYTHONPATH", None)
    if "error" in result:
        raise RuntimeError(result["error"])
    return {"us": run._per_request(cpu1 - cpu0, result), "rps": result["rps"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--baseline", type=Path, required=True, help="the other checkout (B)")
    parser.add_argument("--method", choices=run.METHODS, default="ping")
    parser.add_argument("--wire", choices=run.servers.WIRES, default="binary-buffered")
    parser.add_argument("--conns", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--duration", type=float, default=3.0)
    parser.add_argument("--warmup", type=float, default=1.0)
    args = parser.parse_args(argv)
    if not (args.baseline / "kitegreen" / "__init__.py").exists():
        parser.error(f"{args.baseline} is not a kitegreen checkout")
    run.build_loadgen()
    messages = run.encode_messages()
    pin = run.can_pin()
    runs: dict[str, list[dict]] = {"A (this checkout)": [], f"B ({args.baseline})": []}
    trees = {"A (this checkout)": None, f"B ({args.baseline})": args.baseline}
    for rnd in range(args.rounds):
        # Alternate which goes first, so that neither always follows the other.
        order = list(trees) if rnd % 2 == 0 else list(reversed(trees))
        for label in order:
            m = measure(trees[label], args, messages, pin)
            runs[label].append(m)
            print(
                f"round {rnd + 1} {label}: {m['us']:.2f} µs/req, {m['rps']:,.0f} req/s", flush=True
            )
            time.sleep(0.3)
    cell = f"{args.method} {args.wire} {args.conns} conns"
    print(f"\n{cell}, {args.rounds} rounds of {args.duration:g} s")
    for label, ms in runs.items():
        us = statistics.median(m["us"] for m in ms)
        rps = statistics.median(m["rps"] for m in ms)
        print(f"  {label}: median {us:.2f} µs/req, {rps:,.0f} req/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
