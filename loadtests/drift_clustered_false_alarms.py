"""False alarms of a per-input data detector on a binary input whose 1s come in episodes.

``country_mismatch`` is mostly fraud: the simulator's fraud comes in episodes of 2-8 payments
on one card, ~45 s apart, 75 % abroad. At 5 transactions/s (the e2e drift test's world) an
episode spans ~800 events, and ~9 episodes overlap at any time, so the input's 1s cluster:
its count in a window varies more than independent draws would. The detectors' thresholds
are calibrated on independent draws from the reference (``drift._null_maxima``), so they
understate the false alarms on such an input.

This draws that input's process directly (legitimate payments abroad at 1.25 %, episodes as
the simulator makes them, 5 %+ in all), takes the first ``--reference`` events of each trial
as the warmup reference, and counts the per-input detector's alarms on the next
``--events``. The stated rate is per signal: 1 per million events over the 29 signals of the
default inputs, so 2/29 per million for an input's two sides.

    .venv/bin/python loadtests/drift_clustered_false_alarms.py --reference 500

Measured 2026-12-06 (2 cores, nothing else running), alarms of the input's two sides against
a stated 0.07 per million: reference 500 (60 trials x 20,000 events), 20 alarms (16.7 per
million); the same streams shuffled (the same 1s, no episodes), 1 (0.8 per million).
Reference 5,000 (20 x 40,000), 2 alarms (2.5 per million); shuffled, 0. A moving-block
calibration (blocks of 100-500 reference rows, tried on a variant of this stream) did not
lower them: an episode spans more events than a 500-event reference has, and that
reference's own mean is off by as much as the changes it is meant to see.
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

RATE = 5.0  # events per second
LEGIT_ABROAD = 0.0125
FRAUD_RATE = 0.05
BURST_MEAN = 4.5  # 2 + min(Poisson(2.5), 6)
GAP_S = 45.0
ABROAD = 0.75
# signals of the default inputs (2 per input, the pooled one, the score's 2, 2 concept)
DEFAULT_SIGNALS = 29


def clustered_stream(rng: np.random.Generator, n: int) -> np.ndarray:
    """``n`` events of the input at ``RATE`` per second: 1 for a payment abroad."""
    span = n / RATE
    x = (rng.random(n) < LEGIT_ABROAD).astype(np.float64)
    # episodes that began before the stretch go on into it
    episodes = rng.poisson(FRAUD_RATE * RATE / BURST_MEAN * (span + 600.0))
    for start in rng.uniform(-600.0, span, episodes):
        size = 2 + min(int(rng.poisson(2.5)), 6)
        times = start + np.concatenate([[0.0], np.cumsum(rng.exponential(GAP_S, size - 1))])
        times = times[(times >= 0) & (times < span) & (rng.random(size) < ABROAD)]
        x[(times * RATE).astype(int)] = 1.0
    return x


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reference", type=int, default=500, help="warmup events")
    parser.add_argument("--events", type=int, default=20_000, help="live events per trial")
    parser.add_argument("--trials", type=int, default=20, help="streams drawn")
    parser.add_argument(
        "--shuffled", action="store_true", help="the control: each stream in random order"
    )
    args = parser.parse_args()
    # one input: scale the budget so the input gets the run length it has among the defaults
    config = DriftConfig(inputs=("country_mismatch",), false_alarms_per_million=7 / DEFAULT_SIGNALS)
    rng = np.random.default_rng(1)
    alarms = 0
    started = time.monotonic()
    for _ in range(args.trials):
        x = clustered_stream(rng, args.reference + args.events)
        if args.shuffled:  # the same 1s, no episodes
            x = rng.permutation(x)
        scores = rng.normal(size=len(x))  # the score detector is not counted here
        reference = x[: args.reference, None], scores[: args.reference]
        detectors = data_detectors_from_warmup(config, *reference)
        times = np.arange(args.events, dtype=np.float64)
        found = detectors.update(x[args.reference :, None], scores[args.reference :], times, config)
        alarms += sum(f.signal == "country_mismatch" for f in found)
    events = args.trials * args.events
    print(
        f"{alarms} alarms of the input's detector in {events:,} events "
        f"({alarms * 1e6 / events:.1f} per million, stated {2e6 / (DEFAULT_SIGNALS * 1e6):.2f}); "
        f"{time.monotonic() - started:.0f} s"
    )


if __name__ == "__main__":
    main()
