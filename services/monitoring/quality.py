"""Live model quality per model version and route, over a sliding window of outcomes.

Each (model name, version, route) keeps its most recent resolved predictions: joined with a
label, or left unlabelled (expired or evicted). A window spans at most ``window_s`` seconds of
stream time and ``window_max`` predictions. From it: PR-AUC (average precision), precision and
recall at the version's own threshold (the ``flagged`` bit serving logged), log loss, expected
calibration error (10 equal-width bins), label coverage (labelled / resolved) and how many
labelled outcomes and frauds these rest on. Below ``min_labelled`` labelled outcomes or
``min_positives`` frauds the figures are "insufficient data" (None), never a verdict.

``PairedScores`` keeps the most recent labelled transactions per model with every version's
score, for the paired comparison of two versions on the same transactions (shadow mirrors all
traffic, so production and shadow score the same ones).
"""

from __future__ import annotations

import math
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from services.monitoring.detectors import log_loss
from services.monitoring.outcomes import Outcome, Prediction
from services.shared.evaluation import average_precision, expected_calibration_error

VersionKey = tuple[str, int, str]  # model name, version, route


@dataclass(frozen=True)
class QualityFigures:
    model_name: str
    model_version: int
    route: str
    window_start: float | None
    window_end: float | None
    resolved: int  # predictions in the window (labelled or not)
    n_labelled: int
    positives: int
    label_coverage: float | None
    pr_auc: float | None
    precision: float | None
    recall: float | None
    log_loss: float | None
    ece: float | None
    status: str  # "ok" | "insufficient data"

    def as_dict(self) -> dict[str, Any]:
        return {
            k: (None if isinstance(v, float) and math.isnan(v) else v)
            for k, v in vars(self).items()
        }


@dataclass
class _Window:
    times: deque[float] = field(default_factory=deque)
    scores: deque[float] = field(default_factory=deque)
    flagged: deque[bool] = field(default_factory=deque)
    labels: deque[int] = field(default_factory=deque)  # 1, 0, or -1: no label


class LiveQuality:
    def __init__(
        self, *, window_s: float, window_max: int, min_labelled: int, min_positives: int
    ) -> None:
        self.window_s = window_s
        self.window_max = window_max
        self.min_labelled = min_labelled
        self.min_positives = min_positives
        self._windows: dict[VersionKey, _Window] = {}

    def add_outcome(self, outcome: Outcome) -> None:
        self._add(outcome.prediction, 1 if outcome.is_fraud else 0, outcome.labelled_at)

    def add_unlabelled(self, prediction: Prediction, at: float) -> None:
        self._add(prediction, -1, at)

    def _add(self, p: Prediction, label: int, at: float) -> None:
        window = self._windows.setdefault((p.model_name, p.model_version, p.route), _Window())
        window.times.append(at)
        window.scores.append(p.score)
        window.flagged.append(p.flagged)
        window.labels.append(label)
        if len(window.times) > self.window_max:
            self._pop(window)

    @staticmethod
    def _pop(window: _Window) -> None:
        window.times.popleft()
        window.scores.popleft()
        window.flagged.popleft()
        window.labels.popleft()

    def slide(self, now: float) -> None:
        """Forget what is older than ``window_s`` (stream time); drop empty windows."""
        for key in list(self._windows):
            window = self._windows[key]
            while window.times and window.times[0] < now - self.window_s:
                self._pop(window)
            if not window.times:
                del self._windows[key]

    def versions(self) -> list[VersionKey]:
        return sorted(self._windows)

    def figures(self, key: VersionKey) -> QualityFigures:
        window = self._windows.get(key)
        name, version, route = key
        if window is None or not window.times:
            return QualityFigures(
                name, version, route, None, None, 0, 0, 0, None, None, None, None, None, None,
                "insufficient data",
            )  # fmt: skip
        labels = np.fromiter(window.labels, dtype=np.int8, count=len(window.labels))
        known = labels >= 0
        y = labels[known].astype(np.float64)
        p = np.fromiter(window.scores, dtype=np.float64, count=len(labels))[known]
        flagged = np.fromiter(window.flagged, dtype=bool, count=len(labels))[known]
        n, positives = int(known.sum()), int(y.sum())
        coverage = n / len(labels)
        base: dict[str, Any] = dict(
            model_name=name,
            model_version=version,
            route=route,
            window_start=window.times[0],
            window_end=window.times[-1],
            resolved=len(labels),
            n_labelled=n,
            positives=positives,
            label_coverage=coverage,
        )
        if n < self.min_labelled or positives < self.min_positives:
            return QualityFigures(
                **base, pr_auc=None, precision=None, recall=None, log_loss=None, ece=None,
                status="insufficient data",
            )  # fmt: skip
        true_positives = float((flagged & (y == 1)).sum())
        return QualityFigures(
            **base,
            pr_auc=average_precision(y, p),
            precision=true_positives / flagged.sum() if flagged.any() else 0.0,
            recall=true_positives / positives,
            log_loss=float(log_loss(p, y).mean()),
            ece=expected_calibration_error(y, p),
            status="ok",
        )


class PairedScores:
    """The latest ``capacity`` labelled transactions of each model, with each version's score."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        # model -> transaction_id -> (label, {version: (score, flagged)})
        self._by_model: dict[str, OrderedDict[str, tuple[bool, dict[int, tuple[float, bool]]]]] = {}

    def add(self, outcome: Outcome) -> None:
        p = outcome.prediction
        recent = self._by_model.setdefault(p.model_name, OrderedDict())
        entry = recent.get(p.transaction_id)
        if entry is None:
            entry = (outcome.is_fraud, {})
            recent[p.transaction_id] = entry
            if len(recent) > self.capacity:
                recent.popitem(last=False)
        entry[1][p.model_version] = (p.score, p.flagged)

    def paired(self, model_name: str, baseline: int, candidate: int, limit: int) -> dict[str, Any]:
        """The most recent (up to ``limit``) labelled transactions both versions scored,
        oldest first: each version's score and decision (flagged: at its own threshold)."""
        chosen: list[tuple[str, int, tuple[float, bool], tuple[float, bool]]] = []
        for transaction_id, (label, scores) in reversed(self._by_model.get(model_name, {}).items()):
            if baseline in scores and candidate in scores:
                chosen.append((transaction_id, int(label), scores[baseline], scores[candidate]))
                if len(chosen) >= limit:
                    break
        chosen.reverse()
        return {
            "model_name": model_name,
            "baseline": baseline,
            "candidate": candidate,
            "n": len(chosen),
            "transaction_ids": [c[0] for c in chosen],
            "baseline_scores": [c[2][0] for c in chosen],
            "candidate_scores": [c[3][0] for c in chosen],
            "baseline_flagged": [c[2][1] for c in chosen],
            "candidate_flagged": [c[3][1] for c in chosen],
            "labels": [c[1] for c in chosen],
        }
