"""What a run trains and is judged on: the whole history, or what matters after a shift.

A run without a shift (bootstrap, schedule, manual) uses ``dataset.time_split``: train on the
oldest rows, validate on the next period, test on the latest one.

A run answering a drift event (``TrainingParams.drift_onset``, from the event's ``onset_at``)
splits around the onset instead, because after a shift the latest 20 % of all history is
still mostly pre-shift traffic: a model tested there is judged on a world that is gone.

- test: the most recent ``drift_test_fraction`` of the labelled rows after the onset (what
  the registry's gate compares candidate and production on);
- validation: the ``drift_validation_fraction`` of post-onset rows just before them (early
  stopping and the decision threshold follow the new traffic);
- train: the rest of the post-onset rows, weighted ``drift_post_onset_weight`` each, plus
  the history before the onset (the last ``drift_window_days`` of it, or all), weight 1:
  the pre-onset rows still teach what legitimate traffic looks like, the weight makes the
  few post-onset frauds count.

The defaults (all history, post-onset weight 10, test 40 % / validation 20 % of the post-onset
rows) were chosen by measurement: loadtests/drift_training_window.py on a simulated concept
shift (7 days of `mlops bootstrap` history, 2000 users; then `mlops simulate --rate 30
--concept-drift-at 60 --fraud-rate 0.05 --label-delay 5` for 420 s: 10 553 labelled rows with
174 frauds after the onset). Each strategy trained on what was labelled 2 or 4 minutes after
the onset and was scored on every row after that (median of seeds 1 and 2):

| after the onset | strategy | PR-AUC on later rows | recall | FPR |
|---|---|---|---|---|
| 2 min | whole-history split (before) | 0.029 | 0.447 | 0.638 |
| 2 min | post-onset split, weight 1 | 0.085 | 0.118 | 0.015 |
| 2 min | post-onset split, weight 10 | 0.085 | 0.105 | 0.007 |
| 2 min | post-onset split, weight 30 | 0.081 | 0.101 | 0.009 |
| 2 min | last day only, weight 10 | 0.050 | 0.066 | 0.008 |
| 2 min | post-onset rows only | 0.037 | 0.000 | 0.000 |
| 4 min | whole-history split (before) | 0.019 | 0.386 | 0.637 |
| 4 min | post-onset split, weight 1 | 0.037 | 0.038 | 0.003 |
| 4 min | post-onset split, weight 10 | 0.255 | 0.167 | 0.004 |
| 4 min | post-onset split, weight 30 | 0.215 | 0.106 | 0.002 |
| 4 min | last day only, weight 10 | 0.101 | 0.030 | 0.003 |
| 4 min | post-onset rows only | 0.098 | 0.008 | 0.000 |

(Fraud is 1.6 % of the rows after the onset, so a random scorer's PR-AUC is 0.016; the later
rows hold 40-120 frauds, so these are rough figures, but the ordering held on both seeds.) The
whole-history split picks its threshold on pre-shift validation rows and flags most of the new
traffic. The run records the strategy and its parameters (MLflow params ``drift_*`` and the
``mlops.training_window`` tag; the lineage's params), so the lineage says how it was trained.
"""

from __future__ import annotations

from datetime import UTC, datetime

import numpy as np
import pandas as pd

from services.shared.errors import FailedPrecondition
from services.training.dataset import LabelledSet, TimeSplit, require_both_classes, time_split
from services.training.settings import TrainingParams

WINDOW_ALL_HISTORY = "time_split"  # oldest-to-newest split of the whole snapshot
WINDOW_POST_ONSET = "post_onset"  # split around a drift onset (module docstring)


def training_window(params: TrainingParams) -> str:
    """The name of the strategy ``split_for_training`` applies with ``params``."""
    return WINDOW_POST_ONSET if params.drift_onset is not None else WINDOW_ALL_HISTORY


def _as_datetime64(moment: datetime) -> np.datetime64:
    utc = moment.astimezone(UTC) if moment.tzinfo else moment.replace(tzinfo=UTC)
    return np.datetime64(utc.replace(tzinfo=None), "us")


def _utc(value: np.datetime64) -> datetime:
    return pd.Timestamp(value, tz="UTC").to_pydatetime()


def split_for_training(data: LabelledSet, params: TrainingParams) -> TimeSplit:
    """The run's train/validation/test split (module docstring)."""
    if params.drift_onset is None:
        return time_split(data, params.validation_fraction, params.test_fraction)
    return post_onset_split(data, params.drift_onset, params)


def post_onset_split(data: LabelledSet, onset: datetime, params: TrainingParams) -> TimeSplit:
    order = np.argsort(data.event_time, kind="mergesort")
    times = data.event_time[order]
    at = _as_datetime64(onset)
    after = order[times >= at]
    before = order[times < at]
    if params.drift_window_days > 0:
        since = at - np.timedelta64(int(params.drift_window_days * 86_400e6), "us")
        before = before[data.event_time[before] >= since]
    n = after.size
    post = data.subset(after)
    if n < 3 or post.positives == 0:
        raise FailedPrecondition(
            f"{n} labelled transactions ({post.positives} frauds) since the drift onset "
            f"{onset.isoformat()}: too few to train and judge on what changed (wait for labels)"
        )
    test_from = n - max(1, round(n * params.drift_test_fraction))
    validation_from = test_from - max(1, round(n * params.drift_validation_fraction))
    train_index = np.concatenate([before, after[:validation_from]])
    weights = np.concatenate(
        [
            np.ones(before.size, dtype=np.float32),
            np.full(validation_from, params.drift_post_onset_weight, dtype=np.float32),
        ]
    )
    split = TimeSplit(
        train=data.subset(train_index).weighted(weights),
        validation=data.subset(after[validation_from:test_from]),
        test=data.subset(after[test_from:]),
        validation_start=_utc(data.event_time[after[validation_from]]),
        test_start=_utc(data.event_time[after[test_from]]),
    )
    require_both_classes(split)
    return split
