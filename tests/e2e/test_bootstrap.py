"""`mlops bootstrap` across the platform: simulator -> Kafka -> ingestion (archive) -> features
(feature logs) -> snapshot -> training -> registry -> Triton, all real processes.

The ingestion and features services run as ``python -m`` subprocesses, the registry in a
thread; the command itself runs as the operator would run it, as a subprocess.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from registry_harness import RegistryInThread, registry_settings
from service_env import settings_environment

from services.cli import localinfra
from services.registry.triton_repository import TritonModelRepository
from services.shared.datasets import load_snapshot
from services.shared.featurestore import apply_definitions, open_store
from services.shared.proto.mlops.v1 import models_pb2
from services.shared.registry_client import RegistryClient
from services.shared.settings import (
    FeastSettings,
    KafkaSettings,
    MlflowSettings,
    RedisSettings,
    StorageSettings,
    TritonSettings,
)

ROOT = Path(__file__).resolve().parents[2]


def _metric_ready(port: int, service: str) -> bool:
    return localinfra.http_ok(f"http://127.0.0.1:{port}/metrics") and (
        f'mlops_service_ready{{service="{service}"}} 1.0'
        in _read(f"http://127.0.0.1:{port}/metrics")
    )


def _read(url: str) -> str:
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return str(response.read().decode())
    except OSError:
        return ""


def _service(name: str, env: dict[str, str], port: int, log: Path) -> localinfra.RunningProcess:
    spec = localinfra.ProcessSpec(
        name=name,
        command=[sys.executable, "-m", f"services.{name}"],
        ready=lambda: _metric_ready(port, name),
        env=env,
        cwd=ROOT,
        startup_timeout_s=120,
    )
    return localinfra.RunningProcess(spec, log)


def _env(
    kafka: KafkaSettings,
    redis: RedisSettings,
    storage: StorageSettings,
    feast: FeastSettings,
    mlflow: MlflowSettings,
    triton: TritonSettings,
) -> dict[str, str]:
    return settings_environment(kafka, redis, storage, feast, mlflow, triton)


@pytest.fixture
def platform(
    kafka: KafkaSettings,
    redis_server: RedisSettings,
    storage: StorageSettings,
    feast_settings: FeastSettings,
    mlflow_server: MlflowSettings,
    triton_server: TritonSettings,
    tmp_path: Path,
) -> Iterator[tuple[dict[str, str], RegistryInThread]]:
    apply_definitions(
        open_store(feast_settings, redis_server, storage), feast_settings, storage.offline_dir
    )
    env = _env(kafka, redis_server, storage, feast_settings, mlflow_server, triton_server)
    registry = RegistryInThread(registry_settings(kafka, mlflow_server, triton_server)).start()
    processes: list[localinfra.RunningProcess] = []
    try:
        ingestion_port = localinfra.free_port()
        processes.append(
            _service(
                "ingestion",
                {
                    **env,
                    "MLOPS_INGESTION_METRICS_PORT": str(ingestion_port),
                    "MLOPS_INGESTION_ARCHIVE_MAX_AGE_S": "1",
                },
                ingestion_port,
                tmp_path / "ingestion.log",
            )
        )
        features_port = localinfra.free_port()
        processes.append(
            _service(
                "features",
                {**env, "MLOPS_FEATURES_METRICS_PORT": str(features_port)},
                features_port,
                tmp_path / "features.log",
            )
        )
        client = registry.client_settings()
        yield (
            {
                **env,
                "MLOPS_REGISTRY_CLIENT_ADDRESS": client.address,
                "MLOPS_REGISTRY_CLIENT_TOKEN": client.token.get_secret_value(),
                "MLOPS_REGISTRY_CLIENT_MODEL_NAME": client.model_name,
                "MLOPS_TRAINING_PARAM_EPOCHS": "15",
                "COLUMNS": "200",
            },
            registry,
        )
    finally:
        for process in reversed(processes):
            process.stop(timeout=30)
        registry.stop()


def _bootstrap(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "services.cli.main", "bootstrap", *args],
        env={**os.environ, **env},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )


def test_bootstrap_makes_a_served_production_model(
    platform: tuple[dict[str, str], RegistryInThread],
    storage: StorageSettings,
    triton_server: TritonSettings,
) -> None:
    env, registry = platform
    # enough fraud episodes that every period of the time split gets some, whatever the day
    result = _bootstrap(
        env, "--days", "4", "--users", "400", "--fraud-rate", "0.05", "--timeout", "300"
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "ingestion archive and feature logs have caught up" in result.stdout
    assert "as production: Predict works" in result.stdout

    with RegistryClient(registry.client_settings()) as client:
        production = client.get_version(alias="production")
        lineage = client.lineage(production.version)
    assert production.version == 1 and production.stage == models_pb2.MODEL_STAGE_PRODUCTION
    snapshot = load_snapshot(storage, lineage.dataset_snapshot_id)
    assert snapshot.rows("transactions") > 3000 and snapshot.rows("labels") > 3000
    assert snapshot.rows("features/user_activity") >= snapshot.rows("transactions")
    assert production.metrics["test_pr_auc"] > 0.2  # the simulator's fraud is learnable
    repository = TritonModelRepository(triton_server, registry.settings.model_name)
    assert repository.ready_versions() == [1]

    again = _bootstrap(env)  # a production model exists: nothing to do
    assert again.returncode == 0, again.stdout + again.stderr
    assert "nothing to bootstrap" in again.stdout
