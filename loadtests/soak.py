"""Soak: a running local stack under steady Predict load and the simulator, for a long time.

    .venv/bin/python loadtests/soak.py --var-dir var --port-base 9000 --minutes 30

Attaches to a stack that runs (``make up``; ``--var-dir`` and ``--port-base`` say which: the
port base is the number the stack's ports are offsets of, see loadtests/stack_harness.py; for
the default ports there is none, pass ``--serving host:port`` instead). First finds serving's
maximum (a closed loop of 32 callers for 10 s), then for ``--minutes`` keeps the simulator's
default traffic flowing and Predict at ``--fraction`` of that maximum (open loop), and
reports: the RSS of every program at the start and the end (and its largest sample), Predict
calls failed, services that restarted (a new pid), and error lines in the services' logs.
Not part of `make bench` (it takes half an hour); its figures are in RELIABILITY.md.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from loadtests.stack_harness import SERVICES, OwnStack, predict_load, progress  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--var-dir", type=Path, default=ROOT / "var")
    parser.add_argument("--port-base", type=int, required=True)
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--fraction", type=float, default=0.5)
    parser.add_argument("--out", type=Path, default=ROOT / "var" / "soak.md")
    args = parser.parse_args()
    stack = OwnStack(args.var_dir.resolve(), args.port_base)
    log = args.var_dir / "soak-simulator.log"

    progress("serving's maximum: closed loop of 32 for 10 s")
    peak = asyncio.run(predict_load(stack.serving_address, 10, concurrency=32))
    rate = max(args.fraction * peak.rate, 1.0)
    progress(f"maximum {peak.rate:.0f}/s; soaking at {rate:.0f}/s for {args.minutes:g} min")

    errors_before = {s: _error_lines(stack, s) for s in SERVICES}
    pids_before = {name: p.pid for name, p in stack.programs().items()}
    rss_start = stack.rss_mib()
    rss_max = dict(rss_start)
    simulator = stack.simulate(log)
    ok = failed = 0
    failures: dict[str, int] = {}
    longest_gap = 0.0
    latencies_p99 = []
    started = time.monotonic()
    try:
        while time.monotonic() - started < args.minutes * 60:
            window = asyncio.run(predict_load(stack.serving_address, 60, rate=rate))
            ok += window.ok
            failed += window.failed
            for code, n in window.errors.items():
                failures[code] = failures.get(code, 0) + n
            longest_gap = max(longest_gap, window.longest_gap_s)
            latencies_p99.append(window.quantile_ms(0.99))
            for name, mib in stack.rss_mib().items():
                rss_max[name] = max(rss_max.get(name, 0.0), mib)
            minutes = (time.monotonic() - started) / 60
            progress(
                f"{minutes:5.1f} min: {window.rate:.0f}/s answered, {window.failed} failed, "
                f"p99 {window.quantile_ms(0.99):.1f} ms, simulator "
                f"{'running' if simulator.poll() is None else 'ENDED'}"
            )
    finally:
        simulator.terminate()
        simulator.wait(30)
    rss_end = stack.rss_mib()
    pids_after = {name: p.pid for name, p in stack.programs().items()}
    restarted = [n for n, pid in pids_after.items() if pids_before.get(n) != pid]
    errors = {s: _error_lines(stack, s) - errors_before[s] for s in SERVICES}

    lines = [
        f"Soak: {args.minutes:g} min, Predict at {rate:.0f}/s ({args.fraction:.0%} of the "
        f"{peak.rate:.0f}/s measured first), the simulator's default traffic; "
        f"{ok} answered, {failed} failed {failures or ''}, longest gap {longest_gap:.2f} s, "
        f"p99 per minute {min(latencies_p99):.0f}-{max(latencies_p99):.0f} ms; "
        f"restarted: {', '.join(restarted) or 'none'}; error log lines: "
        + ", ".join(f"{s} {n}" for s, n in errors.items()),
        "",
        "| program | RSS start MiB | RSS end MiB | largest sample MiB |",
        "|---|---|---|---|",
    ]
    for name in sorted(rss_start, key=lambda n: -rss_start[n]):
        lines.append(
            f"| {name} | {rss_start[name]:.0f} | {rss_end.get(name, 0):.0f} | "
            f"{rss_max.get(name, 0):.0f} |"
        )
    report = "\n".join(lines) + "\n"
    print(report)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(report)


def _error_lines(stack: OwnStack, service: str) -> int:
    path = stack.stack.log_file(service)
    if not path.exists():
        return 0
    with path.open(errors="replace") as lines:
        return sum(1 for line in lines if "level=error" in line)


if __name__ == "__main__":
    main()
