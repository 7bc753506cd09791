"""One fault injected into a running local stack under a Predict load (RELIABILITY.md's rows).

    .venv/bin/python loadtests/fault.py --port-base 9000 --var-dir var --kill serving
    .venv/bin/python loadtests/fault.py --port-base 9000 --var-dir var --restart kafka

Runs Predict at ``--rate`` calls/s (open loop) for ``--seconds``; after ``--at`` seconds either
kill -9 the program's process group (``--kill``: a crash; supervisord respawns it) or stop and
start it through supervisord (``--restart``: the broker). Prints the Predict success rate
over the window, the longest span without an answer, the failures by status and how long the
program took to run again. The archive/feature checks of a full chaos run are not done here.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from loadtests.stack_harness import OwnStack, predict_load  # noqa: E402


async def run(args: argparse.Namespace) -> None:
    stack = OwnStack(args.var_dir.resolve(), args.port_base)
    load = asyncio.ensure_future(predict_load(stack.serving_address, args.seconds, rate=args.rate))
    await asyncio.sleep(args.at)
    started = time.monotonic()
    if args.kill:
        old = await asyncio.to_thread(stack.kill, args.kill)
        back = await asyncio.to_thread(stack.wait_running, args.kill, old)
        what = f"kill -9 {args.kill}"
    else:
        await asyncio.to_thread(stack.stop, args.restart)
        await asyncio.to_thread(stack.start, args.restart)
        back = time.monotonic() - started
        what = f"restart {args.restart}"
    result = await load
    print(
        f"{what}: running again after {back:.2f} s; Predict {result.ok} answered, "
        f"{result.failed} failed {result.errors or ''} = {result.success:.2%} success; "
        f"longest gap {result.longest_gap_s:.2f} s"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--var-dir", type=Path, default=ROOT / "var")
    parser.add_argument("--port-base", type=int, required=True)
    fault = parser.add_mutually_exclusive_group(required=True)
    fault.add_argument("--kill", help="program to kill -9 (serving, ingestion, redis, ...)")
    fault.add_argument("--restart", help="program to stop and start (kafka)")
    parser.add_argument("--rate", type=float, default=50.0)
    parser.add_argument("--seconds", type=float, default=40.0)
    parser.add_argument("--at", type=float, default=5.0)
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
