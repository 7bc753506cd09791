"""The model card logged with every run: what the model is, what it was trained on, how good."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from services.shared.usecase.features import MODEL_INPUTS

if TYPE_CHECKING:
    from services.training.pipeline import TrainedModel, TrainingRequest

_ROWS = (
    ("PR-AUC (average precision)", "pr_auc"),
    ("ROC-AUC", "roc_auc"),
    ("precision at threshold", "precision"),
    ("recall at threshold", "recall"),
    ("expected calibration error (10 bins)", "calibration_error"),
    ("decision threshold", "threshold"),
)


def render_model_card(
    *,
    model_name: str,
    request: TrainingRequest,
    trained: TrainedModel,
    code: str,
    environment: Mapping[str, str],
    feature_service: str,
    threshold_rule: str,
) -> str:
    model = trained.model_metrics.as_dict()
    baseline = trained.baseline_metrics.as_dict()
    split = trained.split
    table = "\n".join(
        f"| {label} | {model[key]:.4f} | {baseline[key]:.4f} |" for label, key in _ROWS
    )
    params = "\n".join(f"- `{k}` = `{v}`" for k, v in trained.params.as_logged().items())
    env = ", ".join(f"{k} {v}" for k, v in sorted(environment.items()))
    params_ = trained.params
    window = (
        f"around the drift onset {params_.drift_onset.isoformat()}: test = the latest "
        f"{params_.drift_test_fraction:.0%} of the labelled rows after it, validation the "
        f"{params_.drift_validation_fraction:.0%} before those, post-onset training rows "
        f"weighted {params_.drift_post_onset_weight:g}x"
        + (
            f", history from {params_.drift_window_days:g} days before the onset"
            if params_.drift_window_days
            else ""
        )
        if params_.drift_onset is not None
        else "oldest to newest over the whole snapshot"
    )
    imbalance = (
        f"positive weight {trained.pos_weight:.3f} in the loss, prior-corrected output"
        if trained.pos_weight != 1.0
        else "none (plain log-loss; the output is a calibrated probability as it is)"
    )
    return f"""# Model card: {model_name}

A card-payment fraud scorer: a tabular MLP (`FraudMLP`) that returns the probability that a
transaction is fraudulent. It carries its own input normalisation and is exported as
TorchScript (`model.pt`, sha256 `{trained.model_sha256}`).

## Intended use
Scoring transactions before they are processed. Transactions with
`fraud_probability >= {trained.threshold:.6f}` are flagged (threshold rule: `{threshold_rule}`,
chosen on the validation period). Not for decisions without human review of flagged cases.

## Training request
- request id: `{request.request_id}`, reason: `{request.reason}`, requested by:
  `{request.requested_by}`

## Data
- dataset snapshot `{trained.snapshot.id}` (sha256 `{trained.snapshot.sha256}`)
- features: feature service `{feature_service}` (point-in-time, as of 1 microsecond before each
  transaction) and the request-time transform; inputs: {", ".join(MODEL_INPUTS)}
- split by event time ({window}): train {len(split.train)} rows ({split.train.positives}
  frauds) before {split.validation_start.isoformat()}; validation {len(split.validation)} rows
  ({split.validation.positives} frauds); test {len(split.test)} rows ({split.test.positives}
  frauds) from {split.test_start.isoformat()}
- class imbalance: {imbalance}

## Evaluation on the held-out test period
| metric | model | baseline (HistGradientBoosting) |
|---|---|---|
{table}

Best epoch {trained.best_epoch} of {trained.epochs_run} run (early stopping on validation
PR-AUC, best {trained.validation_pr_auc:.4f}).

## Reproducibility
- parameters:
{params}
- code version `{code}`; environment: {env}
- weights sha256 `{trained.weights_sha256}` (deterministic on CPU: `mlops models reproduce`)

## Limitations
Trained on the snapshot's history only; fraud patterns drift (monitoring watches for it and
requests retraining). Calibration is measured on the test period and may degrade with drift.
"""
