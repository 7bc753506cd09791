"""The paired bootstrap (services/shared/paired_comparison.py): exact on each resample, and
its interval covers the true difference at about the nominal rate."""

from __future__ import annotations

import numpy as np
import pytest

from services.shared.evaluation import (
    average_precision,
    calibration_bins,
    expected_calibration_error,
    log_loss_rows,
)
from services.shared.paired_comparison import (
    _BinnedScorer,
    _resample_counts,
    _SortedScorer,
    paired_bootstrap,
)


def _population(n: int, fraud_rate: float, seed: int) -> tuple[np.ndarray, ...]:
    """Labels and two correlated models' scores; the candidate separates frauds better."""
    rng = np.random.default_rng(seed)
    labels = (rng.random(n) < fraud_rate).astype(float)
    shared = rng.normal(0, 1, n)  # what both models get wrong alike (they are paired)
    baseline = -3.0 + 1.5 * labels + shared + rng.normal(0, 0.7, n)
    candidate = -3.0 + 1.9 * labels + shared + rng.normal(0, 0.7, n)
    return labels, 1 / (1 + np.exp(-baseline)), 1 / (1 + np.exp(-candidate))


def test_the_pr_auc_of_every_resample_equals_the_metric_on_the_resampled_rows() -> None:
    rng = np.random.default_rng(3)
    labels = (rng.random(400) < 0.1).astype(float)
    scores = np.round(rng.random(400) * 0.6 + labels * rng.random(400) * 0.4, 2)  # ties
    counts = _resample_counts(
        rng, np.flatnonzero(labels == 1), np.flatnonzero(labels == 0), labels.size, 20
    )
    fast = _SortedScorer(labels, scores).average_precision(counts)
    for row, value in zip(counts, fast, strict=True):
        rows = np.repeat(np.arange(labels.size), row)
        assert value == pytest.approx(average_precision(labels[rows], scores[rows]), abs=1e-12)
        assert labels[rows].sum() == labels.sum()  # stratified: the frauds' count is kept


def test_the_calibration_error_of_every_resample_equals_the_metric_on_the_resampled_rows() -> None:
    labels, baseline, _ = _population(500, 0.1, 4)
    rng = np.random.default_rng(5)
    counts = _resample_counts(
        rng, np.flatnonzero(labels == 1), np.flatnonzero(labels == 0), labels.size, 20
    )
    fast = _BinnedScorer(labels, baseline).calibration_error(counts)
    for row, value in zip(counts, fast, strict=True):
        rows = np.repeat(np.arange(labels.size), row)
        want = expected_calibration_error(labels[rows], baseline[rows])
        assert value == pytest.approx(want, abs=1e-12)


def test_a_better_calibrated_candidate_has_a_calibration_interval_above_zero() -> None:
    labels, baseline, _ = _population(3000, 0.05, 1)
    overconfident = np.clip(baseline * 3, 0, 1)  # the same ranking, probabilities too high
    result = paired_bootstrap(
        labels, overconfident, baseline, metric="calibration_error", resamples=400, confidence=0.95
    )
    assert result.statistic == pytest.approx(
        expected_calibration_error(labels, overconfident)
        - expected_calibration_error(labels, baseline)
    )
    assert 0 < result.low < result.statistic < result.high


def test_a_clearly_better_candidate_has_an_interval_above_zero() -> None:
    labels, baseline, candidate = _population(3000, 0.05, 1)
    result = paired_bootstrap(
        labels, baseline, candidate, metric="pr_auc", resamples=500, confidence=0.95
    )
    assert result.statistic == pytest.approx(
        average_precision(labels, candidate) - average_precision(labels, baseline)
    )
    assert 0 < result.low < result.statistic < result.high
    assert (result.rows, result.positives, result.resamples) == (3000, labels.sum(), 500)
    swapped = paired_bootstrap(
        labels, candidate, baseline, metric="pr_auc", resamples=500, confidence=0.95
    )
    assert swapped.high < 0


def test_identical_models_have_a_zero_width_interval_at_zero() -> None:
    labels, baseline, _ = _population(1000, 0.05, 2)
    for metric in ("pr_auc", "log_loss", "calibration_error"):
        result = paired_bootstrap(
            labels, baseline, baseline.copy(), metric=metric, resamples=200, confidence=0.95
        )
        assert (result.low, result.statistic, result.high) == (0.0, 0.0, 0.0)


def _calibration_error_at(labels: np.ndarray, scores: np.ndarray, fraud_rate: float) -> float:
    """The population's calibration error when frauds make ``fraud_rate`` of the rows."""
    weights = np.where(
        labels == 1, fraud_rate / labels.mean(), (1 - fraud_rate) / (1 - labels.mean())
    )
    gaps = np.bincount(calibration_bins(scores), weights=weights * (scores - labels))
    return float(np.abs(gaps).sum() / weights.sum())


@pytest.mark.parametrize("metric", ["pr_auc", "log_loss", "calibration_error"])
def test_the_interval_covers_the_true_difference_at_about_the_nominal_rate(metric: str) -> None:
    """200 samples of 1500 rows (75 frauds) from a population of 400 000 rows whose
    difference is known: a 90% interval should cover it in about 180 of them (binomial sd
    4.2). A bootstrap that ignored the pairing would cover far more often (wider intervals);
    one that resampled too little, far less."""
    labels, baseline, candidate = _population(400_000, 0.05, 7)
    positives, negatives = np.flatnonzero(labels == 1), np.flatnonzero(labels == 0)
    if metric == "pr_auc":
        truth = average_precision(labels, candidate) - average_precision(labels, baseline)
    elif metric == "log_loss":  # the sample's class mix is fixed at 5%: class-weighted mean
        gain = log_loss_rows(labels, baseline) - log_loss_rows(labels, candidate)
        truth = 0.05 * gain[positives].mean() + 0.95 * gain[negatives].mean()
    else:
        truth = _calibration_error_at(labels, baseline, 0.05) - _calibration_error_at(
            labels, candidate, 0.05
        )
    rng = np.random.default_rng(11)
    covered, trials = 0, 200
    for trial in range(trials):
        rows = np.concatenate(
            [rng.choice(positives, 75, replace=False), rng.choice(negatives, 1425, replace=False)]
        )
        result = paired_bootstrap(
            labels[rows],
            baseline[rows],
            candidate[rows],
            metric=metric,  # type: ignore[arg-type]
            resamples=300,
            confidence=0.90,
            seed=trial,
        )
        covered += result.low <= truth <= result.high
    assert 0.82 * trials <= covered <= 0.97 * trials, covered


def test_a_single_class_or_mismatched_lengths_is_refused() -> None:
    with pytest.raises(ValueError, match="both classes"):
        paired_bootstrap(
            np.zeros(10), np.zeros(10), np.ones(10), metric="pr_auc", resamples=10, confidence=0.9
        )
    with pytest.raises(ValueError, match="same length"):
        paired_bootstrap(
            np.zeros(10), np.zeros(9), np.ones(10), metric="pr_auc", resamples=10, confidence=0.9
        )
