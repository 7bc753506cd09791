"""The split of a drift-triggered run (services/training/window.py): trained and judged on
what changed, with post-onset rows weighted up."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import numpy as np
import pytest

from services.shared.errors import FailedPrecondition
from services.shared.evaluation import average_precision
from services.shared.proto.mlops.v1 import monitoring_pb2
from services.shared.usecase.features import MODEL_INPUTS
from services.training.dataset import LabelledSet, time_split
from services.training.fit import fit_fraud_mlp, scores
from services.training.pipeline import TrainingRequest
from services.training.settings import TrainingParams
from services.training.window import (
    WINDOW_ALL_HISTORY,
    WINDOW_POST_ONSET,
    split_for_training,
    training_window,
)

START = datetime(2026, 3, 1, tzinfo=UTC)


def shifted(n: int = 6000, onset_minute: int = 4800, seed: int = 0) -> LabelledSet:
    """One row a minute; fraud follows input 0 before ``onset_minute`` and input 1 after."""
    rng = np.random.default_rng(seed)
    features = rng.normal(size=(n, len(MODEL_INPUTS))).astype(np.float32)
    minute = np.arange(n)
    signal = np.where(minute < onset_minute, features[:, 0], features[:, 1])
    labels = (rng.random(n) < 1 / (1 + np.exp(-(-3.5 + 2.5 * signal)))).astype(np.float32)
    times = np.datetime64("2026-03-01T00:00:00", "us") + minute.astype("timedelta64[m]")
    return LabelledSet(features, labels, times, np.array([f"t{i}" for i in minute], dtype=object))


def test_without_an_onset_the_split_is_the_oldest_to_newest_one() -> None:
    data = shifted()
    params = TrainingParams()
    assert training_window(params) == WINDOW_ALL_HISTORY
    split, expected = split_for_training(data, params), time_split(data, 0.15, 0.2)
    assert list(split.test.transaction_ids) == list(expected.test.transaction_ids)
    assert split.train.weights is None


def test_a_drift_run_tests_on_the_latest_post_onset_rows_and_weights_them_up() -> None:
    data = shifted()
    onset = START + timedelta(minutes=4800)
    params = TrainingParams(
        drift_onset=onset,
        drift_test_fraction=0.4,
        drift_validation_fraction=0.2,
        drift_post_onset_weight=8.0,
    )
    assert training_window(params) == WINDOW_POST_ONSET
    split = split_for_training(data, params)
    at = np.datetime64("2026-03-01T00:00:00", "us") + np.timedelta64(4800, "m")
    # 1200 rows after the onset: 480 test (the latest), 240 validation just before them
    assert len(split.test) == 480 and len(split.validation) == 240
    assert split.validation.event_time.min() >= at
    assert split.validation.event_time.max() < split.test.event_time.min()
    assert split.test.event_time.max() == data.event_time.max()
    assert len(split.train) == 4800 + 480
    post = split.train.event_time >= at
    assert (
        post.sum() == 480 and split.train.event_time[post].max() < split.validation.event_time.min()
    )
    weights = split.train.row_weights()
    assert set(weights[post]) == {8.0} and set(weights[~post]) == {1.0}
    assert split.test_start == split.test.event_time.min().astype(datetime).replace(tzinfo=UTC)


def test_the_window_bounds_the_history_before_the_onset() -> None:
    data = shifted()
    onset = START + timedelta(minutes=4800)
    split = split_for_training(data, TrainingParams(drift_onset=onset, drift_window_days=1.0))
    at = np.datetime64("2026-03-01T00:00:00", "us") + np.timedelta64(4800, "m")
    before = split.train.event_time[split.train.event_time < at]
    assert before.size == 1440 and before.min() >= at - np.timedelta64(1, "D")


def test_too_little_labelled_traffic_after_the_onset_is_refused_with_a_reason() -> None:
    data = shifted()
    late = START + timedelta(minutes=5999)
    with pytest.raises(FailedPrecondition, match="since the drift onset"):
        split_for_training(data, TrainingParams(drift_onset=late))


def test_post_onset_emphasis_learns_the_new_pattern_better() -> None:
    """The same rows, the same model: weighting the few post-onset rows up gives a clearly
    better PR-AUC on the post-onset test rows than weighing every row alike."""
    data = shifted(n=8000, onset_minute=7000, seed=4)
    onset = START + timedelta(minutes=7000)
    fit = TrainingParams(epochs=25, patience=25, hidden=(16,), dropout=0.0, batch_size=128)
    results = {}
    for weight in (1.0, 20.0):
        params = fit.model_copy(update={"drift_onset": onset, "drift_post_onset_weight": weight})
        split = split_for_training(data, params)
        fitted = fit_fraud_mlp(split.train, split.validation, params)
        results[weight] = average_precision(
            split.test.labels, scores(fitted.model, split.test.features)
        )
    assert results[20.0] > results[1.0] + 0.05, results


def test_a_drift_request_carries_its_onset_into_the_run_parameters() -> None:
    onset = datetime(2026, 3, 4, 12, 30, tzinfo=UTC)
    message = monitoring_pb2.RetrainRequest(request_id="r-2", model_name="m", reason="drift")
    message.drift.event_id = "d-1"
    message.drift.onset_at.FromDatetime(onset)
    request = TrainingRequest.from_proto(message)
    assert (request.drift_onset, request.drift_event_id) == (onset, "d-1")
    params = request.params(TrainingParams())
    assert params.drift_onset == onset
    logged = params.as_logged()
    assert logged["drift_onset"] == "2026-03-04T12:30:00+00:00"
    assert TrainingParams.from_logged(logged) == params  # what `mlops models reproduce` reads
    plain = TrainingRequest.from_proto(monitoring_pb2.RetrainRequest(reason="schedule"))
    assert plain.drift_onset is None and plain.params(TrainingParams()).drift_onset is None
    assert TrainingParams().as_logged()["drift_onset"] == ""
    assert TrainingParams.from_logged(TrainingParams().as_logged()) == TrainingParams()
