"""Training end to end against real MLflow, Triton and Kafka: the first model of a registry.

One training (module fixture) on a generated history, requested on training.requests as
``mlops train`` does and carried out by the training service process; the tests then check
what it left (including the request's committed offset):
production in the registry and in Triton (Triton's answers equal the TorchScript model's),
the MLflow run's lineage, the lifecycle events, reproducibility, idempotent redelivery and
refusal of tampered artifacts.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import urllib.request
import uuid
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from aiokafka.structs import TopicPartition
from fraud_history import FraudHistory, write_fraud_history
from registry_harness import (
    RegistryInThread,
    read_lifecycle,
    registry_settings,
    training_settings,
)
from service_env import settings_environment

from services.cli import localinfra
from services.cli.train import publish_request, retrain_request
from services.registry.triton_repository import TritonModelRepository
from services.shared import featurestore
from services.shared import run_contract as rc
from services.shared.datasets import load_snapshot
from services.shared.errors import IntegrityError, Unavailable
from services.shared.kafka import create_consumer
from services.shared.proto.mlops.v1 import models_pb2
from services.shared.registry_client import RegistryClient
from services.shared.settings import (
    PROJECT_ROOT,
    FeastSettings,
    KafkaSettings,
    MlflowSettings,
    StorageSettings,
    TritonSettings,
)
from services.shared.topics import Topics
from services.training.main import build_pipeline
from services.training.pipeline import LoggedProgress, TrainingOutcome, TrainingRequest
from services.training.settings import TrainingSettings
from services.training.tracking import ExperimentTracker, RunRecord

Stage = models_pb2.ModelStage
EventType = models_pb2.ModelEventType


@dataclass
class FirstModel:
    kafka: KafkaSettings
    storage: StorageSettings
    feast: FeastSettings
    mlflow: MlflowSettings
    triton: TritonSettings
    history: FraudHistory
    registry: RegistryInThread
    settings: TrainingSettings
    request: TrainingRequest
    outcome: TrainingOutcome
    committed_offsets: int

    def client(self) -> RegistryClient:
        return RegistryClient(self.registry.client_settings())

    def repository(self) -> TritonModelRepository:
        return TritonModelRepository(self.triton, self.registry.settings.model_name)


def _training_service_env(settings: TrainingSettings, kafka: KafkaSettings) -> dict[str, str]:
    params = settings.params
    return {
        **settings_environment(
            kafka, settings.storage, settings.feast, settings.mlflow, settings.registry
        ),
        "MLOPS_TRAINING_CONSUMER_GROUP": settings.consumer_group,
        "MLOPS_TRAINING_PARAM_EPOCHS": str(params.epochs),
        "MLOPS_TRAINING_PARAM_PATIENCE": str(params.patience),
        "MLOPS_TRAINING_PARAM_BASELINE_MAX_ITER": str(params.baseline_max_iter),
    }


async def _committed_offsets(kafka: KafkaSettings, group: str) -> int:
    topic = Topics.from_settings(kafka).training_requests
    consumer = create_consumer(kafka, group_id=group, client_id="test-committed")
    await consumer.start()
    try:
        partitions = consumer.partitions_for_topic(topic) or set()
        total = 0
        for partition in partitions:
            total += await consumer.committed(TopicPartition(topic, partition)) or 0
        return total
    finally:
        await consumer.stop()


@pytest.fixture(scope="module")
def first_model(
    kafka_broker: KafkaSettings,
    mlflow_server: MlflowSettings,
    triton_server: TritonSettings,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[FirstModel]:
    """The first model, trained by the training service (``python -m services.training``)
    from a RetrainRequest published as ``mlops train`` does."""
    kafka = kafka_broker.model_copy(update={"topic_prefix": f"t{uuid.uuid4().hex[:10]}."})
    directory = tmp_path_factory.mktemp("e2e")
    storage = StorageSettings(data_dir=directory / "data")
    feast = FeastSettings(project=f"t{uuid.uuid4().hex[:10]}")
    history = write_fraud_history(storage.offline_dir)
    registry = RegistryInThread(registry_settings(kafka, mlflow_server, triton_server)).start()
    try:
        settings = training_settings(
            storage, feast, mlflow_server, registry.client_settings()
        ).model_copy(update={"kafka": kafka, "consumer_group": f"{kafka.topic_prefix}training"})
        message = retrain_request(registry.settings.model_name, "manual", "test", "")
        port = localinfra.free_port()
        service = localinfra.RunningProcess(
            localinfra.ProcessSpec(
                name="training",
                command=[sys.executable, "-m", "services.training"],
                env={
                    **_training_service_env(settings, kafka),
                    "MLOPS_TRAINING_METRICS_PORT": str(port),
                },
                ready=lambda: 'mlops_service_ready{service="training"} 1.0' in _metrics(port),
                cwd=PROJECT_ROOT,
                startup_timeout_s=90,
            ),
            directory / "training.log",
        )
        client = RegistryClient(registry.client_settings())
        try:
            asyncio.run(publish_request(settings, message))
            localinfra.wait_until(  # counted once trained, tracked and registered
                lambda: 'mlops_training_runs_total{outcome="trained"} 1.0' in _metrics(port),
                240,
                "the training service to finish the request",
                interval_s=1.0,
                alive=service.alive,
            )
        finally:
            service.stop(timeout=30)
        assert service.process.returncode == 0, service.tail()
        version = client.get_version(version=1)
        client.close()
        run = ExperimentTracker(mlflow_server).get_run(version.run_id)
        outcome = TrainingOutcome(
            message.request_id, run.run_id, run.tags[rc.TAG_MODEL_SHA256], run.metrics, version
        )
        committed = asyncio.run(_committed_offsets(kafka, settings.consumer_group))
        yield FirstModel(
            kafka,
            storage,
            feast,
            mlflow_server,
            triton_server,
            history,
            registry,
            settings,
            TrainingRequest.from_proto(message),
            outcome,
            committed,
        )
    finally:
        registry.stop()


def _metrics(port: int) -> str:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as response:
            return str(response.read().decode())
    except OSError:
        return ""


def _torchscript_scores(payload: bytes, features: np.ndarray) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        module = torch.jit.load(io.BytesIO(payload))
    with torch.inference_mode():
        return module(torch.from_numpy(features)).reshape(-1).numpy()


def _artifact(world: FirstModel, name: str, run_id: str | None = None) -> bytes:
    target = world.storage.data_dir / "downloads" / uuid.uuid4().hex
    target.mkdir(parents=True)
    path = ExperimentTracker(world.mlflow).client.download_artifacts(
        run_id or world.outcome.run_id, name, str(target)
    )
    return Path(path).read_bytes()


def _model_bytes(world: FirstModel) -> bytes:
    return _artifact(world, rc.MODEL_ARTIFACT)


def _test_set(world: FirstModel) -> tuple[np.ndarray, np.ndarray]:
    table = pq.read_table(io.BytesIO(_artifact(world, rc.TEST_SET_ARTIFACT)))
    features = np.stack(
        [table.column(c).to_numpy() for c in rc.TEST_SET_COLUMNS[:-2]], axis=1
    ).astype(np.float32)
    return features, table.column(rc.LABEL_COLUMN).to_numpy()


def test_first_model_becomes_production_and_triton_serves_it(first_model: FirstModel) -> None:
    version = first_model.outcome.version
    assert version is not None
    assert version.version == 1
    assert version.stage == Stage.MODEL_STAGE_PRODUCTION
    assert list(version.aliases) == ["production"]
    assert version.traffic_percent == 100
    assert version.gate.passed and version.gate.baseline_version == 0
    assert version.artifact_sha256 == first_model.outcome.model_sha256
    assert list(version.feature_names) == list(rc.TEST_SET_COLUMNS[:-2])

    repository = first_model.repository()
    assert repository.ready_versions() == [1]
    features, _labels = _test_set(first_model)
    rows = features[:64]
    served = repository.infer(1, rows)
    expected = _torchscript_scores(_model_bytes(first_model), rows)
    np.testing.assert_allclose(served, expected, rtol=0, atol=1e-6)
    assert float(served.min()) > 0.0 and float(served.max()) < 1.0


def test_run_records_metrics_lineage_and_artifacts(first_model: FirstModel) -> None:
    run = ExperimentTracker(first_model.mlflow).get_run(first_model.outcome.run_id)
    tags = run.tags
    snapshot = load_snapshot(first_model.storage, tags[rc.TAG_SNAPSHOT_ID])
    assert tags[rc.TAG_SNAPSHOT_SHA256] == snapshot.sha256
    assert tags[rc.TAG_FEATURE_SERVICE] == first_model.feast.feature_service
    assert tags[rc.TAG_FEATURE_DEFINITIONS_SHA256] == featurestore.definitions_sha256(
        first_model.feast
    )
    head = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=PROJECT_ROOT, capture_output=True, text=True, check=True
    ).stdout.strip()
    assert tags[rc.TAG_CODE_COMMIT] == head
    assert tags[rc.TAG_CODE_DIRTY] in ("true", "false")
    assert tags[rc.TAG_REQUEST_ID] == first_model.request.request_id
    assert tags[rc.TAG_REQUEST_REASON] == "manual"
    assert tags[f"{rc.TAG_ENV_PREFIX}torch"] == torch.__version__
    assert tags[f"{rc.TAG_ENV_PREFIX}python"].startswith("3.11")
    assert run.params == first_model.settings.params.as_logged()
    for name in ("pr_auc", "roc_auc", "precision", "recall", "calibration_error", "threshold"):
        assert f"test_{name}" in run.metrics
        assert f"baseline_test_{name}" in run.metrics
    assert run.metrics["test_pr_auc"] > 0.3  # learnable signal; the fraud base rate is ~4%

    payload = _model_bytes(first_model)
    assert hashlib.sha256(payload).hexdigest() == tags[rc.TAG_MODEL_SHA256]
    card = _artifact(first_model, rc.MODEL_CARD_ARTIFACT).decode()
    assert snapshot.id in card and tags[rc.TAG_MODEL_SHA256] in card
    metrics = json.loads(_artifact(first_model, rc.METRICS_ARTIFACT))
    assert metrics["test_pr_auc"] == run.metrics["test_pr_auc"]
    table = pq.read_table(io.BytesIO(_artifact(first_model, rc.TEST_SET_ARTIFACT)))
    assert tuple(table.column_names) == rc.TEST_SET_COLUMNS
    assert table.num_rows == int(run.metrics["test_rows"])


def test_lineage_resolves_to_the_exact_snapshot(first_model: FirstModel) -> None:
    with first_model.client() as client:
        lineage = client.lineage(1)
    snapshot = load_snapshot(first_model.storage, lineage.dataset_snapshot_id)  # verifies files
    assert lineage.dataset_sha256 == snapshot.sha256
    assert snapshot.rows("transactions") == first_model.history.transactions + 5  # duplicates
    assert lineage.run_id == first_model.outcome.run_id
    assert lineage.training_request_id == first_model.request.request_id
    assert lineage.feature_service == first_model.feast.feature_service
    assert lineage.feature_definitions_sha256 == featurestore.definitions_sha256(first_model.feast)
    assert lineage.artifact_sha256 == first_model.outcome.model_sha256
    assert dict(lineage.params) == first_model.settings.params.as_logged()
    assert lineage.metrics["test_pr_auc"] == first_model.outcome.metrics["test_pr_auc"]
    assert len(lineage.code_commit) == 40


async def test_lifecycle_events_carry_the_routing_table(first_model: FirstModel) -> None:
    events = await read_lifecycle(first_model.kafka, at_least=4)
    assert [e.type for e in events] == [
        EventType.MODEL_EVENT_TYPE_REGISTERED,
        EventType.MODEL_EVENT_TYPE_GATE_PASSED,
        EventType.MODEL_EVENT_TYPE_PUBLISHED,
        EventType.MODEL_EVENT_TYPE_PROMOTED,
    ]
    assert all(e.model_name == first_model.registry.settings.model_name for e in events)
    assert len({e.event_id for e in events}) == 4
    assert list(events[0].served) == []  # nothing served before the first model
    promoted = events[-1]
    assert promoted.version == 1 and promoted.alias == "production"
    assert promoted.gate.passed
    assert len(promoted.served) == 1
    served = promoted.served[0]
    assert (served.version, served.alias, served.traffic_percent) == (1, "production", 100)
    assert first_model.outcome.version is not None
    assert served.threshold == pytest.approx(first_model.outcome.version.threshold)


def test_the_request_offset_was_committed_after_the_run(first_model: FirstModel) -> None:
    assert first_model.committed_offsets == 1


def test_a_redelivered_request_is_not_trained_again(first_model: FirstModel) -> None:
    again = build_pipeline(first_model.settings).run(first_model.request, LoggedProgress())
    assert again.reused
    assert again.run_id == first_model.outcome.run_id
    with first_model.client() as client:
        assert [v.version for v in client.list_versions()] == [1]


def test_reproduce_gives_identical_metrics_and_weights(first_model: FirstModel) -> None:
    client_settings = first_model.registry.client_settings()
    env = {
        **os.environ,
        "MLOPS_REGISTRY_CLIENT_ADDRESS": client_settings.address,
        "MLOPS_REGISTRY_CLIENT_MODEL_NAME": client_settings.model_name,
        "MLOPS_REGISTRY_CLIENT_TOKEN": client_settings.token.get_secret_value(),
        "MLOPS_MLFLOW_TRACKING_URI": first_model.mlflow.tracking_uri,
        "MLOPS_MLFLOW_EXPERIMENT": first_model.mlflow.experiment,
        "MLOPS_STORAGE_DATA_DIR": str(first_model.storage.data_dir),
        "MLOPS_FEAST_PROJECT": first_model.feast.project,
        # a different default must not leak in: parameters come from the lineage
        "MLOPS_TRAINING_PARAM_EPOCHS": "3",
        "COLUMNS": "200",
    }
    result = subprocess.run(
        [sys.executable, "-m", "services.cli.main", "models", "reproduce", "1"],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "metrics identical" in result.stdout
    assert "weights identical" in result.stdout


def test_a_tampered_artifact_is_refused_at_registration(first_model: FirstModel) -> None:
    tracker = ExperimentTracker(first_model.mlflow)
    original = tracker.get_run(first_model.outcome.run_id)
    payload = _model_bytes(first_model)
    tampered = payload[:-1] + bytes([payload[-1] ^ 0xFF])
    test_set = _artifact(first_model, rc.TEST_SET_ARTIFACT)
    # a run whose model file was altered after the trainer recorded its checksum
    forged = tracker.log_run(
        RunRecord(
            run_name="tampered",
            params=dict(original.params),
            metrics={},
            tags={
                **{k: v for k, v in original.tags.items() if not k.startswith("mlflow.")},
                rc.TAG_REQUEST_ID: f"forged-{uuid.uuid4().hex[:6]}",
            },
            artifacts={rc.MODEL_ARTIFACT: tampered, rc.TEST_SET_ARTIFACT: test_set},
        )
    )
    with first_model.client() as client:
        with pytest.raises(IntegrityError, match="does not match"):
            client.register(forged, original.tags[rc.TAG_MODEL_SHA256])
        with pytest.raises(IntegrityError):  # a wrong declared checksum for an intact run
            client.register(first_model.outcome.run_id, "0" * 64)
        assert [v.version for v in client.list_versions()] == [1]
    assert first_model.repository().ready_versions() == [1]


def test_a_tampered_file_in_triton_is_refused_and_reconciled(first_model: FirstModel) -> None:
    repository = first_model.repository()
    model_file = repository.version_dir(1) / "model.pt"
    good = model_file.read_bytes()
    model_file.write_bytes(good + b"tampered")
    rows = _test_set(first_model)[0][:8]
    expected = _torchscript_scores(good, rows)

    with pytest.raises(Unavailable):  # Triton's backend checks the sha256 and refuses to load
        repository.load()
    # the version loaded before keeps answering
    np.testing.assert_allclose(repository.infer(1, rows), expected, rtol=0, atol=1e-6)

    first_model.registry.reconcile()  # files differ from MLflow: rewritten, verified, reloaded
    assert model_file.read_bytes() == good
    assert repository.verify_version(1)
    assert repository.ready_versions() == [1]
    np.testing.assert_allclose(repository.infer(1, rows), expected, rtol=0, atol=1e-6)


def _backend_stubs(model_name: str) -> list[int]:
    """Pids of Triton's Python-backend stub processes serving ``model_name``."""
    import psutil

    found = []
    for process in psutil.process_iter(["cmdline"]):
        cmdline = " ".join(process.info["cmdline"] or [])
        if "triton_python_backend_stub" in cmdline and f"/{model_name}/" in cmdline:
            found.append(process.pid)
    return found


def test_a_dead_backend_stub_is_detected_and_reloaded(first_model: FirstModel) -> None:
    repository = first_model.repository()
    rows = _test_set(first_model)[0][:8]
    expected = _torchscript_scores(_model_bytes(first_model), rows)
    stubs = _backend_stubs(first_model.registry.settings.model_name)
    assert stubs, "Triton runs the model in a Python-backend stub process"
    for pid in stubs:
        os.kill(pid, signal.SIGKILL)  # a crashed stub: Triton still reports the model ready
    localinfra.wait_until(
        lambda: not repository.probe(1, len(rows[0])), 30, "the probe to notice the dead stub"
    )
    assert repository.ready_versions() == [1]

    first_model.registry.reconcile()  # the probe fails: unload + load
    np.testing.assert_allclose(repository.infer(1, rows), expected, rtol=0, atol=1e-6)


def test_the_cli_lists_shows_and_traces_versions(first_model: FirstModel) -> None:
    from typer.testing import CliRunner

    from services.cli.main import app

    client = first_model.registry.client_settings()
    env = {
        "MLOPS_REGISTRY_CLIENT_ADDRESS": client.address,
        "MLOPS_REGISTRY_CLIENT_MODEL_NAME": client.model_name,
        "MLOPS_REGISTRY_CLIENT_TOKEN": "",
        "MLOPS_REGISTRY_CLIENT_TOKEN_FILE": str(first_model.storage.data_dir / "no-token"),
        "COLUMNS": "250",
    }
    runner = CliRunner()
    listed = runner.invoke(app, ["models", "list"], env=env)
    assert listed.exit_code == 0, listed.output
    assert client.model_name in listed.output and "production" in listed.output
    shown = runner.invoke(app, ["models", "show", "production"], env=env)
    assert shown.exit_code == 0, shown.output
    assert first_model.outcome.model_sha256 in shown.output and "passed" in shown.output
    traced = runner.invoke(app, ["models", "lineage", "1"], env=env)
    assert traced.exit_code == 0, traced.output
    assert first_model.request.request_id in traced.output
    refused = runner.invoke(app, ["models", "rollback"], env=env)  # no token configured
    assert refused.exit_code == 1 and "Unauthenticated" in refused.output
    missing = runner.invoke(app, ["models", "show", "canary"], env=env)
    assert missing.exit_code == 1 and "no canary version" in missing.output
