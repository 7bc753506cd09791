"""Time split, hyperparameters and the deterministic fit (no network, tiny synthetic data)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from services.shared.errors import FailedPrecondition
from services.shared.evaluation import expected_calibration_error
from services.shared.proto.mlops.v1 import monitoring_pb2
from services.shared.usecase.features import MODEL_INPUTS
from services.training.dataset import LabelledSet, time_split
from services.training.fit import (
    fit_fraud_mlp,
    load_torchscript,
    scores,
    torchscript_bytes,
    weights_sha256,
)
from services.training.pipeline import TrainingRequest
from services.training.settings import TrainingParams


def synthetic(n: int = 1200, seed: int = 0) -> LabelledSet:
    rng = np.random.default_rng(seed)
    features = rng.normal(size=(n, len(MODEL_INPUTS))).astype(np.float32)
    logit = -3.0 + 2.0 * features[:, 0] - 1.5 * features[:, 3]
    labels = (rng.random(n) < 1 / (1 + np.exp(-logit))).astype(np.float32)
    start = np.datetime64("2026-03-01T00:00:00", "us")
    times = start + rng.permutation(n).astype("timedelta64[m]")
    return LabelledSet(features, labels, times, np.array([f"t{i}" for i in range(n)], dtype=object))


def test_time_split_trains_on_the_past_and_tests_on_the_latest_period() -> None:
    data = synthetic()
    split = time_split(data, validation_fraction=0.15, test_fraction=0.2)
    assert len(split.train) + len(split.validation) + len(split.test) == len(data)
    assert split.train.event_time.max() < split.validation.event_time.min()
    assert split.validation.event_time.max() < split.test.event_time.min()
    assert len(split.test) == pytest.approx(0.2 * len(data), abs=2)
    assert len(split.validation) == pytest.approx(0.15 * len(data), abs=2)
    assert np.all(np.diff(split.train.event_time.astype(np.int64)) >= 0)  # ordered by time
    assert split.test_start.tzinfo is not None


def test_rows_sharing_a_boundary_timestamp_go_to_the_later_period() -> None:
    data = synthetic(100)
    same = np.full(100, np.datetime64("2026-03-01T00:00:00", "us"))
    same[:50] -= np.timedelta64(1, "h")
    tied = LabelledSet(data.features, np.tile([0.0, 1.0], 50), same, data.transaction_ids)
    with pytest.raises(FailedPrecondition, match="validation period has 0 rows"):
        time_split(tied, 0.2, 0.3)


def test_a_period_without_frauds_is_refused_with_a_reason() -> None:
    data = synthetic()
    no_fraud = LabelledSet(
        data.features, np.zeros(len(data), np.float32), data.event_time, data.transaction_ids
    )
    with pytest.raises(FailedPrecondition, match="both classes"):
        time_split(no_fraud, 0.15, 0.2)


def test_parameters_round_trip_through_their_logged_form() -> None:
    params = TrainingParams(hidden=(16, 8), learning_rate=0.0007, imbalance="none")
    logged = params.as_logged()
    assert logged["hidden"] == "16,8" and all(isinstance(v, str) for v in logged.values())
    assert TrainingParams.from_logged({**logged, "unknown": "x"}) == params


def test_fit_is_bit_identical_run_to_run_and_restores_torch_state() -> None:
    split = time_split(synthetic(), 0.15, 0.2)
    params = TrainingParams(epochs=4, patience=2, hidden=(16,), batch_size=64)
    threads = torch.get_num_threads()
    first = fit_fraud_mlp(split.train, split.validation, params)
    second = fit_fraud_mlp(split.train, split.validation, params)
    assert weights_sha256(first.model) == weights_sha256(second.model)
    assert [r.validation_pr_auc for r in first.history] == [
        r.validation_pr_auc for r in second.history
    ]
    assert torch.get_num_threads() == threads
    assert not torch.are_deterministic_algorithms_enabled()
    other = fit_fraud_mlp(split.train, split.validation, params.model_copy(update={"seed": 1}))
    assert weights_sha256(other.model) != weights_sha256(first.model)


def test_torchscript_export_keeps_weights_normalisation_and_outputs() -> None:
    split = time_split(synthetic(), 0.15, 0.2)
    fitted = fit_fraud_mlp(split.train, split.validation, TrainingParams(epochs=2, hidden=(8,)))
    loaded = load_torchscript(torchscript_bytes(fitted.model))
    assert weights_sha256(loaded) == weights_sha256(fitted.model)
    np.testing.assert_array_equal(
        scores(loaded, split.test.features), scores(fitted.model, split.test.features)
    )
    assert torch.allclose(loaded.mean, torch.from_numpy(split.train.features.mean(axis=0)))


def test_prior_correction_keeps_probabilities_calibrated() -> None:
    split = time_split(synthetic(4000, seed=3), 0.15, 0.2)
    params = TrainingParams(
        epochs=15, patience=15, hidden=(16,), dropout=0.0, imbalance="pos_weight"
    )
    fitted = fit_fraud_mlp(split.train, split.validation, params)
    assert fitted.pos_weight > 3
    corrected = scores(fitted.model, split.test.features)
    assert abs(corrected.mean() - split.test.labels.mean()) < 0.05
    # without the correction the same network would overstate fraud by ~log(pos_weight)
    output = fitted.model.net[-1]
    assert isinstance(output, torch.nn.Linear)
    with torch.no_grad():
        output.bias.add_(math.log(fitted.pos_weight))
    uncorrected = scores(fitted.model, split.test.features)
    assert expected_calibration_error(split.test.labels, corrected) < expected_calibration_error(
        split.test.labels, uncorrected
    )


def test_training_request_from_a_retrain_request() -> None:
    message = monitoring_pb2.RetrainRequest(
        request_id="r-1", model_name="m", reason="drift", requested_by="monitoring"
    )
    request = TrainingRequest.from_proto(message)
    assert (request.request_id, request.reason, request.snapshot_id) == ("r-1", "drift", "")
    assert request.gate_tests == 1  # a requester that does not say spends one test
    anonymous = TrainingRequest.from_proto(monitoring_pb2.RetrainRequest())
    assert anonymous.request_id.startswith("req-") and anonymous.reason == "manual"
    looped = TrainingRequest.from_proto(monitoring_pb2.RetrainRequest(gate_tests=4))
    assert looped.gate_tests == 4
