"""The evaluation gate: is a candidate better than production on the same held-out data?

Both models are TorchScript files (``torch.jit.load``, never pickle) scored by the registry on
the candidate's held-out test set: the latest labelled traffic of its snapshot, which
production never trained on when production is older. Both score the *same* rows, so the gate
is a paired test (services/shared/paired_comparison.py): a paired bootstrap of the candidate's
improvement in the gate metric (PR-AUC by default, or log-loss), resampling labelled
transactions stratified by class. The candidate passes only when

- the held-out set is large enough to judge on (at least ``min_rows`` rows and
  ``min_positives`` frauds; below that the outcome is *insufficient data*, not a verdict: the
  version stays a candidate and is not published), and
- the lower end of the two-sided ``confidence`` interval of the improvement clears the margin
  (so a candidate no better than production fails with probability about
  ``1 - (1 - confidence) / 2``, whatever the point estimates say), and
- its expected calibration error is not shown worse than production's plus the tolerance: a
  paired bootstrap of production's minus the candidate's calibration error on the same
  resamples (10 equal-width bins), at the same confidence; the candidate fails when the
  interval's upper end lies below ``-tolerance``. A better ranking must not come with badly
  calibrated probabilities, which the decision threshold relies on; a guard on point
  estimates alone rejected good candidates on a few dozen frauds, where the calibration
  error of either model moves by several hundredths from one resample to the next.

A requester that may retrain after a rejection (the autopilot: up to its cycle's
training attempts) says how many tests it may spend (``RetrainRequest.gate_tests``, the run's
``mlops.gate_tests`` tag); each is then made at ``1 - (1 - confidence) / tests``
(``GatePolicy.split_over``) and the interval recorded is that wider one.

With no production version the first model passes (there is nothing to compare with), as long
as its test set has both classes.
"""

from __future__ import annotations

import io
import json
import warnings
from dataclasses import asdict, dataclass, fields, replace
from typing import Literal

import numpy as np
import pyarrow.parquet as pq

from services.registry.settings import RegistrySettings
from services.shared.errors import IntegrityError, InvalidArgument
from services.shared.evaluation import BinaryMetrics, evaluate
from services.shared.paired_comparison import PairedMetric, paired_bootstrap
from services.shared.proto.mlops.v1 import models_pb2
from services.shared.run_contract import LABEL_COLUMN

GateOutcome = Literal["passed", "failed", "insufficient_data"]
_OUTCOMES: dict[str, int] = {
    "passed": models_pb2.GATE_OUTCOME_PASSED,
    "failed": models_pb2.GATE_OUTCOME_FAILED,
    "insufficient_data": models_pb2.GATE_OUTCOME_INSUFFICIENT_DATA,
}


@dataclass(frozen=True)
class GatePolicy:
    """How the gate decides (RegistrySettings supplies the values)."""

    metric: PairedMetric = "pr_auc"
    margin: float = 0.0
    calibration_tolerance: float = 0.02
    confidence: float = 0.95
    resamples: int = 1000
    min_rows: int = 300
    min_positives: int = 20
    seed: int = 0

    @classmethod
    def from_settings(cls, settings: RegistrySettings) -> GatePolicy:
        return cls(
            metric=settings.gate_metric,
            margin=settings.gate_metric_margin,
            calibration_tolerance=settings.gate_calibration_tolerance,
            confidence=settings.gate_confidence,
            resamples=settings.gate_resamples,
            min_rows=settings.gate_min_rows,
            min_positives=settings.gate_min_positives,
        )

    def split_over(self, tests: int) -> GatePolicy:
        """The policy for one of ``tests`` gate tests spent on one shift (a cycle that may
        retrain after a rejection): Bonferroni, each test at ``(1 - confidence) /
        tests``, so the chance that a candidate no better than production passes any of
        them stays the stated one."""
        if tests <= 1:
            return self
        return replace(self, confidence=1.0 - (1.0 - self.confidence) / tests)


@dataclass(frozen=True)
class GateDecision:
    """The gate's verdict and the statistics it rests on (a version tag, and GateResult)."""

    passed: bool
    reason: str
    metric: str
    candidate_value: float
    baseline_value: float
    margin: float
    candidate_calibration_error: float
    baseline_calibration_error: float
    baseline_version: int
    outcome: GateOutcome = "failed"
    test: str = ""  # empty: no comparison (the first model, or too little data)
    statistic: float = 0.0  # the candidate's improvement on the held-out rows
    interval_low: float = 0.0
    interval_high: float = 0.0
    confidence: float = 0.0
    rows: int = 0
    positives: int = 0
    resamples: int = 0
    # production's minus the candidate's calibration error (positive: better calibrated),
    # with its interval at ``confidence``
    calibration_statistic: float = 0.0
    calibration_interval_low: float = 0.0
    calibration_interval_high: float = 0.0

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> GateDecision:
        known = {f.name for f in fields(cls)}
        # tags written before the gate was a paired test lack the statistics: defaults
        data = {k: v for k, v in json.loads(text).items() if k in known}
        if "outcome" not in data:
            data["outcome"] = "passed" if data.get("passed") else "failed"
        return cls(**data)

    def to_proto(self) -> models_pb2.GateResult:
        values = asdict(self)
        values["outcome"] = _OUTCOMES[self.outcome]
        return models_pb2.GateResult(**values)


def decide(
    policy: GatePolicy,
    labels: np.ndarray,
    candidate: np.ndarray,
    candidate_threshold: float,
    production: np.ndarray | None,
    production_threshold: float,
    production_version: int,
) -> GateDecision:
    """The gate's verdict from both models' scores of the same held-out rows (pure)."""
    y = np.asarray(labels, dtype=np.float64)
    rows, positives = int(y.size), int(y.sum())
    cand = evaluate(y, candidate, candidate_threshold) if rows else None
    base = (
        evaluate(y, production, production_threshold) if rows and production is not None else None
    )

    def verdict(outcome: GateOutcome, reason: str, **stats: object) -> GateDecision:
        return GateDecision(
            passed=outcome == "passed",
            reason=reason,
            metric=policy.metric,
            candidate_value=_metric(cand, policy.metric),
            baseline_value=_metric(base, policy.metric),
            margin=policy.margin,
            candidate_calibration_error=cand.calibration_error if cand else 0.0,
            baseline_calibration_error=base.calibration_error if base else 0.0,
            baseline_version=production_version if production is not None else 0,
            outcome=outcome,
            rows=rows,
            positives=positives,
            **stats,  # type: ignore[arg-type]  # the statistics fields, by name
        )

    if positives in (0, rows):
        return verdict(
            "insufficient_data",
            f"insufficient data: the held-out test set has {positives} frauds in {rows} rows; "
            "a metric needs both classes, nothing to judge the candidate on",
        )
    if production is None:
        return verdict("passed", "no production version yet: the first model becomes production")
    if rows < policy.min_rows or positives < policy.min_positives:
        return verdict(
            "insufficient_data",
            f"insufficient data: the held-out test set has {rows} rows with {positives} frauds; "
            f"the gate needs at least {policy.min_rows} rows and {policy.min_positives} frauds "
            f"to compare with production v{production_version} (no verdict)",
        )
    comparison = paired_bootstrap(
        y,
        production,
        candidate,
        metric=policy.metric,
        resamples=policy.resamples,
        confidence=policy.confidence,
        seed=policy.seed,
    )
    calibration = paired_bootstrap(
        y,
        production,
        candidate,
        metric="calibration_error",
        resamples=policy.resamples,
        confidence=policy.confidence,
        seed=policy.seed,
    )
    beats = comparison.low > policy.margin
    calibrated = calibration.high >= -policy.calibration_tolerance
    if beats:
        said = (
            f"better than production v{production_version}: {comparison.describe()}; the "
            f"interval's lower end clears the margin {policy.margin:.4f}"
        )
    else:
        said = (
            f"not shown better than production v{production_version}: {comparison.describe()}; "
            f"the interval's lower end does not clear the margin {policy.margin:.4f}"
        )
    ece = (
        f"calibration error {calibration.candidate_value:.4f} vs production's "
        f"{calibration.baseline_value:.4f}, improvement {calibration.statistic:+.4f}, "
        f"{calibration.confidence * 100:g}% interval [{calibration.low:+.4f}, "
        f"{calibration.high:+.4f}]"
    )
    if calibrated:
        said += f"; {ece}: not shown worse than the tolerance {policy.calibration_tolerance:.4f}"
    else:
        said += f"; {ece}: shown worse than production's by more than the tolerance " + (
            f"{policy.calibration_tolerance:.4f}"
        )
    return verdict(
        "passed" if beats and calibrated else "failed",
        said,
        test=comparison.test,
        statistic=comparison.statistic,
        interval_low=comparison.low,
        interval_high=comparison.high,
        confidence=comparison.confidence,
        resamples=comparison.resamples,
        calibration_statistic=calibration.statistic,
        calibration_interval_low=calibration.low,
        calibration_interval_high=calibration.high,
    )


def _metric(metrics: BinaryMetrics | None, metric: PairedMetric) -> float:
    if metrics is None:
        return 0.0
    if metric == "pr_auc":
        return metrics.pr_auc
    return metrics.log_loss


@dataclass(frozen=True)
class HeldOutSet:
    features: np.ndarray  # float32 [rows, inputs]
    labels: np.ndarray  # 0/1


def read_held_out_set(payload: bytes, feature_names: list[str]) -> HeldOutSet:
    """The trainer's test-set artifact (Parquet), columns in the model's input order."""
    try:
        table = pq.read_table(io.BytesIO(payload))
    except Exception as exc:  # a corrupt artifact: a clear refusal, not an INTERNAL error
        raise InvalidArgument(
            "run_id", f"the run's test set is not readable Parquet: {exc}"
        ) from exc
    missing = [c for c in (*feature_names, LABEL_COLUMN) if c not in table.column_names]
    if missing:
        raise InvalidArgument("run_id", f"the run's test set lacks columns {missing}")
    features = np.stack(
        [table.column(name).to_numpy().astype(np.float32) for name in feature_names], axis=1
    )
    labels = table.column(LABEL_COLUMN).to_numpy().astype(np.float64)
    return HeldOutSet(features, labels)


def score_torchscript(payload: bytes, features: np.ndarray) -> np.ndarray:
    """Fraud probabilities of a TorchScript model (loaded from bytes; no pickle)."""
    import torch

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            module = torch.jit.load(io.BytesIO(payload), map_location="cpu")
    except Exception as exc:  # not a TorchScript archive
        raise IntegrityError(f"the artifact is not a loadable TorchScript model: {exc}") from exc
    module.eval()
    with torch.inference_mode():
        output = module(torch.from_numpy(np.ascontiguousarray(features, dtype=np.float32)))
    result = output.reshape(-1).numpy().astype(np.float64)
    if result.shape[0] != features.shape[0] or not np.all(np.isfinite(result)):
        raise IntegrityError("the model's output is not one finite probability per row")
    return result
