"""The non-neural baseline: gradient-boosted trees on exactly the same training set.

Recorded next to the MLP's metrics in every run, so a reader sees at once whether the neural
model earns its place. Seeded; its threshold is chosen on validation like the MLP's.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from services.shared.evaluation import max_f1_threshold
from services.training.dataset import LabelledSet
from services.training.settings import TrainingParams


@dataclass
class FittedBaseline:
    model: object  # sklearn HistGradientBoostingClassifier
    threshold: float

    def scores(self, features: np.ndarray) -> np.ndarray:
        from threadpoolctl import threadpool_limits

        with threadpool_limits(limits=1):
            probabilities = self.model.predict_proba(features)  # type: ignore[attr-defined]
        return np.asarray(probabilities[:, 1], dtype=np.float64)


def fit_baseline(
    train: LabelledSet, validation: LabelledSet, params: TrainingParams
) -> FittedBaseline:
    from sklearn.ensemble import HistGradientBoostingClassifier
    from threadpoolctl import threadpool_limits

    model = HistGradientBoostingClassifier(
        max_iter=params.baseline_max_iter,
        learning_rate=0.05,
        early_stopping=False,
        random_state=params.seed,
    )
    # as many OpenMP threads as torch gets: on a shared machine more threads only spin
    with threadpool_limits(limits=params.torch_threads):
        model.fit(train.features, train.labels.astype(np.int64), sample_weight=train.row_weights())
    fitted = FittedBaseline(model, 0.5)
    fitted.threshold = max_f1_threshold(
        validation.labels, fitted.scores(validation.features), params.max_false_positive_rate
    )
    return fitted
