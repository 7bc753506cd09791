"""The training pipeline: snapshot -> training set -> model -> evaluation -> MLflow -> registry.

``TrainingPipeline`` is the training service's domain object. The Kafka consumer, ``mlops
train --local`` and ``mlops models reproduce`` all call it:

- ``train(snapshot, params)`` is the pure, reproducible part: build the point-in-time training
  set, split it by time, fit the MLP (deterministic on CPU) and the gradient-boosting
  baseline, choose the decision threshold on validation (maximum F1: the model flags
  ``probability >= threshold``), evaluate both on the held-out test period.
- ``run(request)`` resolves the snapshot (the request's, or a new one of the archive as it is
  now), trains, logs the MLflow run (parameters, metrics, lineage tags, TorchScript model,
  model card, test set, metrics.json) and registers it over gRPC. A request already carried
  out (redelivered after a crash) is not trained twice.
- ``reproduce(lineage)`` trains again from a registered version's lineage and compares.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Protocol

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from services.shared import featurestore
from services.shared import run_contract as rc
from services.shared.datasets import Snapshot, create_snapshot, load_snapshot
from services.shared.drift_reference import (
    REFERENCE_ARTIFACT,
    TAG_REFERENCE_SHA256,
    build_reference,
)
from services.shared.errors import FailedPrecondition, IntegrityError
from services.shared.evaluation import BinaryMetrics, evaluate, max_f1_threshold
from services.shared.logging import get_logger
from services.shared.proto.mlops.v1 import models_pb2, monitoring_pb2
from services.shared.usecase.features import MODEL_INPUTS
from services.training.baseline import fit_baseline
from services.training.dataset import TimeSplit, TrainingSetBuilder
from services.training.fit import (
    EpochReport,
    fit_fraud_mlp,
    load_torchscript,
    scores,
    torchscript_bytes,
    weights_sha256,
)
from services.training.model_card import render_model_card
from services.training.provenance import code_version, environment_versions
from services.training.settings import TrainingParams, TrainingSettings
from services.training.tracking import TAG_REGISTERED_VERSION, ExperimentTracker, RunRecord
from services.training.window import split_for_training, training_window

log = get_logger("training")

THRESHOLD_RULE = "max_f1_on_validation_within_max_false_positive_rate"
TAG_TRAINING_WINDOW = "mlops.training_window"  # services/training/window.py
REFERENCE_ROWS = 20_000  # rows of the drift reference monitoring measures live traffic against


class TrainingProgress(Protocol):
    """Where a long training reports how far it is (logs in the service, a bar in the CLI)."""

    def stage(self, name: str) -> None: ...

    def epoch(self, report: EpochReport) -> None: ...


class LoggedProgress:
    def __init__(self, request_id: str = "") -> None:
        self.request_id = request_id

    def stage(self, name: str) -> None:
        log.info("training_stage", request_id=self.request_id, stage=name)

    def epoch(self, report: EpochReport) -> None:
        log.info(
            "training_epoch",
            request_id=self.request_id,
            epoch=report.epoch,
            epochs=report.epochs,
            train_loss=f"{report.train_loss:.5f}",
            validation_pr_auc=f"{report.validation_pr_auc:.5f}",
            improved=report.improved,
        )


class ModelRegistration(Protocol):
    """The registry's RegisterModelVersion (services.shared.registry_client.RegistryClient)."""

    def register(
        self,
        run_id: str,
        artifact_sha256: str,
        *,
        description: str = "",
        canary_traffic_percent: int = 0,
        timeout_s: float | None = None,
    ) -> models_pb2.ModelVersion: ...


@dataclass(frozen=True)
class TrainingRequest:
    request_id: str
    model_name: str
    reason: str
    requested_by: str
    snapshot_id: str = ""
    # the shift the run answers (a drift event's onset_at): train and test around it
    drift_onset: datetime | None = None
    drift_event_id: str = ""
    gate_tests: int = 1  # gate tests the requester may spend on this shift (the gate's share)

    @classmethod
    def from_proto(cls, message: monitoring_pb2.RetrainRequest) -> TrainingRequest:
        drift = message.drift if message.HasField("drift") else None
        onset = (
            drift.onset_at.ToDatetime(tzinfo=UTC)
            if drift is not None and drift.HasField("onset_at")
            else None
        )
        return cls(
            request_id=message.request_id or f"req-{uuid.uuid4().hex[:12]}",
            model_name=message.model_name,
            reason=message.reason or "manual",
            requested_by=message.requested_by or "unknown",
            snapshot_id=message.dataset_snapshot_id,
            drift_onset=onset,
            drift_event_id=drift.event_id if drift is not None else "",
            gate_tests=max(1, message.gate_tests),
        )

    def params(self, defaults: TrainingParams) -> TrainingParams:
        """The run's parameters: the service's, with the onset of the shift it answers."""
        if self.drift_onset is None:
            return defaults
        return defaults.model_copy(update={"drift_onset": self.drift_onset})


@dataclass
class TrainedModel:
    """The outcome of ``train``: everything a run records, nothing yet recorded."""

    snapshot: Snapshot
    params: TrainingParams
    split: TimeSplit
    model_metrics: BinaryMetrics
    baseline_metrics: BinaryMetrics
    validation_pr_auc: float
    best_epoch: int
    epochs_run: int
    pos_weight: float
    torchscript: bytes
    model_sha256: str
    weights_sha256: str
    history: list[EpochReport] = field(default_factory=list)
    drift_reference: bytes = b""  # monitoring/reference.parquet (services/shared/drift_reference)

    @property
    def threshold(self) -> float:
        return self.model_metrics.threshold

    def metrics(self) -> dict[str, float]:
        values = {
            **self.model_metrics.as_dict(rc.TEST_PREFIX),
            **self.baseline_metrics.as_dict(rc.BASELINE_TEST_PREFIX),
            "validation_pr_auc": self.validation_pr_auc,
            "best_epoch": float(self.best_epoch),
            "epochs_run": float(self.epochs_run),
            "pos_weight": self.pos_weight,
            "train_rows": float(len(self.split.train)),
            "train_positives": float(self.split.train.positives),
            "train_weight_sum": float(self.split.train.row_weights().sum()),
            "validation_rows": float(len(self.split.validation)),
            "validation_positives": float(self.split.validation.positives),
        }
        return values


@dataclass(frozen=True)
class TrainingOutcome:
    request_id: str
    run_id: str
    model_sha256: str
    metrics: Mapping[str, float]
    version: models_pb2.ModelVersion | None  # None: not registered
    reused: bool = False  # the request had already been carried out


@dataclass(frozen=True)
class ReproductionReport:
    """Metrics compared exactly; weights compared by the hash of the state dict loaded from
    the registered TorchScript file and of the retrained model. (The TorchScript files
    themselves differ: each save writes a random ``.data/serialization_id``.)"""

    version: int
    snapshot_id: str
    metrics_identical: bool
    metric_differences: dict[str, tuple[float, float]]  # name -> (recorded, reproduced)
    weights_identical: bool
    recorded_weights_sha256: str
    reproduced_weights_sha256: str
    warnings: list[str]

    @property
    def identical(self) -> bool:
        return self.metrics_identical and self.weights_identical


def drift_reference(
    split: TimeSplit, score: Callable[[np.ndarray], np.ndarray], seed: int
) -> bytes:
    """The version's drift reference (services/shared/drift_reference.py): a sample of the
    rows it was trained and evaluated on, with its own scores, so monitoring measures live
    inputs and scores against what this version learnt from."""
    parts = (split.train, split.validation, split.test)
    features = np.concatenate([p.features for p in parts])
    labels = np.concatenate([p.labels for p in parts])
    held_out = np.concatenate([np.full(len(p), i > 0) for i, p in enumerate(parts)])
    return build_reference(
        MODEL_INPUTS,
        features,
        score(features),
        labels,
        held_out,
        max_rows=REFERENCE_ROWS,
        seed=seed,
    ).to_parquet()


class TrainingPipeline:
    def __init__(
        self,
        settings: TrainingSettings,
        tracker: ExperimentTracker,
        registry: ModelRegistration | None,
    ) -> None:
        self.settings = settings
        self.tracker = tracker
        self.registry = registry
        self.builder = TrainingSetBuilder(settings.storage, settings.feast, settings.redis)

    # ------------------------------------------------------------------ the reproducible part

    def train(
        self, snapshot: Snapshot, params: TrainingParams, progress: TrainingProgress
    ) -> TrainedModel:
        progress.stage(f"building the training set of {snapshot.id}")
        data = self.builder.build(snapshot)
        split = split_for_training(data, params)
        progress.stage(
            f"training on {len(split.train)} rows ({split.train.positives} frauds), validating "
            f"on {len(split.validation)}, testing on {len(split.test)} "
            f"({training_window(params)} split)"
        )
        fitted = fit_fraud_mlp(split.train, split.validation, params, progress.epoch)
        validation_scores = scores(fitted.model, split.validation.features)
        threshold = max_f1_threshold(
            split.validation.labels, validation_scores, params.max_false_positive_rate
        )
        model_metrics = evaluate(
            split.test.labels, scores(fitted.model, split.test.features), threshold
        )
        progress.stage("training the gradient-boosting baseline")
        baseline = fit_baseline(split.train, split.validation, params)
        baseline_metrics = evaluate(
            split.test.labels, baseline.scores(split.test.features), baseline.threshold
        )
        payload = torchscript_bytes(fitted.model)
        reference = drift_reference(split, lambda x: scores(fitted.model, x), params.seed)
        return TrainedModel(
            snapshot=snapshot,
            params=params,
            split=split,
            model_metrics=model_metrics,
            baseline_metrics=baseline_metrics,
            validation_pr_auc=max(r.validation_pr_auc for r in fitted.history),
            best_epoch=fitted.best_epoch,
            epochs_run=fitted.epochs_run,
            pos_weight=fitted.pos_weight,
            torchscript=payload,
            model_sha256=hashlib.sha256(payload).hexdigest(),
            weights_sha256=weights_sha256(fitted.model),
            history=fitted.history,
            drift_reference=reference,
        )

    # ------------------------------------------------------------------ a request, end to end

    def resolve_snapshot(self, snapshot_id: str) -> Snapshot:
        if snapshot_id:
            return load_snapshot(self.settings.storage, snapshot_id)  # verifies every file
        snapshot = create_snapshot(self.settings.storage)
        return load_snapshot(self.settings.storage, snapshot.id)

    def run(self, request: TrainingRequest, progress: TrainingProgress) -> TrainingOutcome:
        previous = self.tracker.find_run(rc.TAG_REQUEST_ID, request.request_id)
        if previous is not None:
            log.info("training_request_seen", request_id=request.request_id, run=previous.run_id)
            return self._finish_previous(request, previous.run_id, previous.tags)
        progress.stage("snapshotting the offline store")
        snapshot = self.resolve_snapshot(request.snapshot_id)
        trained = self.train(snapshot, request.params(self.settings.params), progress)
        progress.stage("logging the run to MLflow")
        run_id = self.tracker.log_run(self.run_record(request, trained))
        log.info(
            "training_finished",
            request_id=request.request_id,
            run_id=run_id,
            snapshot_id=snapshot.id,
            test_pr_auc=f"{trained.model_metrics.pr_auc:.4f}",
            baseline_test_pr_auc=f"{trained.baseline_metrics.pr_auc:.4f}",
        )
        version = self._register(request, run_id, trained.model_sha256, progress)
        return TrainingOutcome(
            request.request_id, run_id, trained.model_sha256, trained.metrics(), version
        )

    def _register(
        self, request: TrainingRequest, run_id: str, sha256: str, progress: TrainingProgress
    ) -> models_pb2.ModelVersion | None:
        if self.registry is None or not self.settings.register_models:
            return None
        progress.stage("registering with the model registry (evaluation gate)")
        version = self.registry.register(
            run_id,
            sha256,
            description=f"{request.reason} training requested by {request.requested_by}",
            timeout_s=self.settings.registry_timeout_s,
        )
        self.tracker.mark_registered(run_id, version.version)
        log.info(
            "model_registered",
            request_id=request.request_id,
            run_id=run_id,
            version=version.version,
            stage=models_pb2.ModelStage.Name(version.stage),
        )
        return version

    def _finish_previous(
        self, request: TrainingRequest, run_id: str, tags: Mapping[str, str]
    ) -> TrainingOutcome:
        run = self.tracker.get_run(run_id)
        sha256 = tags.get(rc.TAG_MODEL_SHA256, "")
        version = None
        if TAG_REGISTERED_VERSION not in tags:  # crashed between logging and registering
            version = self._register(request, run_id, sha256, LoggedProgress(request.request_id))
        return TrainingOutcome(request.request_id, run_id, sha256, run.metrics, version, True)

    def run_record(self, request: TrainingRequest, trained: TrainedModel) -> RunRecord:
        code = code_version(self.settings.code_commit)
        environment = environment_versions()
        tags = {
            rc.TAG_MODEL_SHA256: trained.model_sha256,
            rc.TAG_WEIGHTS_SHA256: trained.weights_sha256,
            rc.TAG_THRESHOLD: repr(trained.threshold),
            rc.TAG_FEATURE_NAMES: json.dumps(list(MODEL_INPUTS)),
            rc.TAG_SNAPSHOT_ID: trained.snapshot.id,
            rc.TAG_SNAPSHOT_SHA256: trained.snapshot.sha256,
            rc.TAG_FEATURE_SERVICE: self.settings.feast.feature_service,
            rc.TAG_FEATURE_DEFINITIONS_SHA256: featurestore.definitions_sha256(self.settings.feast),
            rc.TAG_CODE_COMMIT: code.commit,
            rc.TAG_CODE_DIRTY: str(code.dirty).lower(),
            rc.TAG_REQUEST_ID: request.request_id,
            rc.TAG_REQUEST_REASON: request.reason,
            rc.TAG_REQUESTED_BY: request.requested_by,
            rc.TAG_GATE_TESTS: str(request.gate_tests),
            "mlops.threshold_rule": THRESHOLD_RULE,
            TAG_TRAINING_WINDOW: training_window(trained.params),
            "mlops.drift_event_id": request.drift_event_id,
            "mlops.validation_start": trained.split.validation_start.isoformat(),
            "mlops.test_start": trained.split.test_start.isoformat(),
            TAG_REFERENCE_SHA256: hashlib.sha256(trained.drift_reference).hexdigest(),
            **{f"{rc.TAG_ENV_PREFIX}{k}": v for k, v in environment.items()},
        }
        metrics = trained.metrics()
        card = render_model_card(
            model_name=request.model_name,
            request=request,
            trained=trained,
            code=str(code),
            environment=environment,
            feature_service=self.settings.feast.feature_service,
            threshold_rule=THRESHOLD_RULE,
        )
        sink = pa.BufferOutputStream()
        pq.write_table(trained.split.test.to_table(), sink)
        return RunRecord(
            run_name=f"{request.reason}-{datetime.now(UTC):%Y%m%dT%H%M%S}",
            params=trained.params.as_logged(),
            metrics=metrics,
            tags=tags,
            artifacts={
                rc.MODEL_ARTIFACT: trained.torchscript,
                rc.MODEL_CARD_ARTIFACT: card.encode(),
                rc.TEST_SET_ARTIFACT: sink.getvalue().to_pybytes(),
                rc.METRICS_ARTIFACT: json.dumps(metrics, indent=2, sort_keys=True).encode(),
                REFERENCE_ARTIFACT: trained.drift_reference,
            },
            metric_history={
                "epoch_train_loss": [(r.epoch, r.train_loss) for r in trained.history],
                "epoch_validation_pr_auc": [
                    (r.epoch, r.validation_pr_auc) for r in trained.history
                ],
            },
        )

    # ------------------------------------------------------------------ reproducibility

    def reproduce(
        self, lineage: models_pb2.Lineage, progress: TrainingProgress
    ) -> ReproductionReport:
        """Train again from ``lineage`` (same snapshot, parameters, seed) and compare."""
        if not lineage.dataset_snapshot_id:
            raise FailedPrecondition(f"version {lineage.version} has no dataset snapshot")
        warnings: list[str] = []
        snapshot = load_snapshot(self.settings.storage, lineage.dataset_snapshot_id)
        if snapshot.sha256 != lineage.dataset_sha256:
            raise FailedPrecondition(
                f"snapshot {snapshot.id} hashes to {snapshot.sha256}, the lineage recorded "
                f"{lineage.dataset_sha256}"
            )
        definitions = featurestore.definitions_sha256(self.settings.feast)
        if definitions != lineage.feature_definitions_sha256:
            warnings.append(
                "the feature definitions differ from the ones the version was trained with"
            )
        code = code_version(self.settings.code_commit)
        if code.commit != lineage.code_commit or code.dirty:
            warnings.append(f"code version {code} differs from the recorded {lineage.code_commit}")
        recorded = self.tracker.download(lineage.run_id, rc.MODEL_ARTIFACT)
        if hashlib.sha256(recorded).hexdigest() != lineage.artifact_sha256:
            raise IntegrityError(
                f"the registered artifact of v{lineage.version} does not match its sha256"
            )
        recorded_weights = weights_sha256(load_torchscript(recorded))
        params = TrainingParams.from_logged(dict(lineage.params))
        trained = self.train(snapshot, params, progress)
        reproduced = trained.metrics()
        differences = {
            name: (recorded, reproduced.get(name, float("nan")))
            for name, recorded in sorted(lineage.metrics.items())
            if name in reproduced and not _same(recorded, reproduced[name])
        }
        missing = [name for name in reproduced if name not in lineage.metrics]
        if missing:
            warnings.append(f"metrics not recorded on the version: {', '.join(missing)}")
        return ReproductionReport(
            version=lineage.version,
            snapshot_id=snapshot.id,
            metrics_identical=not differences,
            metric_differences=differences,
            weights_identical=recorded_weights == trained.weights_sha256,
            recorded_weights_sha256=recorded_weights,
            reproduced_weights_sha256=trained.weights_sha256,
            warnings=warnings,
        )


def _same(a: float, b: float) -> bool:
    return bool(a == b or (np.isnan(a) and np.isnan(b)))
