"""How should a drift-triggered run train? A measurement on a simulated concept shift.

The data: a snapshot of a local stack after `mlops bootstrap` (days of history with the old
fraud pattern) followed by live traffic whose fraud pattern changes
(`mlops simulate --concept-drift-at S`), built into the point-in-time training set exactly as
the training service builds it. For each cutoff ("the run starts this long after the onset"),
every strategy trains on the labelled rows up to the cutoff, and all are scored on the same
rows after it (the traffic the new model will face): PR-AUC, and recall / false-positive rate
at the threshold each strategy chose on its own validation rows. Strategies:

- ``all_history``: today's split of the whole snapshot (test = latest 20 % of all rows);
- ``post_onset_wN``: services/training/window.py with post-onset weight N (all history);
- ``window_1d_w10``: the same with only the last day before the onset, weight 10;
- ``post_onset_only``: only rows after the onset.

    .venv/bin/python loadtests/drift_training_window.py --snapshot SNAP --onset ISO \\
        [--cutoffs 120,240] [--seeds 1,2]     # with the stack's environment (`mlops stack env`)
    .venv/bin/python loadtests/drift_training_window.py --dataset set.npz --onset ISO

``--save set.npz`` keeps the built training set for later runs. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from services.shared.evaluation import average_precision, max_f1_threshold  # noqa: E402
from services.training.dataset import LabelledSet  # noqa: E402
from services.training.fit import fit_fraud_mlp, scores  # noqa: E402
from services.training.settings import TrainingParams  # noqa: E402
from services.training.window import split_for_training  # noqa: E402

STRATEGIES: dict[str, dict[str, Any]] = {
    "all_history": {"drift_onset": None},
    "post_onset_w1": {"drift_post_onset_weight": 1.0},
    "post_onset_w10": {"drift_post_onset_weight": 10.0},
    "post_onset_w30": {"drift_post_onset_weight": 30.0},
    "window_1d_w10": {"drift_post_onset_weight": 10.0, "drift_window_days": 1.0},
    "post_onset_only": {"drift_post_onset_weight": 1.0, "drift_window_days": 1e-6},
}


def load(args: argparse.Namespace) -> LabelledSet:
    if args.dataset:
        d = np.load(args.dataset, allow_pickle=False)
        return LabelledSet(
            d["features"],
            d["labels"],
            d["event_time"].astype("datetime64[us]"),
            d["ids"].astype(object),
        )
    from services.shared.datasets import load_snapshot
    from services.training.dataset import TrainingSetBuilder
    from services.training.settings import TrainingSettings

    settings = TrainingSettings()
    snapshot = load_snapshot(settings.storage, args.snapshot)
    data = TrainingSetBuilder(settings.storage, settings.feast, settings.redis).build(snapshot)
    if args.save:
        np.savez(
            args.save,
            features=data.features,
            labels=data.labels,
            event_time=data.event_time.astype("int64"),
            ids=data.transaction_ids.astype(str),
        )
    return data


def run(data: LabelledSet, onset: datetime, cutoff_s: float, seed: int) -> dict[str, dict]:
    cut = np.datetime64(onset.replace(tzinfo=None), "us") + np.timedelta64(
        int(cutoff_s * 1e6), "us"
    )
    known = data.subset(np.flatnonzero(data.event_time <= cut))
    future = data.subset(np.flatnonzero(data.event_time > cut))
    results = {}
    for name, overrides in STRATEGIES.items():
        params = TrainingParams(seed=seed, drift_onset=onset).model_copy(update=overrides)
        started = time.monotonic()
        split = split_for_training(known, params)
        fitted = fit_fraud_mlp(split.train, split.validation, params)
        threshold = max_f1_threshold(
            split.validation.labels, scores(fitted.model, split.validation.features)
        )
        s = scores(fitted.model, future.features)
        y = future.labels
        flagged = s >= threshold
        results[name] = {
            "pr_auc": average_precision(y, s),
            "recall": float((flagged & (y == 1)).sum() / max(1, (y == 1).sum())),
            "fpr": float((flagged & (y == 0)).sum() / max(1, (y == 0).sum())),
            "test_rows": len(split.test),
            "test_frauds": split.test.positives,
            "seconds": time.monotonic() - started,
        }
        print(
            f"  cutoff {cutoff_s:g}s seed {seed} {name:16s} PR-AUC {results[name]['pr_auc']:.3f} "
            f"recall {results[name]['recall']:.3f} FPR {results[name]['fpr']:.4f} "
            f"(test {len(split.test)} rows, {split.test.positives} frauds; "
            f"{results[name]['seconds']:.0f}s)",
            flush=True,
        )
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--snapshot", default="")
    parser.add_argument("--dataset", default="")
    parser.add_argument("--save", default="")
    parser.add_argument("--onset", required=True, help="ISO time of the shift (UTC)")
    parser.add_argument("--cutoffs", default="120,240", help="seconds after the onset")
    parser.add_argument("--seeds", default="1,2")
    args = parser.parse_args()
    onset = datetime.fromisoformat(args.onset)
    onset = onset.replace(tzinfo=None) if onset.tzinfo is None else onset
    data = load(args)
    at = np.datetime64(onset.replace(tzinfo=None), "us")
    after = data.event_time >= at
    print(
        f"{len(data)} labelled rows ({data.positives} frauds); after the onset "
        f"{int(after.sum())} rows ({int(data.labels[after].sum())} frauds)",
        flush=True,
    )
    table: dict[tuple[float, str], list[dict]] = {}
    for cutoff in (float(c) for c in args.cutoffs.split(",")):
        for seed in (int(s) for s in args.seeds.split(",")):
            for name, result in run(data, onset, cutoff, seed).items():
                table.setdefault((cutoff, name), []).append(result)
    print("\n| cutoff after onset | strategy | PR-AUC after the cutoff | recall | FPR |")
    print("|---|---|---|---|---|")
    for (cutoff, name), results in table.items():
        cells = [
            f"{statistics.median(r[key] for r in results):.{digits}f}"
            for key, digits in (("pr_auc", 3), ("recall", 3), ("fpr", 4))
        ]
        print(f"| {timedelta(seconds=cutoff)} | {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
