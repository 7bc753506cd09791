"""The evaluation gate's decisions (pure): a paired bootstrap on the same held-out rows."""

from __future__ import annotations

import json

import numpy as np
import pytest

from services.registry.gate import GateDecision, GatePolicy, decide
from services.shared.proto.mlops.v1 import models_pb2

# the synthetic models rank well but are not calibrated: calibration has its own test
POLICY = GatePolicy(
    margin=0.0, calibration_tolerance=1.0, resamples=400, min_rows=300, min_positives=20
)


def _scores(labels: np.ndarray, skill: float, seed: int, shared: np.ndarray) -> np.ndarray:
    """A model whose frauds score ``skill`` logits higher; ``shared`` is the noise both
    models share (they err on the same transactions), so the comparison is paired."""
    rng = np.random.default_rng(seed)
    return 1 / (1 + np.exp(-(-3.2 + skill * labels + shared + rng.normal(0, 0.6, labels.size))))


def _held_out(n: int = 2000, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return (rng.random(n) < 0.05).astype(float), rng.normal(0, 0.8, n)


def test_the_first_model_passes_without_a_comparison() -> None:
    labels, shared = _held_out()
    decision = decide(POLICY, labels, _scores(labels, 2.0, 1, shared), 0.5, None, 0.5, 0)
    assert decision.passed and decision.outcome == "passed" and decision.baseline_version == 0
    assert "first model" in decision.reason and decision.test == ""


def test_a_clearly_better_candidate_passes_with_its_interval_recorded() -> None:
    labels, shared = _held_out()
    production = _scores(labels, 1.5, 1, shared)
    candidate = _scores(labels, 3.0, 2, shared)
    decision = decide(POLICY, labels, candidate, 0.3, production, 0.3, 3)
    assert decision.passed and decision.outcome == "passed", decision.reason
    assert decision.margin < decision.interval_low <= decision.statistic <= decision.interval_high
    assert decision.statistic == pytest.approx(decision.candidate_value - decision.baseline_value)
    assert (decision.rows, decision.positives) == (2000, int(labels.sum()))
    assert (decision.resamples, decision.confidence) == (400, 0.95)
    assert decision.test.startswith("paired bootstrap of the pr_auc difference")
    assert "better than production v3" in decision.reason


def test_a_test_of_several_on_one_shift_spends_its_share_of_the_error_rate() -> None:
    assert POLICY.split_over(1) is POLICY and POLICY.split_over(0) is POLICY
    split = POLICY.split_over(4)
    assert split.confidence == pytest.approx(1 - 0.05 / 4)
    labels, shared = _held_out(n=600, seed=3)
    production = _scores(labels, 1.5, 1, shared)
    candidate = _scores(labels, 1.8, 2, shared)
    alone = decide(POLICY, labels, candidate, 0.3, production, 0.3, 3)
    shared_budget = decide(split, labels, candidate, 0.3, production, 0.3, 3)
    # the same data, a wider interval: a candidate's lower bound must clear more
    assert shared_budget.confidence == pytest.approx(0.9875)
    assert shared_budget.interval_low < alone.interval_low
    assert shared_budget.interval_high > alone.interval_high
    assert "98.75% interval" in shared_budget.reason


def test_an_equal_candidate_fails_and_a_better_point_estimate_is_not_enough() -> None:
    labels, shared = _held_out()
    production = _scores(labels, 2.0, 1, shared)
    same = decide(POLICY, labels, production.copy(), 0.3, production, 0.3, 3)
    assert not same.passed and same.outcome == "failed"
    assert "not shown better" in same.reason
    # a candidate of the same skill that happens to score a little higher on this set: the
    # old point-estimate gate passed it; the interval does not
    for seed in range(2, 30):
        twin = _scores(labels, 2.0, seed, shared)
        decision = decide(POLICY, labels, twin, 0.3, production, 0.3, 3)
        if decision.statistic > 0:
            assert not decision.passed and decision.interval_low <= 0 < decision.statistic
            break
    else:
        pytest.fail("no same-skill candidate scored higher by chance")


def test_a_same_skill_candidate_rarely_passes() -> None:
    """The gate's false-pass rate: with confidence 0.95 a candidate no better than production
    passes with probability about 2.5%; 60 such candidates should pass at most a handful
    (P(>= 6 of 60 at 2.5%) < 0.5%)."""
    policy = GatePolicy(calibration_tolerance=1.0, resamples=200, min_rows=300, min_positives=20)
    passes = 0
    for seed in range(60):
        labels, shared = _held_out(800, seed)
        production = _scores(labels, 2.0, 1000 + seed, shared)
        candidate = _scores(labels, 2.0, 2000 + seed, shared)
        passes += decide(policy, labels, candidate, 0.3, production, 0.3, 1).passed
    assert passes <= 5


def test_the_margin_applies_to_the_lower_end_of_the_interval() -> None:
    labels, shared = _held_out()
    production = _scores(labels, 1.5, 1, shared)
    candidate = _scores(labels, 3.0, 2, shared)
    loose = decide(POLICY, labels, candidate, 0.3, production, 0.3, 3)
    strict = GatePolicy(
        margin=loose.interval_low + 0.01,
        calibration_tolerance=1.0,
        resamples=400,
        min_positives=20,
    )
    tight = decide(strict, labels, candidate, 0.3, production, 0.3, 3)
    assert loose.passed and not tight.passed
    assert tight.statistic > tight.margin  # the point estimate alone would have passed


def test_a_tiny_held_out_set_is_insufficient_data_not_a_verdict() -> None:
    labels, shared = _held_out(200)
    production = _scores(labels, 1.0, 1, shared)
    candidate = _scores(labels, 4.0, 2, shared)
    decision = decide(POLICY, labels, candidate, 0.3, production, 0.3, 3)
    assert not decision.passed and decision.outcome == "insufficient_data"
    assert decision.test == "" and decision.rows == 200
    assert "insufficient data" in decision.reason and "300 rows" in decision.reason
    few_frauds = np.zeros(1000)
    few_frauds[:5] = 1
    decision = decide(POLICY, few_frauds, few_frauds * 0.9, 0.5, few_frauds * 0.1, 0.5, 3)
    assert decision.outcome == "insufficient_data" and decision.positives == 5


def test_a_test_set_without_both_classes_cannot_pass() -> None:
    nothing = decide(POLICY, np.zeros(500), np.full(500, 0.1), 0.5, None, 0.5, 0)
    assert not nothing.passed and nothing.outcome == "insufficient_data"


def test_worse_calibration_rejects_even_a_better_ranking() -> None:
    labels, shared = _held_out()
    production = _scores(labels, 1.5, 1, shared)
    better = _scores(labels, 3.0, 2, shared)
    overconfident = np.clip(better * 4, 0, 1)  # the same ranking, probabilities far too high
    policy = GatePolicy(calibration_tolerance=0.02, resamples=400, min_positives=20)
    decision = decide(policy, labels, overconfident, 0.5, production, 0.3, 3)
    assert not decision.passed and decision.interval_low > 0
    assert decision.calibration_interval_high < -0.02 < 0 < decision.candidate_calibration_error
    assert decision.calibration_statistic == pytest.approx(
        decision.baseline_calibration_error - decision.candidate_calibration_error
    )
    assert "calibration error" in decision.reason and "shown worse" in decision.reason


def test_calibration_worse_on_the_point_estimates_alone_is_no_verdict_against_a_candidate() -> None:
    """Few frauds: the candidate's calibration error exceeds production's plus the tolerance on
    the held-out rows, but its interval reaches past it; the better ranking decides."""
    labels, shared = _held_out(n=400, seed=8)
    production = _scores(labels, 1.5, 1, shared)
    candidate = np.clip(_scores(labels, 3.5, 2, shared) * 1.15, 0, 1)  # a little too high
    policy = GatePolicy(calibration_tolerance=0.02, resamples=400, min_positives=10)
    decision = decide(policy, labels, candidate, 0.5, production, 0.3, 3)
    point_gap = decision.candidate_calibration_error - decision.baseline_calibration_error
    assert point_gap > 0.02, point_gap  # the old point comparison would have rejected it
    assert decision.calibration_interval_high >= -0.02 > decision.calibration_interval_low
    assert decision.passed, decision.reason
    assert "not shown worse" in decision.reason


def test_log_loss_is_a_gate_metric_too() -> None:
    labels, shared = _held_out()
    production = _scores(labels, 1.5, 1, shared)
    candidate = _scores(labels, 3.0, 2, shared)
    decision = decide(
        GatePolicy(metric="log_loss", calibration_tolerance=1.0, resamples=300, min_positives=20),
        labels,
        candidate,
        0.3,
        production,
        0.3,
        3,
    )
    assert decision.passed and decision.metric == "log_loss"
    assert decision.candidate_value < decision.baseline_value  # lower log-loss is better
    assert decision.statistic == pytest.approx(decision.baseline_value - decision.candidate_value)


def test_the_decision_round_trips_through_its_json_tag_and_proto() -> None:
    labels, shared = _held_out()
    decision = decide(
        POLICY,
        labels,
        _scores(labels, 3.0, 2, shared),
        0.3,
        _scores(labels, 1.5, 1, shared),
        0.3,
        3,
    )
    assert GateDecision.from_json(decision.to_json()) == decision
    message = decision.to_proto()
    assert message.passed and message.baseline_version == 3
    assert message.outcome == models_pb2.GATE_OUTCOME_PASSED
    assert (message.interval_low, message.interval_high) == (
        decision.interval_low,
        decision.interval_high,
    )
    assert (message.rows, message.positives, message.resamples) == (2000, decision.positives, 400)
    assert message.test == decision.test and message.confidence == 0.95


def test_a_tag_written_by_the_point_estimate_gate_still_reads() -> None:
    old = {
        "passed": False,
        "reason": "PR-AUC 0.5 does not beat production",
        "metric": "pr_auc",
        "candidate_value": 0.5,
        "baseline_value": 0.6,
        "margin": 0.0,
        "candidate_calibration_error": 0.01,
        "baseline_calibration_error": 0.01,
        "baseline_version": 1,
    }
    decision = GateDecision.from_json(json.dumps(old))
    assert decision.outcome == "failed" and decision.test == "" and decision.rows == 0
    assert decision.to_proto().outcome == models_pb2.GATE_OUTCOME_FAILED
