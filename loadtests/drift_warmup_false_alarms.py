"""False alarms of the data detectors on stationary traffic when their reference is a small
sample (a version without a training reference takes its first live events).

Draws a reference of ``--reference`` rows and then ``--events`` live rows, both independently
from the recorded stationary traffic (the rows of
loadtests/data/drift_concept_2026-12-04.npz before its change), builds the detectors at the
service's defaults and counts their alarms; repeats ``--trials`` times. The stated rate is
1 per million events, all signals together.

    .venv/bin/python loadtests/drift_warmup_false_alarms.py --reference 500

Measured 2026-12-05 (2 cores, nothing else running; 100 trials x 20,000 events, reference
500): 20 alarms (10 per million) when thresholds were simulated against the reference itself;
10 (5 per million) with each simulated stretch against a resampled reference
(``services.monitoring.drift._null_maxima``). With the default warmup, reference 5,000 and 60
trials x 30,000 events: 2 alarms (1.1 per million).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from services.monitoring.drift import DriftConfig, data_detectors_from_warmup  # noqa: E402
from services.monitoring.settings import SHORT_MEMORY_DRIFT_INPUTS  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reference", type=int, default=500, help="rows in each reference")
    parser.add_argument("--events", type=int, default=20_000, help="live events per trial")
    parser.add_argument("--trials", type=int, default=100, help="references drawn")
    args = parser.parse_args()
    recording = dict(np.load(ROOT / "loadtests" / "data" / "drift_concept_2026-12-04.npz"))
    names = [str(n) for n in recording["input_names"]]
    columns = [names.index(n) for n in SHORT_MEMORY_DRIFT_INPUTS]
    before = recording["predicted_at"] < recording["change_at"]
    inputs = recording["features"][before][:, columns].astype(np.float64)
    scores = recording["score"][before].astype(np.float64)
    config = DriftConfig(inputs=SHORT_MEMORY_DRIFT_INPUTS)
    rng = np.random.default_rng(7)
    by_signal: dict[str, int] = {}
    started = time.monotonic()
    for _ in range(args.trials):
        drawn = rng.integers(0, len(inputs), args.reference)
        live = rng.integers(0, len(inputs), args.events)
        detectors = data_detectors_from_warmup(config, inputs[drawn], scores[drawn])
        times = np.arange(args.events, dtype=np.float64)
        for found in detectors.update(inputs[live], scores[live], times, config):
            by_signal[found.signal] = by_signal.get(found.signal, 0) + 1
    events = args.trials * args.events
    alarms = sum(by_signal.values())
    print(
        f"{alarms} alarms in {events:,} events ({alarms * 1e6 / events:.1f} per million, "
        f"stated {config.false_alarms_per_million:g}); by signal {by_signal}; "
        f"{time.monotonic() - started:.0f} s"
    )


if __name__ == "__main__":
    main()
