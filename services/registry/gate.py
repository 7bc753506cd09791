"""The evaluation gate: does a candidate beat production on the same held-out data?

Both models are TorchScript files (``torch.jit.load``, never pickle) scored by the registry on
the candidate's held-out test set (the latest period of its snapshot, which production never
trained on when production is older). The candidate passes only if its PR-AUC exceeds
production's by more than the configured margin *and* its expected calibration error is at
most production's plus the configured tolerance. With no production version, the first
model passes (there is nothing to compare with), as long as its test set has both classes.
"""

from __future__ import annotations

import io
import json
import warnings
from dataclasses import asdict, dataclass

import numpy as np
import pyarrow.parquet as pq

from services.registry.run_contract import LABEL_COLUMN
from services.shared.errors import IntegrityError, InvalidArgument
from services.shared.evaluation import BinaryMetrics, evaluate
from services.shared.proto.mlops.v1 import models_pb2

GATE_METRIC = "pr_auc"


@dataclass(frozen=True)
class GatePolicy:
    metric_margin: float
    calibration_tolerance: float


@dataclass(frozen=True)
class GateDecision:
    passed: bool
    reason: str
    metric: str
    candidate_value: float
    baseline_value: float
    margin: float
    candidate_calibration_error: float
    baseline_calibration_error: float
    baseline_version: int

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> GateDecision:
        return cls(**json.loads(text))

    def to_proto(self) -> models_pb2.GateResult:
        return models_pb2.GateResult(**asdict(self))


def decide(
    policy: GatePolicy,
    candidate: BinaryMetrics,
    production: BinaryMetrics | None,
    production_version: int,
) -> GateDecision:
    """The gate's verdict from both models' metrics on the same test set (pure)."""
    if candidate.positives in (0, candidate.rows):
        return GateDecision(
            False,
            f"the held-out test set has {candidate.positives} frauds in {candidate.rows} rows: "
            "PR-AUC is undefined, nothing to judge the candidate on",
            GATE_METRIC,
            candidate.pr_auc,
            production.pr_auc if production else 0.0,
            policy.metric_margin,
            candidate.calibration_error,
            production.calibration_error if production else 0.0,
            production_version,
        )
    if production is None:
        return GateDecision(
            True,
            "no production version yet: the first model becomes production",
            GATE_METRIC,
            candidate.pr_auc,
            0.0,
            policy.metric_margin,
            candidate.calibration_error,
            0.0,
            0,
        )
    required = production.pr_auc + policy.metric_margin
    beats = candidate.pr_auc > required
    calibration_limit = production.calibration_error + policy.calibration_tolerance
    calibrated = candidate.calibration_error <= calibration_limit
    if beats and calibrated:
        reason = (
            f"PR-AUC {candidate.pr_auc:.4f} beats production v{production_version}'s "
            f"{production.pr_auc:.4f} by more than {policy.metric_margin:.4f}; calibration "
            f"error {candidate.calibration_error:.4f} <= {calibration_limit:.4f}"
        )
    else:
        failures = []
        if not beats:
            failures.append(
                f"PR-AUC {candidate.pr_auc:.4f} does not beat production "
                f"v{production_version}'s {production.pr_auc:.4f} by more than "
                f"{policy.metric_margin:.4f}"
            )
        if not calibrated:
            failures.append(
                f"calibration error {candidate.calibration_error:.4f} is worse than production's "
                f"{production.calibration_error:.4f} + tolerance "
                f"{policy.calibration_tolerance:.4f}"
            )
        reason = "; ".join(failures)
    return GateDecision(
        beats and calibrated,
        reason,
        GATE_METRIC,
        candidate.pr_auc,
        production.pr_auc,
        policy.metric_margin,
        candidate.calibration_error,
        production.calibration_error,
        production_version,
    )


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


def evaluate_model(payload: bytes, held_out: HeldOutSet, threshold: float) -> BinaryMetrics:
    return evaluate(held_out.labels, score_torchscript(payload, held_out.features), threshold)
