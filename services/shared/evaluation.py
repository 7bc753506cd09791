"""Evaluation metrics of a binary scorer, shared by training, the registry's gate and monitoring.

Plain numpy (no scikit-learn import on the registry's or monitoring's paths), with the same
definitions as scikit-learn's: PR-AUC is average precision (step-wise, no interpolation),
ROC-AUC the Mann-Whitney statistic with ties counted half. Expected calibration error uses
equal-width probability bins weighted by their share of rows; log-loss clips probabilities
to [1e-6, 1 - 1e-6].
"""

from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass

import numpy as np

_EPS = 1e-6
CALIBRATION_BINS = 10


def _as_arrays(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(labels, dtype=np.float64).reshape(-1)
    p = np.asarray(scores, dtype=np.float64).reshape(-1)
    if y.shape != p.shape:
        raise ValueError(f"labels ({y.shape[0]}) and scores ({p.shape[0]}) differ in length")
    if y.size == 0:
        raise ValueError("cannot evaluate on zero rows")
    return y, p


def average_precision(labels: np.ndarray, scores: np.ndarray) -> float:
    """PR-AUC as average precision: sum over thresholds of (R_n - R_{n-1}) * P_n."""
    y, p = _as_arrays(labels, scores)
    positives = y.sum()
    if positives == 0:
        return 0.0
    order = np.argsort(-p, kind="mergesort")
    y_sorted, p_sorted = y[order], p[order]
    # one point per distinct score: the last index of each run of equal scores
    distinct = np.r_[np.flatnonzero(np.diff(p_sorted)), y_sorted.size - 1]
    tp = np.cumsum(y_sorted)[distinct]
    fp = (distinct + 1) - tp
    precision = tp / (tp + fp)
    recall = tp / positives
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def roc_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Probability that a random positive scores above a random negative (ties: half)."""
    y, p = _as_arrays(labels, scores)
    n_pos = y.sum()
    n_neg = y.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(p, kind="mergesort")
    ranks = np.empty(p.size, dtype=np.float64)
    sorted_p = p[order]
    # average ranks over ties
    boundaries = np.r_[0, np.flatnonzero(np.diff(sorted_p)) + 1, p.size]
    for start, end in itertools.pairwise(boundaries):
        ranks[order[start:end]] = (start + end + 1) / 2.0
    return float((ranks[y == 1].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def calibration_bins(scores: np.ndarray) -> np.ndarray:
    """Each score's equal-width probability bin (0 .. CALIBRATION_BINS - 1)."""
    index = (np.asarray(scores, dtype=np.float64) * CALIBRATION_BINS).astype(np.int64)
    return np.clip(index, 0, CALIBRATION_BINS - 1)


def expected_calibration_error(labels: np.ndarray, scores: np.ndarray) -> float:
    """Sum over equal-width bins of (share of rows) * |mean score - fraud rate|, that is
    sum over bins of |sum of scores - number of frauds| / rows."""
    y, p = _as_arrays(labels, scores)
    gaps = np.bincount(calibration_bins(p), weights=p - y, minlength=CALIBRATION_BINS)
    return float(np.abs(gaps).sum() / y.size)


def log_loss_rows(labels: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Per-row log-loss (probabilities clipped to [1e-6, 1 - 1e-6])."""
    y, p = _as_arrays(labels, scores)
    p = np.clip(p, _EPS, 1 - _EPS)
    return np.asarray(-(y * np.log(p) + (1 - y) * np.log(1 - p)))


def log_loss(labels: np.ndarray, scores: np.ndarray) -> float:
    """Mean log-loss (cross-entropy) of the probabilities."""
    return float(log_loss_rows(labels, scores).mean())


def precision_recall_at(
    labels: np.ndarray, scores: np.ndarray, threshold: float
) -> tuple[float, float]:
    """Precision and recall when flagging ``score >= threshold``."""
    y, p = _as_arrays(labels, scores)
    flagged = p >= threshold
    tp = float((flagged & (y == 1)).sum())
    precision = tp / flagged.sum() if flagged.any() else 0.0
    recall = tp / y.sum() if y.sum() > 0 else 0.0
    return float(precision), float(recall)


def max_f1_threshold(
    labels: np.ndarray, scores: np.ndarray, max_false_positive_rate: float = 1.0
) -> float:
    """The score threshold maximising F1 (flag ``score >= threshold``) among those that flag
    at most ``max_false_positive_rate`` of the negatives.

    Candidates are the distinct scores; among equal F1 the highest threshold wins (fewer
    alerts for the same quality). With no positives, 1.0 (flag nothing). The cap matters
    when the positives are few (a validation period just after a shift): F1 on a handful of
    frauds can favour a low threshold that declines many legitimate payments, while the
    negatives, plentiful, measure the false-positive rate precisely.
    """
    y, p = _as_arrays(labels, scores)
    positives = y.sum()
    if positives == 0:
        return 1.0
    order = np.argsort(-p, kind="mergesort")
    y_sorted, p_sorted = y[order], p[order]
    distinct = np.r_[np.flatnonzero(np.diff(p_sorted)), y_sorted.size - 1]
    tp = np.cumsum(y_sorted)[distinct]
    flagged = distinct + 1
    f1 = 2 * tp / (flagged + positives)
    negatives = y.size - positives
    allowed = (flagged - tp) <= max_false_positive_rate * negatives
    if not allowed.any():
        return 1.0  # even the highest score flags too many negatives: flag nothing
    f1 = np.where(allowed, f1, -1.0)
    best = int(np.flatnonzero(f1 == f1.max())[0])  # scores descend: first = highest threshold
    return float(p_sorted[distinct[best]])


@dataclass(frozen=True)
class BinaryMetrics:
    """How a scorer does on one labelled set, at one decision threshold."""

    pr_auc: float
    roc_auc: float
    precision: float
    recall: float
    calibration_error: float
    log_loss: float
    threshold: float
    rows: int
    positives: int

    def as_dict(self, prefix: str = "") -> dict[str, float]:
        return {f"{prefix}{k}": float(v) for k, v in asdict(self).items()}


def evaluate(labels: np.ndarray, scores: np.ndarray, threshold: float) -> BinaryMetrics:
    y, p = _as_arrays(labels, scores)
    precision, recall = precision_recall_at(y, p, threshold)
    return BinaryMetrics(
        pr_auc=average_precision(y, p),
        roc_auc=roc_auc(y, p),
        precision=precision,
        recall=recall,
        calibration_error=expected_calibration_error(y, p),
        log_loss=log_loss(y, p),
        threshold=float(threshold),
        rows=int(y.size),
        positives=int(y.sum()),
    )
