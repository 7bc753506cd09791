"""Evaluation metrics (services/shared/evaluation.py) against scikit-learn's definitions."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score

from services.shared.evaluation import (
    average_precision,
    evaluate,
    expected_calibration_error,
    max_f1_threshold,
    precision_recall_at,
    roc_auc,
)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pr_auc_and_roc_auc_match_scikit_learn_with_ties(seed: int) -> None:
    rng = np.random.default_rng(seed)
    labels = (rng.random(500) < 0.1).astype(float)
    scores = np.round(rng.random(500) * 0.5 + labels * rng.random(500) * 0.5, 2)  # many ties
    assert average_precision(labels, scores) == pytest.approx(
        average_precision_score(labels, scores), abs=1e-12
    )
    assert roc_auc(labels, scores) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)


def test_perfect_and_inverted_rankings() -> None:
    labels = np.array([0, 0, 1, 1])
    assert average_precision(labels, np.array([0.1, 0.2, 0.8, 0.9])) == 1.0
    assert roc_auc(labels, np.array([0.1, 0.2, 0.8, 0.9])) == 1.0
    assert roc_auc(labels, np.array([0.9, 0.8, 0.2, 0.1])) == 0.0
    assert average_precision(np.zeros(3), np.array([0.1, 0.2, 0.3])) == 0.0
    assert np.isnan(roc_auc(np.zeros(3), np.array([0.1, 0.2, 0.3])))


def test_expected_calibration_error() -> None:
    # one bin [0.2, 0.3): mean score 0.25, fraud rate 0.5 -> 0.25
    assert expected_calibration_error(np.array([0, 1]), np.array([0.25, 0.25])) == pytest.approx(
        0.25
    )
    # perfectly calibrated bins
    labels = np.array([0] * 9 + [1] + [1] * 9 + [0])
    scores = np.array([0.1] * 10 + [0.9] * 10)
    assert expected_calibration_error(labels, scores) == pytest.approx(0.0)
    # a score of exactly 1.0 falls in the last bin, not outside
    assert expected_calibration_error(np.array([1]), np.array([1.0])) == pytest.approx(0.0)


def test_precision_and_recall_at_a_threshold() -> None:
    labels = np.array([0, 0, 1, 1, 1])
    scores = np.array([0.1, 0.6, 0.4, 0.7, 0.9])
    assert precision_recall_at(labels, scores, 0.5) == pytest.approx((2 / 3, 2 / 3))
    assert precision_recall_at(labels, scores, 0.95) == (0.0, 0.0)  # nothing flagged


def test_max_f1_threshold_keeps_the_false_positive_rate_within_its_cap() -> None:
    # 3 frauds among 100: the best F1 (0.86 at 0.49) flags one legitimate payment (1 %)
    labels = np.array([1, 1, 1] + [0] * 97)
    scores = np.array([0.9, 0.5, 0.49, 0.6] + [0.1] * 96)
    assert max_f1_threshold(labels, scores) == pytest.approx(0.49)
    capped = max_f1_threshold(labels, scores, max_false_positive_rate=0.005)
    assert capped == pytest.approx(0.9)  # one fraud caught, no legitimate payment flagged
    assert max_f1_threshold(labels, scores, max_false_positive_rate=0.02) == pytest.approx(0.49)


def test_max_f1_threshold_picks_the_best_and_highest_among_equals() -> None:
    labels = np.array([0, 0, 0, 1, 1])
    scores = np.array([0.1, 0.2, 0.3, 0.8, 0.9])
    assert max_f1_threshold(labels, scores) == pytest.approx(0.8)  # F1 = 1 exactly there
    # flagging >= 0.9 (P=1, R=1/2, F1=2/3) ties with flagging >= 0.6 (P=1/2, R=1, F1=2/3)
    tied = max_f1_threshold(np.array([1, 0, 0, 1]), np.array([0.9, 0.8, 0.7, 0.6]))
    assert tied == pytest.approx(0.9)
    assert max_f1_threshold(np.zeros(3), np.array([0.1, 0.5, 0.9])) == 1.0


def test_evaluate_rejects_mismatched_or_empty_input() -> None:
    with pytest.raises(ValueError, match="differ"):
        evaluate(np.array([0, 1]), np.array([0.5]), 0.5)
    with pytest.raises(ValueError, match="zero rows"):
        evaluate(np.array([]), np.array([]), 0.5)
    metrics = evaluate(np.array([0, 1, 1]), np.array([0.2, 0.7, 0.9]), 0.5)
    assert (metrics.rows, metrics.positives, metrics.precision, metrics.recall) == (3, 2, 1.0, 1.0)
    assert set(metrics.as_dict("test_")) >= {"test_pr_auc", "test_calibration_error"}
