"""The evaluation gate, promotion and rollback against real MLflow, Triton and Kafka.

Two histories of the same transactions: one with true labels, one whose labels before the
test period are shuffled (a deliberately worse model whose held-out test set still carries
true labels, so the gate judges it on real outcomes). The scenario:

1. worse model -> v1, production (first model, nothing to compare with);
2. good model -> v2: beats v1 on v2's held-out set -> canary at the default share; its share
   is widened, then the canary is removed (Triton keeps it for the grace period, then not);
3. v2 promoted -> production, v1 archived; v1 keeps answering for the grace period, then
   Triton serves v2 only;
4. worse model again -> v3: does not beat v2 -> rejected, reason recorded, not in Triton;
5. rollback -> v1 production again, v2 archived, Triton answers from v1 (and v2 until its
   grace period ends).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import UTC, datetime

import numpy as np
import pytest
from fraud_history import write_fraud_history
from registry_harness import (
    RegistryInThread,
    read_lifecycle,
    registry_settings,
    training_settings,
)

from services.cli import localinfra
from services.registry.triton_repository import TritonModelRepository
from services.shared.errors import FailedPrecondition
from services.shared.proto.mlops.v1 import models_pb2
from services.shared.registry_client import RegistryClient
from services.shared.settings import (
    FeastSettings,
    KafkaSettings,
    MlflowSettings,
    StorageSettings,
    TritonSettings,
)
from services.training.fit import load_torchscript, scores
from services.training.main import build_pipeline
from services.training.pipeline import LoggedProgress, TrainingRequest
from services.training.tracking import ExperimentTracker

Stage = models_pb2.ModelStage
EventType = models_pb2.ModelEventType
SHUFFLE_BEFORE = datetime(2026, 3, 8, tzinfo=UTC)  # the test period starts on day ~6.4 of 8
GRACE_S = 3.0  # how long a retired version stays loaded after its switch was announced


@pytest.fixture
def registry(
    kafka: KafkaSettings, mlflow_server: MlflowSettings, triton_server: TritonSettings
) -> Iterator[RegistryInThread]:
    running = RegistryInThread(
        registry_settings(
            kafka,
            mlflow_server,
            triton_server,
            default_canary_percent=15,
            retire_grace_s=GRACE_S,
            # the generated history is small (its test period has a few dozen frauds)
            gate_min_rows=200,
            gate_min_positives=10,
        )
    ).start()
    try:
        yield running
    finally:
        running.stop()


def _train(
    registry: RegistryInThread,
    storage: StorageSettings,
    feast: FeastSettings,
    mlflow: MlflowSettings,
) -> models_pb2.ModelVersion:
    settings = training_settings(storage, feast, mlflow, registry.client_settings())
    request = TrainingRequest(
        f"req-{uuid.uuid4().hex[:8]}", registry.settings.model_name, "manual", "test"
    )
    outcome = build_pipeline(settings).run(request, LoggedProgress(request.request_id))
    assert outcome.version is not None
    return outcome.version


def _scores_of(mlflow: MlflowSettings, version: models_pb2.ModelVersion, rows: np.ndarray):  # type: ignore[no-untyped-def]
    payload = ExperimentTracker(mlflow).download(version.run_id, "model/model.pt")
    return scores(load_torchscript(payload), rows)


def _wait_until_served(repository: TritonModelRepository, versions: list[int]) -> None:
    """Retired versions are unloaded once their grace period is over."""
    localinfra.wait_until(
        lambda: repository.ready_versions() == versions,
        GRACE_S + 30,
        f"Triton serving exactly {versions}",
        interval_s=0.1,
    )


async def test_gate_promotion_and_rollback(
    registry: RegistryInThread,
    kafka: KafkaSettings,
    mlflow_server: MlflowSettings,
    triton_server: TritonSettings,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    good = StorageSettings(data_dir=tmp_path_factory.mktemp("good") / "data")
    worse = StorageSettings(data_dir=tmp_path_factory.mktemp("worse") / "data")
    write_fraud_history(good.offline_dir)
    write_fraud_history(worse.offline_dir, shuffle_labels_before=SHUFFLE_BEFORE)
    feast = FeastSettings(project=f"t{uuid.uuid4().hex[:10]}")
    repository = TritonModelRepository(triton_server, registry.settings.model_name)
    client = RegistryClient(registry.client_settings())

    # 1. the first model becomes production whatever its quality
    v1 = _train(registry, worse, feast, mlflow_server)
    assert (v1.version, v1.stage) == (1, Stage.MODEL_STAGE_PRODUCTION)

    # 2. a better model passes the gate and becomes canary
    v2 = _train(registry, good, feast, mlflow_server)
    assert v2.version == 2
    assert v2.gate.passed, v2.gate.reason
    assert v2.gate.baseline_version == 1
    assert v2.gate.outcome == models_pb2.GATE_OUTCOME_PASSED
    assert v2.gate.test.startswith("paired bootstrap of the pr_auc difference")
    assert v2.gate.interval_low > v2.gate.margin  # the interval, not the point estimate
    assert v2.gate.interval_low <= v2.gate.statistic <= v2.gate.interval_high
    assert v2.gate.confidence == 0.95 and v2.gate.resamples == 1000
    assert v2.gate.rows > 0 and 10 <= v2.gate.positives < v2.gate.rows
    gate = v2.gate  # calibration: production's minus the candidate's error, not shown < -0.02
    assert gate.calibration_interval_low <= gate.calibration_statistic
    assert gate.calibration_statistic <= gate.calibration_interval_high
    assert gate.calibration_interval_high >= -0.02
    assert v2.stage == Stage.MODEL_STAGE_CANARY
    assert list(v2.aliases) == ["canary"] and v2.traffic_percent == 15
    assert repository.ready_versions() == [1, 2]
    production = client.get_version(alias="production")
    assert production.version == 1 and production.traffic_percent == 85

    # the canary's share moves without reloading Triton; removing it stops serving it
    widened = client.set_alias("canary", 2, traffic_percent=30)
    assert widened.traffic_percent == 30
    assert client.get_version(alias="production").traffic_percent == 70
    removed = client.set_alias("canary", 0, reason="pause the canary")
    assert removed.version == 2 and removed.stage == Stage.MODEL_STAGE_ARCHIVED
    assert repository.ready_versions() == [1, 2]  # until its grace period ends
    _wait_until_served(repository, [1])

    # 3. promotion (of the now archived v2): v2 production, v1 archived, still answering
    # for the grace period (serving may not have heard yet), then no longer served
    rows = np.random.default_rng(0).normal(size=(16, len(v1.feature_names))).astype(np.float32)
    promoted = client.set_alias("production", 2, reason="canary looked good")
    assert promoted.stage == Stage.MODEL_STAGE_PRODUCTION and promoted.traffic_percent == 100
    assert repository.ready_versions() == [1, 2]
    np.testing.assert_allclose(
        repository.infer(1, rows), _scores_of(mlflow_server, v1, rows), rtol=0, atol=1e-6
    )
    assert client.get_version(version=1).stage == Stage.MODEL_STAGE_ARCHIVED
    _wait_until_served(repository, [2])

    # 4. a worse candidate is rejected with the reason recorded, and never served
    v3 = _train(registry, worse, feast, mlflow_server)
    assert v3.version == 3
    assert not v3.gate.passed
    assert v3.stage == Stage.MODEL_STAGE_REJECTED
    assert v3.gate.outcome == models_pb2.GATE_OUTCOME_FAILED
    assert "not shown better than production v2" in v3.gate.reason
    assert v3.gate.interval_low <= v3.gate.margin
    assert v3.gate.candidate_value < v3.gate.baseline_value
    assert list(v3.aliases) == []
    assert client.get_version(version=3).gate.reason == v3.gate.reason
    assert repository.ready_versions() == [2]
    assert not repository.has_version(3)
    with pytest.raises(FailedPrecondition, match="rejected"):
        client.set_alias("canary", 3)

    # 5. rollback: v1 back in production (Triton answers from it), v2 archived
    rolled = client.rollback("test rollback")
    assert rolled.version == 1 and rolled.stage == Stage.MODEL_STAGE_PRODUCTION
    assert client.get_version(version=2).stage == Stage.MODEL_STAGE_ARCHIVED
    assert repository.ready_versions() == [1, 2]
    _wait_until_served(repository, [1])
    np.testing.assert_allclose(
        repository.infer(1, rows), _scores_of(mlflow_server, v1, rows), rtol=0, atol=1e-6
    )
    assert not np.allclose(_scores_of(mlflow_server, v1, rows), _scores_of(mlflow_server, v2, rows))
    with pytest.raises(FailedPrecondition, match="only production version"):
        client.rollback()  # v1 has nothing before it
    client.close()

    # every transition is on models.lifecycle, with the routing table after it
    events = await read_lifecycle(kafka, at_least=19)
    kinds = [(models_pb2.ModelEventType.Name(e.type), e.version) for e in events]
    assert kinds == [
        ("MODEL_EVENT_TYPE_REGISTERED", 1),
        ("MODEL_EVENT_TYPE_GATE_PASSED", 1),
        ("MODEL_EVENT_TYPE_PUBLISHED", 1),
        ("MODEL_EVENT_TYPE_PROMOTED", 1),
        ("MODEL_EVENT_TYPE_REGISTERED", 2),
        ("MODEL_EVENT_TYPE_GATE_PASSED", 2),
        ("MODEL_EVENT_TYPE_PUBLISHED", 2),
        ("MODEL_EVENT_TYPE_ALIAS_SET", 2),  # canary at 15%
        ("MODEL_EVENT_TYPE_ALIAS_SET", 2),  # canary at 30%
        ("MODEL_EVENT_TYPE_ALIAS_SET", 0),  # canary removed
        ("MODEL_EVENT_TYPE_UNPUBLISHED", 2),
        ("MODEL_EVENT_TYPE_PUBLISHED", 2),
        ("MODEL_EVENT_TYPE_PROMOTED", 2),
        ("MODEL_EVENT_TYPE_UNPUBLISHED", 1),
        ("MODEL_EVENT_TYPE_REGISTERED", 3),
        ("MODEL_EVENT_TYPE_GATE_REJECTED", 3),
        ("MODEL_EVENT_TYPE_PUBLISHED", 1),
        ("MODEL_EVENT_TYPE_ROLLED_BACK", 1),
        ("MODEL_EVENT_TYPE_UNPUBLISHED", 2),
    ]

    def table(event: models_pb2.ModelEvent) -> list[tuple[int, str, int]]:
        return [(s.version, s.alias, s.traffic_percent) for s in event.served]

    assert table(events[7]) == [(1, "production", 85), (2, "canary", 15)]
    assert events[7].alias == "canary" and events[7].traffic_percent == 15
    assert table(events[8]) == [(1, "production", 70), (2, "canary", 30)]
    assert events[9].alias == "canary" and events[9].previous_version == 2
    assert table(events[9]) == table(events[10]) == [(1, "production", 100)]
    assert table(events[12]) == table(events[13]) == [(2, "production", 100)]
    assert events[12].previous_version == 1 and events[12].reason == "canary looked good"
    assert events[15].gate.reason == v3.gate.reason and table(events[15]) == table(events[12])
    assert table(events[17]) == table(events[18]) == [(1, "production", 100)]
    assert events[17].previous_version == 2 and events[17].reason == "test rollback"
    assert all(e.served[0].threshold > 0 for e in events if e.served)
