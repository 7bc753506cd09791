"""False alarms of the concept detectors (log loss, fraud rank) on stationary labelled outcomes
when their baseline is a version's first few hundred outcomes.

The outcomes are drawn independently from the recorded stationary traffic's scores
(``--recording``: loadtests/data/drift_<name>.npz, the rows before its change; by default the
2026-12-04 recording, 20 transactions/s over the 7-day default history, which the unit test
and the figures of 2026-12-06 use): a fraud with probability
``--fraud-rate`` (drawn from the recorded frauds' scores), else a legitimate payment. Each
trial builds fresh detectors at the service's defaults (``--warmup`` outcomes of log-loss
baseline, the default fraud-rank warmup), feeds them ``--outcomes`` more and counts alarms.
The stated rate is 1 false alarm per million events for all signals together, of which each
signal's share is 1 / ``signal_count``.

    .venv/bin/python loadtests/concept_warmup_false_alarms.py --warmup 600

Measured 2026-12-06 (2 cores, nothing else running), see BENCHMARKS.md "Drift detection".
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from services.monitoring.drift import (  # noqa: E402
    ConceptDetector,
    DriftConfig,
    FraudRankDetector,
    signal_count,
)
from services.monitoring.settings import SHORT_MEMORY_DRIFT_INPUTS  # noqa: E402

NAMES = ("log_loss", "fraud_rank")


@dataclass
class Trials:
    """The concept detectors' alarms on stationary outcomes, over independent baselines."""

    alarms: dict[str, int]
    watched: dict[str, int]  # outcomes each signal watched (after its warmup)
    first: dict[str, list[int]]  # per trial: outcomes watched at its first alarm (or outcomes+1)
    frauds: int  # distinct recorded fraud scores drawn from
    legit: int


RECORDING = "concept_2026-12-04"


def run_trials(
    warmup: int,
    outcomes: int,
    trials: int,
    fraud_rate: float,
    seed: int,
    recording_name: str = RECORDING,
) -> Trials:
    recording = dict(np.load(ROOT / "loadtests" / "data" / f"drift_{recording_name}.npz"))
    before = recording["predicted_at"] < recording["change_at"]
    scores = recording["score"][before].astype(np.float64)
    labels = recording["label"][before].astype(bool)
    frauds, legit = scores[labels], scores[~labels]
    config = DriftConfig(inputs=SHORT_MEMORY_DRIFT_INPUTS, concept_warmup=warmup)
    signals = signal_count(config)
    rng = np.random.default_rng(seed)
    result = Trials(
        dict.fromkeys(NAMES, 0), dict.fromkeys(NAMES, 0), {n: [] for n in NAMES},
        len(frauds), len(legit),
    )  # fmt: skip
    for _ in range(trials):
        detectors: dict[str, ConceptDetector | FraudRankDetector] = {
            "log_loss": ConceptDetector(config, signals),
            "fraud_rank": FraudRankDetector(config, signals),
        }
        n = warmup + outcomes
        is_fraud = rng.random(n) < fraud_rate
        drawn = np.where(
            is_fraud,
            frauds[rng.integers(0, len(frauds), n)],
            legit[rng.integers(0, len(legit), n)],
        )
        seen = dict.fromkeys(NAMES, 0)
        alarmed_at: dict[str, int] = {}
        for i in range(n):
            for name, detector in detectors.items():
                seen[name] += detector.ready
                if detector.update(float(drawn[i]), bool(is_fraud[i]), float(i)) is not None:
                    result.alarms[name] += 1
                    alarmed_at.setdefault(name, seen[name])
        for name in NAMES:
            result.watched[name] += seen[name]
            result.first[name].append(alarmed_at.get(name, outcomes + 1))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--warmup", type=int, default=600, help="log-loss baseline outcomes")
    parser.add_argument("--outcomes", type=int, default=20_000, help="watched outcomes per trial")
    parser.add_argument("--trials", type=int, default=100, help="baselines drawn")
    parser.add_argument("--fraud-rate", type=float, default=0.05, help="share of frauds")
    parser.add_argument(
        "--recording", default=RECORDING, help="loadtests/data/drift_<name>.npz (e.g. concept)"
    )
    args = parser.parse_args()
    started = time.monotonic()
    result = run_trials(
        args.warmup, args.outcomes, args.trials, args.fraud_rate, seed=11,
        recording_name=args.recording,
    )  # fmt: skip
    signals = signal_count(DriftConfig(inputs=SHORT_MEMORY_DRIFT_INPUTS))
    print(
        f"{args.trials} trials, baseline {args.warmup} outcomes, {result.frauds} recorded "
        f"frauds / {result.legit} legitimate scores, {time.monotonic() - started:.0f} s; "
        f"stated per signal: {1 / signals:.3f} per million"
    )
    for name in NAMES:
        per_million = result.alarms[name] * 1e6 / max(result.watched[name], 1)
        within = np.asarray(result.first[name])
        shares = ", ".join(
            f"{np.mean(within <= m):.1%} within {m:,}"
            for m in sorted({1000, 5000, args.outcomes})
            if m <= args.outcomes
        )
        print(
            f"{name:<10} {result.alarms[name]:>4} alarms in {result.watched[name]:,} outcomes "
            f"({per_million:.1f}/M); trials alarmed: {shares}"
        )


if __name__ == "__main__":
    main()
