"""Test harness: real infrastructure started once per session on free ports.

- ``kafka_broker`` (Tansu), ``redis_server``, ``triton_server``, ``mlflow_server`` start the real
  processes (services/cli/localinfra.py) and stop them at the end of the session.
- ``kafka`` gives each test the broker with its own topic prefix, so tests never share topics.
- ``storage`` gives each test its own data directory.
Tests under tests/unit are marked ``unit`` and must not touch the network; tests/integration
and tests/e2e are marked accordingly and use the fixtures above.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

if os.environ.get("PYTEST_XDIST_WORKER"):
    # an xdist worker starts with COLUMNS=80 and LINES=24 in its environment; the CLI's
    # consoles, made at import, would keep that width whatever a test's CliRunner sets
    for _name in ("COLUMNS", "LINES"):
        os.environ.pop(_name, None)

from services.cli import localinfra
from services.shared.settings import (
    FeastSettings,
    KafkaSettings,
    MlflowSettings,
    RedisSettings,
    StorageSettings,
    TritonSettings,
)

_MARKERS = {"unit": "unit", "integration": "integration", "e2e": "e2e"}
# Modules that run beside the rest under `pytest -n 2` (not the default): long, mostly waiting
# (traffic at a fixed rate, minutes of it) and with a stack of their own on free ports.
# Everything else runs in the other worker, one test after another in collection order, so
# the other stacks (and their timing-sensitive checks) never overlap each other.
OWN_LANE = {"tests/e2e/test_drift.py"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        parts = Path(str(item.fspath)).parts
        for directory, marker in _MARKERS.items():
            if directory in parts:
                item.add_marker(getattr(pytest.mark, marker))


def pytest_xdist_make_scheduler(config: pytest.Config, log: object) -> object:
    """Two lanes for pytest-xdist: the modules in ``OWN_LANE`` (one scope each) and
    everything else (one scope), each scope run by one worker in collection order."""
    from xdist.scheduler import LoadScopeScheduling

    class Lanes(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            module = nodeid.split("::", 1)[0]
            return module if module in OWN_LANE else "serial"

    return Lanes(config, log)  # type: ignore[arg-type]


@pytest.fixture(scope="session")
def infra_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("infra")


@pytest.fixture(scope="session")
def kafka_broker(infra_dir: Path) -> Iterator[KafkaSettings]:
    port = localinfra.free_port()
    process = localinfra.RunningProcess(localinfra.tansu(port), infra_dir / "tansu.log")
    try:
        yield KafkaSettings(
            bootstrap=f"127.0.0.1:{port}",
            broker_flavor="tansu",
            partitions=2,
            session_timeout_ms=6000,
        )
    finally:
        process.stop()


@pytest.fixture
def kafka(kafka_broker: KafkaSettings) -> KafkaSettings:
    """The session broker with a topic prefix of this test's own."""
    return kafka_broker.model_copy(update={"topic_prefix": f"t{uuid.uuid4().hex[:10]}."})


@pytest.fixture(scope="session")
def redis_server(infra_dir: Path) -> Iterator[RedisSettings]:
    port = localinfra.free_port()
    process = localinfra.RunningProcess(localinfra.redis(port, None), infra_dir / "redis.log")
    try:
        yield RedisSettings(port=port)
    finally:
        process.stop()


@pytest.fixture(scope="session")
def triton_server(infra_dir: Path) -> Iterator[TritonSettings]:
    repository = infra_dir / "triton_models"
    repository.mkdir()
    ports = [localinfra.free_port() for _ in range(3)]
    process = localinfra.RunningProcess(
        localinfra.triton(ports[0], ports[1], ports[2], repository), infra_dir / "triton.log"
    )
    try:
        yield TritonSettings(
            http_port=ports[0],
            grpc_port=ports[1],
            metrics_port=ports[2],
            model_repository=repository,
        )
    finally:
        process.stop()


@pytest.fixture(scope="session")
def mlflow_server(infra_dir: Path) -> Iterator[MlflowSettings]:
    port = localinfra.free_port()
    data = infra_dir / "mlflow"
    data.mkdir()
    process = localinfra.RunningProcess(localinfra.mlflow(port, data), infra_dir / "mlflow.log")
    try:
        yield MlflowSettings(
            tracking_uri=f"http://127.0.0.1:{port}", experiment=f"test-{uuid.uuid4().hex[:8]}"
        )
    finally:
        process.stop()


@pytest.fixture
def storage(tmp_path: Path) -> StorageSettings:
    return StorageSettings(data_dir=tmp_path / "data")


@pytest.fixture
def feast_settings(tmp_path: Path) -> FeastSettings:
    """Feast settings with a Redis key space of this test's own (its own project)."""
    return FeastSettings(project=f"t{uuid.uuid4().hex[:10]}")
