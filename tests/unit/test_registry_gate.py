"""The evaluation gate's decisions (pure) and their recorded form."""

from __future__ import annotations

from services.registry.gate import GateDecision, GatePolicy, decide
from services.shared.evaluation import BinaryMetrics

POLICY = GatePolicy(metric_margin=0.01, calibration_tolerance=0.02)


def metrics(pr_auc: float, ece: float, positives: int = 20, rows: int = 500) -> BinaryMetrics:
    return BinaryMetrics(pr_auc, 0.9, 0.5, 0.5, ece, 0.3, rows, positives)


def test_the_first_model_passes_without_a_comparison() -> None:
    decision = decide(POLICY, metrics(0.2, 0.3), None, 0)
    assert decision.passed and decision.baseline_version == 0
    assert "first model" in decision.reason


def test_a_candidate_beating_production_by_the_margin_passes() -> None:
    decision = decide(POLICY, metrics(0.70, 0.05), metrics(0.60, 0.04), 3)
    assert decision.passed
    assert (decision.candidate_value, decision.baseline_value) == (0.70, 0.60)
    assert decision.baseline_version == 3 and decision.metric == "pr_auc"
    assert "beats production v3" in decision.reason


def test_a_candidate_within_the_margin_or_equal_is_rejected() -> None:
    within = decide(POLICY, metrics(0.605, 0.04), metrics(0.60, 0.04), 3)
    assert not within.passed and "does not beat production v3" in within.reason
    equal = decide(GatePolicy(0.0, 0.02), metrics(0.60, 0.04), metrics(0.60, 0.04), 3)
    assert not equal.passed


def test_worse_calibration_rejects_even_a_better_ranking() -> None:
    decision = decide(POLICY, metrics(0.90, 0.10), metrics(0.60, 0.05), 2)
    assert not decision.passed
    assert "calibration error 0.1000 is worse" in decision.reason
    assert "PR-AUC" not in decision.reason  # the ranking part passed
    slightly = decide(POLICY, metrics(0.90, 0.069), metrics(0.60, 0.05), 2)
    assert slightly.passed  # within the tolerance


def test_every_failed_condition_is_in_the_reason() -> None:
    decision = decide(POLICY, metrics(0.5, 0.2), metrics(0.6, 0.05), 2)
    assert not decision.passed
    assert "does not beat" in decision.reason and "calibration" in decision.reason


def test_a_test_set_without_both_classes_cannot_pass() -> None:
    assert not decide(POLICY, metrics(0.0, 0.01, positives=0), None, 0).passed
    assert not decide(POLICY, metrics(1.0, 0.01, positives=500), metrics(0.5, 0.1), 1).passed


def test_the_decision_round_trips_through_its_json_tag_and_proto() -> None:
    decision = decide(POLICY, metrics(0.70, 0.05), metrics(0.60, 0.04), 3)
    assert GateDecision.from_json(decision.to_json()) == decision
    message = decision.to_proto()
    assert message.passed and message.baseline_version == 3
    assert message.candidate_calibration_error == 0.05 and message.reason == decision.reason
