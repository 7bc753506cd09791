"""Zero-gap version switches against real Triton, MLflow and the broker.

Serving routes by models.lifecycle, so after a switch it keeps naming the old version until
the event reaches it. The registry therefore keeps the old version loaded in Triton, answering,
until a grace period after the event was acknowledged; only then does Triton serve exactly the
new set, and the UNPUBLISHED event follows the unload. Also: a registry restarted during the
grace period announces the routing table and retires the version afterwards; with the broker
down, the change is applied, its events are retried, and no grace starts before they land.

``test_callers_following_the_lifecycle_events_never_hit_an_unloaded_version`` does what serving
does, without serving's own safety net (waiting for a new table and routing again): callers
route every request by the latest event's table, under load through a promotion and a rollback.

The models are small seeded FraudMLPs logged to MLflow as the trainer logs its runs (TorchScript
model, held-out test set, tags), so each version takes a second, not a training run. Each
version's test labels are its own top-scored rows, so every newer version beats production on
its own test set and passes the gate (calibration is not what these tests are about).
"""

from __future__ import annotations

import asyncio
import collections
import io
import json
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import tritonclient.grpc.aio as tritonaio
from registry_harness import RegistryInThread, read_lifecycle, registry_settings
from tritonclient.utils import InferenceServerException

from services.cli import localinfra
from services.registry.triton_repository import TritonModelRepository, sha256_hex
from services.serving.routing_source import read_registry_table
from services.shared import run_contract as rc
from services.shared.errors import Unavailable
from services.shared.kafka import create_consumer
from services.shared.model_aliases import served_alias
from services.shared.proto.mlops.v1 import models_pb2
from services.shared.registry_client import RegistryClient
from services.shared.settings import KafkaSettings, MlflowSettings, TritonSettings
from services.shared.topics import Topics
from services.shared.usecase.features import MODEL_INPUTS, TRITON_INPUT, TRITON_OUTPUT
from services.shared.usecase.model import FraudMLP
from services.training.tracking import ExperimentTracker, RunRecord

GRACE_S = 4.0
ROWS = np.random.default_rng(7).normal(size=(16, len(MODEL_INPUTS))).astype(np.float32)


def torchscript(seed: int) -> bytes:
    torch.manual_seed(seed)
    n = len(MODEL_INPUTS)
    model = FraudMLP(torch.rand(n), torch.rand(n) + 0.5, hidden=(16, 8)).eval()
    buffer = io.BytesIO()
    torch.jit.save(torch.jit.script(model), buffer)
    return buffer.getvalue()


def local_scores(payload: bytes, rows: np.ndarray) -> np.ndarray:
    model = torch.jit.load(io.BytesIO(payload))
    with torch.inference_mode():
        return model(torch.from_numpy(rows)).numpy().reshape(-1)


def log_run(mlflow: MlflowSettings, seed: int) -> tuple[str, str, bytes]:
    """A finished run as the trainer leaves it; returns (run id, model sha256, model)."""
    model = torchscript(seed)
    rows = np.random.default_rng(seed).normal(size=(400, len(MODEL_INPUTS))).astype(np.float32)
    scored = local_scores(model, rows)
    labels = (scored >= np.quantile(scored, 0.8)).astype(np.int64)
    start = datetime(2026, 3, 8, tzinfo=UTC)
    columns = {name: rows[:, i] for i, name in enumerate(MODEL_INPUTS)}
    columns[rc.LABEL_COLUMN] = labels
    columns[rc.TIME_COLUMN] = [start + timedelta(minutes=i) for i in range(len(rows))]
    test_set = io.BytesIO()
    pq.write_table(pa.table(columns), test_set)
    sha = sha256_hex(model)
    run_id = ExperimentTracker(mlflow).log_run(
        RunRecord(
            run_name=f"switch-{seed}",
            params={"seed": str(seed)},
            metrics={},
            tags={
                rc.TAG_MODEL_SHA256: sha,
                rc.TAG_FEATURE_NAMES: json.dumps(list(MODEL_INPUTS)),
                rc.TAG_THRESHOLD: "0.5",
            },
            artifacts={rc.MODEL_ARTIFACT: model, rc.TEST_SET_ARTIFACT: test_set.getvalue()},
        )
    )
    return run_id, sha, model


def start_registry(
    kafka: KafkaSettings, mlflow: MlflowSettings, triton: TritonSettings, **overrides: object
) -> RegistryInThread:
    return RegistryInThread(
        registry_settings(
            kafka,
            mlflow,
            triton,
            retire_grace_s=GRACE_S,
            gate_calibration_tolerance=1.0,
            **overrides,
        )
    ).start()


@pytest.fixture
def registry(
    kafka: KafkaSettings, mlflow_server: MlflowSettings, triton_server: TritonSettings
) -> Iterator[RegistryInThread]:
    running = start_registry(kafka, mlflow_server, triton_server)
    try:
        yield running
    finally:
        running.stop()


def register(client: RegistryClient, mlflow: MlflowSettings, seed: int) -> bytes:
    run_id, sha, model = log_run(mlflow, seed)
    client.register(run_id, sha)
    return model


def kinds(events: list[models_pb2.ModelEvent]) -> list[tuple[str, int]]:
    return [
        (models_pb2.ModelEventType.Name(e.type).removeprefix("MODEL_EVENT_TYPE_"), e.version)
        for e in events
    ]


def table(event: models_pb2.ModelEvent) -> list[tuple[int, str, int]]:
    return [(s.version, s.alias, s.traffic_percent) for s in event.served]


async def lifecycle(kafka: KafkaSettings, count: int) -> list[models_pb2.ModelEvent]:
    """The topic from its beginning, as soon as it holds ``count`` events."""
    events = await read_lifecycle(kafka, at_least=count, timeout_s=60)
    assert len(events) >= count, kinds(events)
    return events


def serves_exactly(repository: TritonModelRepository, versions: list[int]) -> None:
    localinfra.wait_until(
        lambda: repository.ready_versions() == versions,
        GRACE_S + 30,
        f"Triton serving exactly {versions}",
        interval_s=0.1,
    )


def answers_like(repository: TritonModelRepository, version: int, model: bytes) -> None:
    np.testing.assert_allclose(
        repository.infer(version, ROWS), local_scores(model, ROWS), rtol=0, atol=1e-6
    )


async def test_the_old_version_answers_until_a_grace_period_after_the_switch_event(
    registry: RegistryInThread,
    kafka: KafkaSettings,
    mlflow_server: MlflowSettings,
    triton_server: TritonSettings,
) -> None:
    repository = TritonModelRepository(triton_server, registry.settings.model_name)
    with RegistryClient(registry.client_settings()) as client:
        model = {1: register(client, mlflow_server, 1), 2: register(client, mlflow_server, 2)}
        assert client.get_version(alias="canary").version == 2
        assert repository.ready_versions() == [1, 2]
        # the routing table is the registry's, whole: the CLI's call and serving's start-up read
        # (GetRoutingTable) agree with the table the last lifecycle event carries
        routes = client.routing_table()
        assert [(r.version, served_alias(r), r.traffic_percent, r.shadow) for r in routes] == [
            (1, "production", 90, False),
            (2, "canary", 10, False),
        ]
        serving_table = await read_registry_table(registry.client_settings())
        assert serving_table is not None
        assert serving_table.describe() == "production=v1@90%,canary=v2@10%"
        events = await lifecycle(kafka, 8)
        assert table(events[-1]) == [(1, "production", 90), (2, "canary", 10)]

        # promotion of the canary: its event is on the topic while v1 still answers
        client.set_alias("production", 2, reason="canary looked good")
        events = await lifecycle(kafka, 9)
        assert kinds(events)[-1] == ("PROMOTED", 2)
        assert repository.ready_versions() == [1, 2]
        answers_like(repository, 1, model[1])
        # then v1 is unloaded, and its UNPUBLISHED event follows the unload
        serves_exactly(repository, [2])
        with pytest.raises(Unavailable):
            repository.infer(1, ROWS)
        events = await lifecycle(kafka, 10)
        assert kinds(events)[-1] == ("UNPUBLISHED", 1)
        assert table(events[-2]) == table(events[-1]) == [(2, "production", 100)]

        # rollback to a version no longer loaded: v1 is loaded before its events (PUBLISHED
        # first), and v2 keeps answering for its grace period...
        client.rollback("regression")
        assert repository.ready_versions() == [1, 2]
        answers_like(repository, 1, model[1])
        answers_like(repository, 2, model[2])
        # ...within which it is promoted again: v2 never leaves Triton, no PUBLISHED for it
        client.set_alias("production", 2, reason="false alarm")
        assert repository.ready_versions() == [1, 2]
        serves_exactly(repository, [2])
        events = await lifecycle(kafka, 14)
        answers_like(repository, 2, model[2])

    assert kinds(events) == [
        ("REGISTERED", 1),
        ("GATE_PASSED", 1),
        ("PUBLISHED", 1),
        ("PROMOTED", 1),
        ("REGISTERED", 2),
        ("GATE_PASSED", 2),
        ("PUBLISHED", 2),
        ("ALIAS_SET", 2),
        ("PROMOTED", 2),
        ("UNPUBLISHED", 1),
        ("PUBLISHED", 1),
        ("ROLLED_BACK", 1),
        ("PROMOTED", 2),
        ("UNPUBLISHED", 1),  # and none for v2: it came back during its grace period
    ]
    assert table(events[11]) == [(1, "production", 100)]
    assert table(events[12]) == table(events[13]) == [(2, "production", 100)]


async def test_a_registry_restarted_during_the_grace_period_announces_then_retires(
    kafka: KafkaSettings, mlflow_server: MlflowSettings, triton_server: TritonSettings
) -> None:
    registry = start_registry(kafka, mlflow_server, triton_server)
    model_name = registry.settings.model_name
    repository = TritonModelRepository(triton_server, model_name)
    try:
        with RegistryClient(registry.client_settings()) as client:
            model = {1: register(client, mlflow_server, 1), 2: register(client, mlflow_server, 2)}
            client.set_alias("production", 2)
    finally:
        registry.stop()  # during v1's grace period: v1 stays loaded
    assert repository.ready_versions() == [1, 2]

    registry = start_registry(kafka, mlflow_server, triton_server, model_name=model_name)
    try:
        events = await lifecycle(kafka, 10)
        assert kinds(events)[-2:] == [("PROMOTED", 2), ("ROUTING_ANNOUNCED", 2)]
        assert table(events[-1]) == [(2, "production", 100)]
        assert repository.ready_versions() == [1, 2]  # not unloaded at start-up
        answers_like(repository, 1, model[1])
        serves_exactly(repository, [2])
        events = await lifecycle(kafka, 11)
        assert kinds(events)[-1] == ("UNPUBLISHED", 1)
        assert "no alias" in events[-1].reason
        assert table(events[-1]) == [(2, "production", 100)]
        answers_like(repository, 2, model[2])
    finally:
        registry.stop()


async def test_with_the_broker_down_the_switch_applies_and_its_events_land_later(
    mlflow_server: MlflowSettings, triton_server: TritonSettings, tmp_path: Path
) -> None:
    port = localinfra.free_port()
    broker = localinfra.RunningProcess(localinfra.tansu(port), tmp_path / "tansu.log")
    kafka = KafkaSettings(
        bootstrap=f"127.0.0.1:{port}",
        broker_flavor="tansu",
        partitions=1,
        request_timeout_ms=2000,
        topic_prefix=f"t{uuid.uuid4().hex[:10]}.",
    )
    registry = start_registry(
        kafka, mlflow_server, triton_server, publish_wait_s=1.0, publish_retry_s=0.5
    )
    repository = TritonModelRepository(triton_server, registry.settings.model_name)
    try:
        with RegistryClient(registry.client_settings()) as client:
            model = {1: register(client, mlflow_server, 1), 2: register(client, mlflow_server, 2)}
            broker.stop()  # its memory storage goes with it

            promoted = client.set_alias("production", 2, reason="broker down")
            assert promoted.version == 2  # applied and answered, though not announced
            assert client.get_version(alias="production").version == 2
            assert registry.app is not None
            outbox = registry.app.coordinator.outbox
            localinfra.wait_until(lambda: outbox.failures >= 2, 60, "two refused attempts")
            assert outbox.pending == 1
            # no grace starts before the announcement lands: v1 keeps answering
            assert registry.app.service.retiring() == {1: None}
            assert repository.ready_versions() == [1, 2]

            broker = localinfra.RunningProcess(localinfra.tansu(port), tmp_path / "tansu2.log")
            events = await lifecycle(kafka, 1)
            assert kinds(events) == [("PROMOTED", 2)]
            assert repository.ready_versions() == [1, 2]
            answers_like(repository, 1, model[1])
            serves_exactly(repository, [2])
            # the restarted broker holds what was published after it came back
            events = await lifecycle(kafka, 2)
            assert kinds(events) == [("PROMOTED", 2), ("UNPUBLISHED", 1)]
            assert events[0].reason == "broker down"
            assert table(events[0]) == table(events[1]) == [(2, "production", 100)]
            assert outbox.pending == 0
    finally:
        registry.stop()
        broker.stop()


async def test_callers_following_the_lifecycle_events_never_hit_an_unloaded_version(
    registry: RegistryInThread,
    kafka: KafkaSettings,
    mlflow_server: MlflowSettings,
    triton_server: TritonSettings,
) -> None:
    """Eight callers send every request to the production version of the latest lifecycle
    event (as serving routes) and call Triton directly: a promotion and a rollback, each of
    which unloads the old version, fail none of them."""
    model_name = registry.settings.model_name
    repository = TritonModelRepository(triton_server, model_name)
    with RegistryClient(registry.client_settings()) as client:
        register(client, mlflow_server, 1)
        register(client, mlflow_server, 2)
        assert repository.ready_versions() == [1, 2]

        routed = {"version": 0}
        answered: collections.Counter[int] = collections.Counter()
        failures: list[str] = []
        stop = asyncio.Event()

        async def follow() -> None:
            topic = Topics.from_settings(kafka).lifecycle
            consumer = create_consumer(kafka, topic, group_id=None, client_id="test-follower")
            await consumer.start()
            try:
                while not stop.is_set():
                    for records in (await consumer.getmany(timeout_ms=100)).values():
                        for record in records:
                            event = models_pb2.ModelEvent.FromString(record.value)
                            for served in event.served:
                                if served.alias == "production":
                                    routed["version"] = served.version
            finally:
                await consumer.stop()

        async def call() -> None:
            triton = tritonaio.InferenceServerClient(triton_server.grpc_url)
            tensor = tritonaio.InferInput(TRITON_INPUT, list(ROWS.shape), "FP32")
            tensor.set_data_from_numpy(ROWS)
            wanted = [tritonaio.InferRequestedOutput(TRITON_OUTPUT)]
            try:
                while not stop.is_set():
                    version = routed["version"]
                    if not version:
                        await asyncio.sleep(0.01)  # the follower has not read a table yet
                        continue
                    try:
                        await triton.infer(
                            model_name, [tensor], model_version=str(version), outputs=wanted
                        )
                        answered[version] += 1
                    except InferenceServerException as exc:
                        failures.append(f"v{version}: {exc}")
            finally:
                await triton.close()

        async def answered_by(version: int, more: int) -> None:
            start = answered[version]
            deadline = asyncio.get_running_loop().time() + 60
            while answered[version] < start + more:
                assert asyncio.get_running_loop().time() < deadline, f"v{version} not answering"
                await asyncio.sleep(0.05)

        tasks = [asyncio.create_task(follow())] + [asyncio.create_task(call()) for _ in range(8)]
        try:
            await answered_by(1, 50)
            await asyncio.to_thread(client.set_alias, "production", 2, reason="under load")
            await asyncio.to_thread(serves_exactly, repository, [2])  # v1 unloaded
            await answered_by(2, 200)
            await asyncio.to_thread(client.rollback, "under load")
            await asyncio.to_thread(serves_exactly, repository, [1])  # v2 unloaded
            await answered_by(1, 200)
        finally:
            stop.set()
            await asyncio.gather(*tasks)
    assert failures == []
    assert routed["version"] == 1
