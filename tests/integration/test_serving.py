"""The serving service against real Redis (Feast), Triton and the broker.

Each test publishes TorchScript FraudMLP versions to Triton's repository with the registry's
``TritonModelRepository`` (under a model name of its own when it changes what Triton serves),
pushes online features with the Feast SDK into a Feast project of its own, starts the serving
app in-process on a free port (or ``python -m services.serving`` itself) and calls it over
gRPC. ``test_serving_follows_the_real_registry...`` runs the real registry (models trained by
the trainer, gated, published by the registry) for the start-up read, the canary share, a
promotion and a rollback under load. The other tests, which need a routing table of their
choosing in seconds, answer serving's start-up read from a small ModelRegistry servicer
(GetModelVersion by alias, as the registry answers it) and publish lifecycle events the way
the registry does.
"""

from __future__ import annotations

import asyncio
import io
import os
import signal
import sys
import time
import urllib.request
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pandas as pd
import pytest
import pytest_asyncio
import torch
import tritonclient.grpc as tritongrpc
from feast import FeatureStore
from feast.data_source import PushMode
from google.protobuf.timestamp_pb2 import Timestamp
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from prometheus_client import REGISTRY

from services.cli import localinfra
from services.registry.triton_repository import TritonModelRepository, sha256_hex
from services.serving.app import ServingApp, load_feature_layout
from services.serving.online_features import OnlineFeatureLayout, OnlineFeatureReader
from services.serving.settings import ServingSettings
from services.shared.featurestore import apply_definitions, open_store
from services.shared.kafka import create_consumer, create_producer, ensure_topics
from services.shared.model_aliases import ALIASES, CANARY, PRODUCTION, SHADOW, alias_role
from services.shared.proto.mlops.v1 import (
    events_pb2,
    models_pb2,
    monitoring_pb2,
    predictor_pb2,
    predictor_pb2_grpc,
    registry_pb2,
    registry_pb2_grpc,
)
from services.shared.settings import (
    FeastSettings,
    KafkaSettings,
    MlflowSettings,
    RedisSettings,
    RegistryClientSettings,
    StorageSettings,
    TritonSettings,
)
from services.shared.topics import Topics
from services.shared.usecase.features import (
    MERCHANT_FEATURES,
    MODEL_INPUTS,
    TRITON_INPUT,
    TRITON_OUTPUT,
    USER_FEATURES,
    TransactionColumns,
    model_inputs,
)
from services.shared.usecase.model import FraudMLP

THRESHOLD_V1 = 0.5
THRESHOLD_V2 = 0.4
SERVING_TIMEOUT_S = 60.0


# ----------------------------------------------------------------------------- models


def torchscript_model(seed: int) -> bytes:
    """A FraudMLP with seeded random weights (two seeds: two distinguishable versions)."""
    torch.manual_seed(seed)
    n = len(MODEL_INPUTS)
    model = FraudMLP(torch.rand(n), torch.rand(n) + 0.5, hidden=(16, 8)).eval()
    buffer = io.BytesIO()
    torch.jit.save(torch.jit.script(model), buffer)
    return buffer.getvalue()


MODELS = {1: torchscript_model(1), 2: torchscript_model(2)}


def publish(triton: TritonSettings, model_name: str, served: list[int]) -> TritonModelRepository:
    """Write the versions and have Triton serve exactly ``served``."""
    repository = TritonModelRepository(triton, model_name)
    for version in served:
        payload = MODELS[version]
        repository.write_version(version, payload, sha256_hex(payload))
    repository.write_config(served, len(MODEL_INPUTS))
    repository.load()
    return repository


def local_scores(version: int, matrix: np.ndarray) -> np.ndarray:
    model = torch.jit.load(io.BytesIO(MODELS[version]))
    with torch.inference_mode():
        return model(torch.from_numpy(matrix)).numpy().reshape(-1)


def triton_scores(
    triton: TritonSettings, model_name: str, version: int, matrix: np.ndarray
) -> np.ndarray:
    client = tritongrpc.InferenceServerClient(triton.grpc_url)
    try:
        tensor = tritongrpc.InferInput(TRITON_INPUT, list(matrix.shape), "FP32")
        tensor.set_data_from_numpy(matrix.astype(np.float32))
        result = client.infer(model_name, [tensor], model_version=str(version))
        return result.as_numpy(TRITON_OUTPUT).reshape(-1)
    finally:
        client.close()


@pytest.fixture(scope="module")
def shared_model(triton_server: TritonSettings) -> str:
    """A model name serving v1 and v2 for the tests that do not change what Triton serves."""
    name = f"fraud_serving_{uuid.uuid4().hex[:6]}"
    publish(triton_server, name, [1, 2])
    return name


# ----------------------------------------------------------------------------- features


def feature_store(
    feast: FeastSettings, redis: RedisSettings, storage: StorageSettings
) -> FeatureStore:
    store = open_store(feast, redis, storage)
    apply_definitions(store, feast, storage.offline_dir)
    return store


def user_row(user_id: str, seed: int, now: datetime) -> dict[str, Any]:
    return {
        "user_id": user_id,
        "user_txn_count_1h": seed % 4,
        "user_txn_count_24h": 3 + seed % 9,
        "user_amount_sum_24h": 12.5 * (seed % 7 + 1),
        "user_amount_mean_7d": 20.0 + seed,
        "user_distinct_merchants_24h": 1 + seed % 3,
        "user_last_txn_epoch": now.timestamp() - 60.0 * (seed + 1),
        "user_home_country": ["FR", "DE", "US"][seed % 3],
    }


def merchant_row(merchant_id: str, seed: int) -> dict[str, Any]:
    return {
        "merchant_id": merchant_id,
        "merchant_txn_count_24h": 10 * (seed + 1),
        "merchant_fraud_rate_7d": 0.01 * seed,
        "merchant_labels_7d": seed * 2,
    }


def push(store: FeatureStore, users: list[dict[str, Any]], merchants: list[dict[str, Any]]) -> None:
    now = datetime.now(UTC)
    for source, rows in (("user_activity_push", users), ("merchant_activity_push", merchants)):
        if rows:
            frame = pd.DataFrame(rows)
            frame["event_timestamp"] = now
            frame["created_timestamp"] = now
            store.push(source, frame, to=PushMode.ONLINE)


def expected_matrix(
    txns: list[events_pb2.Transaction],
    users: dict[str, dict[str, Any]],
    merchants: dict[str, dict[str, Any]],
) -> np.ndarray:
    """The model inputs computed here from the pushed values (None: never pushed)."""
    online: dict[str, list[Any]] = {name: [] for name in [*USER_FEATURES, *MERCHANT_FEATURES]}
    for txn in txns:
        for name in USER_FEATURES:
            online[name].append(users.get(txn.user_id, {}).get(name))
        for name in MERCHANT_FEATURES:
            online[name].append(merchants.get(txn.merchant_id, {}).get(name))
    return model_inputs(
        TransactionColumns(
            amount=np.array([t.amount for t in txns]),
            channel=[t.channel for t in txns],
            country=[t.country for t in txns],
            event_time_epoch=np.array(
                [datetime.fromisoformat(t.event_time).timestamp() for t in txns]
            ),
        ),
        online,
    )


def transaction(user: str, merchant: str = "m-1", **overrides: Any) -> events_pb2.Transaction:
    fields: dict[str, Any] = {
        "transaction_id": f"t-{uuid.uuid4().hex[:12]}",
        "user_id": user,
        "merchant_id": merchant,
        "amount": 42.5,
        "currency": "EUR",
        "channel": "web",
        "country": "FR",
        "event_time": (datetime.now(UTC) - timedelta(seconds=5)).isoformat(),
    }
    fields.update(overrides)
    return events_pb2.Transaction(**fields)


# ----------------------------------------------------------------------------- registry stand-in


class StandInRegistry(registry_pb2_grpc.ModelRegistryServicer):
    """Answers GetModelVersion by alias, as the registry does, from a dict."""

    def __init__(self) -> None:
        self.aliases: dict[str, models_pb2.ModelVersion] = {}

    def set(self, alias: str, version: int, threshold: float, traffic_percent: int = 0) -> None:
        self.aliases[alias] = models_pb2.ModelVersion(
            version=version, aliases=[alias], threshold=threshold, traffic_percent=traffic_percent
        )

    async def GetModelVersion(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        found = self.aliases.get(request.alias)
        if found is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no version has alias {request.alias}")
        reply = models_pb2.ModelVersion()
        reply.CopyFrom(found)
        reply.model_name = request.model_name
        return reply

    async def GetRoutingTable(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        """The table serving reads at start-up: production takes what a canary leaves."""
        canary = self.aliases.get(CANARY)
        routes = []
        for alias in ALIASES:
            found = self.aliases.get(alias)
            if found is None:
                continue
            share = found.traffic_percent
            if alias == PRODUCTION:
                share = 100 - (canary.traffic_percent if canary is not None else 0)
            routes.append(
                models_pb2.ServedVersion(
                    version=found.version,
                    alias=alias,
                    role=alias_role(alias),
                    traffic_percent=share,
                    threshold=found.threshold,
                    shadow=alias == SHADOW,
                )
            )
        return registry_pb2.GetRoutingTableResponse(model_name=request.model_name, routes=routes)


@pytest_asyncio.fixture
async def registry() -> AsyncIterator[tuple[StandInRegistry, str]]:
    servicer = StandInRegistry()
    server = grpc.aio.server()
    registry_pb2_grpc.add_ModelRegistryServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield servicer, f"127.0.0.1:{port}"
    finally:
        await server.stop(None)


# ----------------------------------------------------------------------------- serving


class Serving:
    """A running serving app and a client for it."""

    def __init__(self, app: ServingApp, channel: grpc.aio.Channel) -> None:
        self.app = app
        self.channel = channel
        self.stub = predictor_pb2_grpc.PredictorStub(channel)
        self.health = health_pb2_grpc.HealthStub(channel)

    async def predict(
        self, txn: events_pb2.Transaction, deadline_s: float = 5.0, request_id: str = ""
    ) -> predictor_pb2.PredictResponse:
        return await self.stub.Predict(
            predictor_pb2.PredictRequest(transaction=txn, request_id=request_id), timeout=deadline_s
        )

    async def serving_status(self) -> int:
        reply = await self.health.Check(
            health_pb2.HealthCheckRequest(service="mlops.v1.Predictor"), timeout=2
        )
        return int(reply.status)

    async def wait_following(self) -> None:
        """Until the app reads models.lifecycle (events published earlier are not its)."""
        await asyncio.wait_for(self.app.routing.following.wait(), SERVING_TIMEOUT_S)

    async def wait_serving(
        self, serving: bool = True, timeout_s: float = SERVING_TIMEOUT_S
    ) -> None:
        wanted = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        deadline = time.monotonic() + timeout_s
        while await self.serving_status() != wanted:
            assert time.monotonic() < deadline, f"serving health never became {wanted}"
            await asyncio.sleep(0.05)


def serving_settings(
    *,
    kafka: KafkaSettings,
    redis: RedisSettings,
    triton: TritonSettings,
    feast: FeastSettings,
    storage: StorageSettings,
    registry_address: str,
    model_name: str,
    **overrides: Any,
) -> ServingSettings:
    values: dict[str, Any] = {
        "port": 0,
        "kafka": kafka,
        "redis": redis,
        "triton": triton,
        "feast": feast,
        "storage": storage,
        "registry": RegistryClientSettings(address=registry_address, model_name=model_name),
        "health_interval_s": 0.2,
        "registry_retry_interval_s": 0.3,
    }
    values.update(overrides)
    return ServingSettings(**values)


async def start_serving(settings: ServingSettings) -> Serving:
    layout = await load_feature_layout(settings, asyncio.Event())
    assert layout is not None
    app = ServingApp(settings, layout)
    await app.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{app.port}")
    return Serving(app, channel)


async def stop_serving(serving: Serving) -> None:
    await serving.channel.close()
    await serving.app.stop(grace_s=1.0)


async def publish_routing(
    kafka: KafkaSettings, model_name: str, served: list[tuple[int, str, int, float]]
) -> None:
    """A models.lifecycle event carrying the routing table, as the registry publishes it."""
    stamp = Timestamp()
    stamp.GetCurrentTime()
    event = models_pb2.ModelEvent(
        event_id=uuid.uuid4().hex,
        type=models_pb2.MODEL_EVENT_TYPE_ALIAS_SET,
        model_name=model_name,
        occurred_at=stamp,
        served=[
            models_pb2.ServedVersion(version=v, alias=a, traffic_percent=p, threshold=t)
            for v, a, p, t in served
        ],
    )
    producer = create_producer(kafka, client_id="test-registry")
    await producer.start()
    try:
        await producer.send_and_wait(
            Topics.from_settings(kafka).lifecycle,
            event.SerializeToString(),
            key=model_name.encode(),
        )
    finally:
        await producer.stop()


async def wait_for(condition: Any, timeout_s: float, what: str, interval_s: float = 0.05) -> None:
    deadline = time.monotonic() + timeout_s
    while not await condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(interval_s)


@pytest.fixture
def store(
    feast_settings: FeastSettings, redis_server: RedisSettings, storage: StorageSettings
) -> FeatureStore:
    return feature_store(feast_settings, redis_server, storage)


@pytest_asyncio.fixture
async def serving(
    kafka: KafkaSettings,
    redis_server: RedisSettings,
    triton_server: TritonSettings,
    feast_settings: FeastSettings,
    storage: StorageSettings,
    store: FeatureStore,
    shared_model: str,
    registry: tuple[StandInRegistry, str],
) -> AsyncIterator[Serving]:
    """Serving over the shared model: production v1 according to the registry."""
    servicer, address = registry
    servicer.set("production", 1, THRESHOLD_V1)
    await ensure_topics(kafka)
    app = await start_serving(
        serving_settings(
            kafka=kafka,
            redis=redis_server,
            triton=triton_server,
            feast=feast_settings,
            storage=storage,
            registry_address=address,
            model_name=shared_model,
        )
    )
    try:
        await app.wait_serving()
        await app.wait_following()
        yield app
    finally:
        await stop_serving(app)


# ----------------------------------------------------------------------------- tests


async def test_predictions_equal_a_direct_triton_call_and_the_local_model(
    serving: Serving, store: FeatureStore, triton_server: TritonSettings, shared_model: str
) -> None:
    now = datetime.now(UTC)
    users = {f"u-{i}": user_row(f"u-{i}", i, now) for i in range(12)}
    merchants = {f"m-{i}": merchant_row(f"m-{i}", i) for i in range(4)}
    push(store, list(users.values()), list(merchants.values()))
    txns = [
        transaction(
            f"u-{i}",
            f"m-{i % 5}",
            amount=5.0 + 37.0 * i,
            channel=["web", "pos", "app"][i % 3],
            country=["FR", "DE", "GB"][i % 3],
        )
        for i in range(14)  # u-12, u-13 and m-4 were never pushed: defaults
    ]
    answers = await asyncio.gather(*(serving.predict(t) for t in txns))

    matrix = expected_matrix(txns, users, merchants)
    direct = triton_scores(triton_server, shared_model, 1, matrix)
    local = local_scores(1, matrix)
    served = np.array([a.fraud_probability for a in answers])
    np.testing.assert_allclose(served, direct, rtol=0, atol=1e-6)
    np.testing.assert_allclose(served, local, rtol=0, atol=1e-5)
    assert len(set(np.round(served, 6))) > 5  # the features made a difference
    for txn, answer in zip(txns, answers, strict=True):
        assert answer.transaction_id == txn.transaction_id
        assert answer.model_name == shared_model
        assert answer.model_version == 1
        assert answer.route == monitoring_pb2.ROUTE_PRODUCTION
        assert not answer.degraded
        assert answer.request_id
        expected = (
            predictor_pb2.DECISION_DECLINE
            if answer.fraud_probability >= THRESHOLD_V1
            else predictor_pb2.DECISION_APPROVE
        )
        assert answer.decision == expected

    batch = await serving.stub.PredictBatch(
        predictor_pb2.PredictBatchRequest(
            requests=[
                predictor_pb2.PredictRequest(transaction=t, request_id=f"r{i}")
                for i, t in enumerate(txns)
            ]
        ),
        timeout=5,
    )
    assert [r.request_id for r in batch.responses] == [f"r{i}" for i in range(len(txns))]
    np.testing.assert_allclose([r.fraud_probability for r in batch.responses], direct, atol=1e-6)


async def read_predictions(
    kafka: KafkaSettings, wanted: set[str], timeout_s: float = 30.0
) -> dict[tuple[str, int], monitoring_pb2.PredictionRecord]:
    """PredictionRecords on predictions.log for ``wanted`` request ids, by (request id, route)."""
    consumer = create_consumer(
        kafka, Topics.from_settings(kafka).predictions, group_id=None, client_id="test-reader"
    )
    await consumer.start()
    found: dict[tuple[str, int], monitoring_pb2.PredictionRecord] = {}
    try:
        deadline = time.monotonic() + timeout_s
        while {request_id for request_id, _ in found} < wanted:
            assert time.monotonic() < deadline, f"only {len(found)} records arrived"
            batches = await consumer.getmany(timeout_ms=500)
            for records in batches.values():
                for record in records:
                    message = monitoring_pb2.PredictionRecord.FromString(record.value)
                    if message.request_id in wanted:
                        assert record.key == message.transaction.transaction_id.encode()
                        found[(message.request_id, message.route)] = message
    finally:
        await consumer.stop()
    return found


async def test_prediction_records_arrive_on_predictions_log(
    serving: Serving, kafka: KafkaSettings, store: FeatureStore
) -> None:
    now = datetime.now(UTC)
    users = {"u-log": user_row("u-log", 3, now)}
    merchants = {"m-log": merchant_row("m-log", 2)}
    push(store, list(users.values()), list(merchants.values()))
    txns = [transaction("u-log", "m-log", amount=10.0 * (i + 1)) for i in range(5)]
    answers = [await serving.predict(t, request_id=f"log-{i}") for i, t in enumerate(txns)]

    records = await read_predictions(kafka, {f"log-{i}" for i in range(5)})
    matrix = expected_matrix(txns, users, merchants)
    for i, (txn, answer) in enumerate(zip(txns, answers, strict=True)):
        record = records[(f"log-{i}", monitoring_pb2.ROUTE_PRODUCTION)]
        assert record.transaction == txn
        assert record.fraud_probability == pytest.approx(answer.fraud_probability)
        assert record.flagged == (answer.decision == predictor_pb2.DECISION_DECLINE)
        assert record.model_version == 1
        assert record.model_name == answer.model_name
        assert not record.degraded
        assert 0 < record.latency_ms < 5000
        assert record.predicted_at.seconds >= int(now.timestamp()) - 1
        assert set(record.features) == set(MODEL_INPUTS)  # a map: no order to compare
        np.testing.assert_allclose(
            [record.features[name] for name in MODEL_INPUTS], matrix[i], rtol=1e-6, atol=1e-6
        )


async def test_the_reader_returns_what_the_feast_sdk_pushed(
    store: FeatureStore, redis_server: RedisSettings, feast_settings: FeastSettings
) -> None:
    """The direct Redis reader and Feast's own get_online_features agree, value for value."""
    now = datetime.now(UTC)
    users = [user_row(f"ru-{i}", i, now) for i in range(6)]
    users[2]["user_home_country"] = "ÉÉ-ünï"  # not a country: a string is a string
    merchants = [merchant_row(f"rm-{i}", i) for i in range(3)]
    push(store, users, merchants)
    # a newer row replaces an entity's features, as the features service updates them
    updated = user_row("ru-0", 40, now)
    push(store, [updated], [])

    rows = [{"user_id": f"ru-{i}", "merchant_id": f"rm-{i % 4}"} for i in range(8)]
    rows.append({"user_id": "ru-1", "merchant_id": "rm-1"})  # repeated entities
    sdk = store.get_online_features(
        store.get_feature_service(feast_settings.feature_service), rows
    ).to_dict()

    reader = OnlineFeatureReader(
        redis_server,
        OnlineFeatureLayout.from_store(store, feast_settings.feature_service),
        timeout_s=1.0,
        retry_interval_s=0.1,
        pool_size=2,
    )
    try:
        ours = await reader.read(
            {
                "user_id": [r["user_id"] for r in rows],
                "merchant_id": [r["merchant_id"] for r in rows],
            }
        )
    finally:
        await reader.close()
    assert set(ours) == set(USER_FEATURES) | set(MERCHANT_FEATURES)
    for name, values in ours.items():
        assert values == sdk[name], name
        assert [type(v) for v in values] == [type(v) for v in sdk[name]], name
    assert ours["user_txn_count_24h"][0] == updated["user_txn_count_24h"]
    assert ours["user_home_country"][2] == "ÉÉ-ünï"
    assert ours["user_txn_count_1h"][6] is None  # ru-6 was never pushed
    assert ours["merchant_labels_7d"][3] is None  # rm-3 neither


@pytest.mark.parametrize(
    ("overrides", "field", "message"),
    [
        ({"amount": 0.0}, "transaction.amount", "must be greater than 0"),
        ({"amount": -3.0}, "transaction.amount", "must be greater than 0"),
        ({"currency": "eur"}, "transaction.currency", "is not an ISO 4217"),
        ({"channel": "fax"}, "transaction.channel", "must be one of web, pos, app"),
        ({"user_id": ""}, "transaction.user_id", "is required"),
        ({"event_time": "yesterday"}, "transaction.event_time", "is not RFC 3339"),
        ({"country": "XX"}, "transaction.country", "is not an ISO 3166-1"),
    ],
)
async def test_invalid_requests_get_invalid_argument_naming_the_field(
    serving: Serving, overrides: dict[str, Any], field: str, message: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await serving.predict(transaction("u-bad", **overrides))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.details().startswith(f"{field}: ")
    assert message in caught.value.details()


async def test_invalid_batches_and_missing_transactions_name_the_field(serving: Serving) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await serving.stub.Predict(predictor_pb2.PredictRequest(request_id="r"), timeout=5)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.details() == "transaction: is required"

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await serving.stub.PredictBatch(
            predictor_pb2.PredictBatchRequest(
                requests=[
                    predictor_pb2.PredictRequest(transaction=transaction("u-1")),
                    predictor_pb2.PredictRequest(transaction=transaction("u-2", currency="XYZ")),
                ]
            ),
            timeout=5,
        )
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.details().startswith("requests[1].transaction.currency: ")


async def test_canary_gets_its_share_sticky_per_user_and_shadow_is_logged_not_returned(
    serving: Serving, kafka: KafkaSettings, shared_model: str
) -> None:
    await publish_routing(
        kafka, shared_model, [(1, "production", 100, THRESHOLD_V1), (2, "canary", 20, THRESHOLD_V2)]
    )

    async def canary_routed() -> bool:
        table = serving.app.router.table
        return table is not None and table.canary is not None

    await wait_for(canary_routed, 30, "the canary to be routed")
    users = [f"cu-{uuid.uuid4().hex[:10]}" for _ in range(2000)]
    first: dict[str, predictor_pb2.PredictResponse] = {}
    for start in range(0, len(users), 200):
        chunk = users[start : start + 200]
        answers = await asyncio.gather(*(serving.predict(transaction(u)) for u in chunk))
        first.update(zip(chunk, answers, strict=True))
    on_canary = [u for u, a in first.items() if a.model_version == 2]
    share = len(on_canary) / len(users)
    assert 0.17 <= share <= 0.23, share
    for answer in first.values():
        canary = answer.model_version == 2
        assert answer.route == (
            monitoring_pb2.ROUTE_CANARY if canary else monitoring_pb2.ROUTE_PRODUCTION
        )
        threshold = THRESHOLD_V2 if canary else THRESHOLD_V1
        assert (answer.decision == predictor_pb2.DECISION_DECLINE) == (
            answer.fraud_probability >= threshold
        )
    again = await asyncio.gather(*(serving.predict(transaction(u)) for u in users[:300]))
    assert [a.model_version for a in again] == [first[u].model_version for u in users[:300]]

    # a bigger share keeps every canary user on the canary
    await publish_routing(
        kafka, shared_model, [(1, "production", 100, THRESHOLD_V1), (2, "canary", 50, THRESHOLD_V2)]
    )

    async def share_is_50() -> bool:
        table = serving.app.router.table
        return table is not None and table.canary is not None and table.canary.traffic_percent == 50

    await wait_for(share_is_50, 30, "the canary share to change")
    moved = await asyncio.gather(*(serving.predict(transaction(u)) for u in on_canary[:200]))
    assert all(a.model_version == 2 for a in moved)

    # answers before the shadow is set: those of v1 are replayed on the new shadow v2
    before = [transaction(u) for u in users[300:320]]
    earlier = [await serving.predict(t, request_id=f"pre-{i}") for i, t in enumerate(before)]

    # shadow: v2 mirrors production v1; callers only ever see v1
    await publish_routing(
        kafka,
        shared_model,
        [(1, "production", 100, THRESHOLD_V1), (2, "shadow", 100, THRESHOLD_V2)],
    )

    async def shadow_routed() -> bool:
        table = serving.app.router.table
        return table is not None and table.shadow is not None and table.canary is None

    await wait_for(shadow_routed, 30, "the shadow to be routed")
    txns = [transaction(u) for u in users[:20]]
    answers = [await serving.predict(t, request_id=f"sh-{i}") for i, t in enumerate(txns)]
    assert all(a.model_version == 1 and a.route == monitoring_pb2.ROUTE_PRODUCTION for a in answers)
    records = await read_predictions(kafka, {f"sh-{i}" for i in range(20)})

    async def all_shadows_logged() -> bool:
        records.update(await read_predictions(kafka, {f"sh-{i}" for i in range(20)}))
        return all((f"sh-{i}", monitoring_pb2.ROUTE_SHADOW) in records for i in range(20))

    await wait_for(all_shadows_logged, 30, "the shadow records")
    matrix = expected_matrix(txns, {}, {})
    shadow_scores = local_scores(2, matrix)
    for i, answer in enumerate(answers):
        shadow = records[(f"sh-{i}", monitoring_pb2.ROUTE_SHADOW)]
        assert shadow.model_version == 2
        assert shadow.fraud_probability == pytest.approx(float(shadow_scores[i]), abs=1e-5)
        assert records[(f"sh-{i}", monitoring_pb2.ROUTE_PRODUCTION)].model_version == 1
        assert answer.fraud_probability != pytest.approx(shadow.fraud_probability, abs=1e-9)
        assert not shadow.replayed

    # the replay: v1's earlier answers scored on v2 from their logged inputs, marked replayed;
    # v2's own (canary) answers are not scored again
    by_v1 = {f"pre-{i}" for i, a in enumerate(earlier) if a.model_version == 1}
    assert 0 < len(by_v1) < len(earlier)  # the 50 % canary answered the others
    replayed: dict[tuple[str, int], monitoring_pb2.PredictionRecord] = {}

    async def all_replayed() -> bool:
        replayed.update(await read_predictions(kafka, by_v1))
        return all((rid, monitoring_pb2.ROUTE_SHADOW) in replayed for rid in by_v1)

    await wait_for(all_replayed, 30, "the replayed shadow records")
    replay_scores = local_scores(2, expected_matrix(before, {}, {}))
    for i, answer in enumerate(earlier):
        shadow = replayed.get((f"pre-{i}", monitoring_pb2.ROUTE_SHADOW))
        if answer.model_version != 1:
            assert shadow is None
            continue
        assert shadow is not None and shadow.replayed and shadow.model_version == 2
        assert shadow.fraud_probability == pytest.approx(float(replay_scores[i]), abs=1e-5)
        assert shadow.transaction.transaction_id == before[i].transaction_id


async def test_health_is_not_serving_until_a_version_is_routable_and_reflection_lists_predictor(
    kafka: KafkaSettings,
    redis_server: RedisSettings,
    triton_server: TritonSettings,
    feast_settings: FeastSettings,
    storage: StorageSettings,
    store: FeatureStore,
    shared_model: str,
    registry: tuple[StandInRegistry, str],
) -> None:
    _, address = registry  # the registry knows no production version yet
    await ensure_topics(kafka)
    serving = await start_serving(
        serving_settings(
            kafka=kafka,
            redis=redis_server,
            triton=triton_server,
            feast=feast_settings,
            storage=storage,
            registry_address=address,
            model_name=shared_model,
        )
    )
    try:
        await serving.wait_following()
        assert await serving.serving_status() == health_pb2.HealthCheckResponse.NOT_SERVING
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await serving.predict(transaction("u-early"))
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE

        # a version Triton does not serve is routed but not healthy
        await publish_routing(kafka, shared_model, [(7, "production", 100, 0.5)])

        async def routed() -> bool:
            return serving.app.router.table is not None

        await wait_for(routed, 30, "the routing event")
        await serving.wait_serving(False)
        assert serving.app.health.serving is False

        await publish_routing(kafka, shared_model, [(2, "production", 100, 0.5)])
        await serving.wait_serving(True)
        answer = await serving.predict(transaction("u-late"))
        assert answer.model_version == 2

        reflection = reflection_pb2_grpc.ServerReflectionStub(serving.channel)
        responses = reflection.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")])
        )
        names = {s.name async for r in responses for s in r.list_services_response.service}
        assert {"mlops.v1.Predictor", "grpc.health.v1.Health"} <= names
    finally:
        await stop_serving(serving)


def metric(name: str, labels: dict[str, str] | None = None) -> float:
    return REGISTRY.get_sample_value(name, labels or {}) or 0.0


async def test_without_redis_answers_are_degraded_or_unavailable_then_recover(
    tmp_path: Path,
    kafka: KafkaSettings,
    triton_server: TritonSettings,
    feast_settings: FeastSettings,
    storage: StorageSettings,
    shared_model: str,
    registry: tuple[StandInRegistry, str],
) -> None:
    port = localinfra.free_port()
    redis_process = localinfra.RunningProcess(localinfra.redis(port, None), tmp_path / "redis.log")
    redis = RedisSettings(port=port)
    servicer, address = registry
    servicer.set("production", 1, THRESHOLD_V1)
    await ensure_topics(kafka)
    store = feature_store(feast_settings, redis, storage)
    now = datetime.now(UTC)
    users = {"u-r": user_row("u-r", 5, now)}
    merchants = {"m-r": merchant_row("m-r", 3)}
    push(store, list(users.values()), list(merchants.values()))
    common: dict[str, Any] = {
        "kafka": kafka,
        "redis": redis,
        "triton": triton_server,
        "feast": feast_settings,
        "storage": storage,
        "registry_address": address,
        "model_name": shared_model,
        "feature_timeout_ms": 100.0,
        "feature_retry_interval_ms": 100.0,
    }
    degrading = await start_serving(serving_settings(**common))
    failing = await start_serving(serving_settings(**common, on_feature_store_unavailable="fail"))
    try:
        await degrading.wait_serving()
        await failing.wait_serving()
        txn = transaction("u-r", "m-r")
        healthy = await degrading.predict(txn)
        assert not healthy.degraded
        assert not (await failing.predict(txn)).degraded
        degraded_before = metric("mlops_serving_degraded_total")

        redis_process.stop()
        answer = await degrading.predict(txn, deadline_s=2)
        assert answer.degraded
        defaults = expected_matrix([txn], {}, {})
        direct = triton_scores(triton_server, shared_model, 1, defaults)
        assert answer.fraud_probability == pytest.approx(float(direct[0]), abs=1e-6)
        assert answer.fraud_probability != pytest.approx(healthy.fraud_probability, abs=1e-9)
        started = time.monotonic()
        answers = await asyncio.gather(
            *(degrading.predict(transaction("u-r"), deadline_s=2) for _ in range(50))
        )
        assert all(a.degraded for a in answers)
        assert time.monotonic() - started < 2
        assert metric("mlops_serving_degraded_total") >= degraded_before + 51
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await failing.predict(txn, deadline_s=2)
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE

        redis_process = localinfra.RunningProcess(
            localinfra.redis(port, None), tmp_path / "redis2.log"
        )
        push(store, list(users.values()), list(merchants.values()))  # an empty Redis came back

        async def recovered() -> bool:
            answers = [await s.predict(txn) for s in (degrading, failing)]
            return not any(a.degraded for a in answers)

        await wait_for(recovered, 30, "answers with features again", interval_s=0.1)
        again = await degrading.predict(txn)
        assert again.fraud_probability == pytest.approx(healthy.fraud_probability, abs=1e-6)
    finally:
        await stop_serving(degrading)
        await stop_serving(failing)
        redis_process.stop()


async def test_without_triton_calls_fail_unavailable_within_the_deadline_then_recover(
    tmp_path: Path,
    kafka: KafkaSettings,
    redis_server: RedisSettings,
    feast_settings: FeastSettings,
    storage: StorageSettings,
    store: FeatureStore,
    registry: tuple[StandInRegistry, str],
) -> None:
    repository = tmp_path / "triton_models"
    repository.mkdir()
    ports = [localinfra.free_port() for _ in range(3)]

    def start_triton(log_name: str) -> localinfra.RunningProcess:
        return localinfra.RunningProcess(
            localinfra.triton(ports[0], ports[1], ports[2], repository), tmp_path / log_name
        )

    triton_process = start_triton("triton.log")
    triton = TritonSettings(
        http_port=ports[0], grpc_port=ports[1], metrics_port=ports[2], model_repository=repository
    )
    model_name = "fraud_outage"
    servicer, address = registry
    servicer.set("production", 1, THRESHOLD_V1)
    await ensure_topics(kafka)
    serving: Serving | None = None
    try:
        await asyncio.to_thread(publish, triton, model_name, [1])
        serving = await start_serving(
            serving_settings(
                kafka=kafka,
                redis=redis_server,
                triton=triton,
                feast=feast_settings,
                storage=storage,
                registry_address=address,
                model_name=model_name,
            )
        )
        await serving.wait_serving()
        assert (await serving.predict(transaction("u-t"))).model_version == 1

        # a hung Triton (stopped, not dead): answers must still come before the deadline
        os.kill(triton_process.process.pid, signal.SIGSTOP)
        try:
            for deadline_s in (0.3, 1.0):
                started = time.monotonic()
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await serving.predict(transaction("u-t"), deadline_s=deadline_s)
                assert caught.value.code() == grpc.StatusCode.UNAVAILABLE, caught.value.details()
                assert time.monotonic() - started < deadline_s
        finally:
            os.kill(triton_process.process.pid, signal.SIGCONT)
        assert (await serving.predict(transaction("u-t"))).model_version == 1

        # a dead Triton: UNAVAILABLE at once, NOT_SERVING, then back on its own
        triton_process.kill()
        triton_process.stop()  # closes its log
        for deadline_s in (0.3, 1.0):
            started = time.monotonic()
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await serving.predict(transaction("u-t"), deadline_s=deadline_s)
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE, caught.value.details()
            assert time.monotonic() - started < deadline_s
        await serving.wait_serving(False)

        triton_process = start_triton("triton2.log")
        await asyncio.to_thread(TritonModelRepository(triton, model_name).load)

        async def recovered() -> bool:
            try:
                return (await serving.predict(transaction("u-t"), deadline_s=1)).model_version == 1
            except grpc.aio.AioRpcError:
                return False

        await wait_for(recovered, 30, "scores after Triton restarted", interval_s=0.1)
        await serving.wait_serving(True)
    finally:
        if serving is not None:
            await stop_serving(serving)
        triton_process.stop()


async def test_serving_follows_the_real_registry_through_canary_promotion_and_rollback(
    kafka: KafkaSettings,
    mlflow_server: MlflowSettings,
    triton_server: TritonSettings,
    redis_server: RedisSettings,
    feast_settings: FeastSettings,
    storage: StorageSettings,
    store: FeatureStore,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """The registry itself (models trained by the trainer, gated, published to Triton): the
    start-up read, the canary share, then a promotion and a rollback while 16 clients call;
    no call may fail (the registry switches Triton before its event reaches serving)."""
    from fraud_history import write_fraud_history
    from registry_harness import RegistryInThread, registry_settings, training_settings

    from services.shared.registry_client import RegistryClient
    from services.training.main import build_pipeline
    from services.training.pipeline import LoggedProgress, TrainingRequest

    await ensure_topics(kafka)
    registry = RegistryInThread(
        registry_settings(kafka, mlflow_server, triton_server, default_canary_percent=20)
    ).start()
    client = RegistryClient(registry.client_settings())
    serving: Serving | None = None
    try:
        training_feast = FeastSettings(project=f"t{uuid.uuid4().hex[:10]}")

        def train(shuffle_before: datetime | None) -> models_pb2.ModelVersion:
            history = StorageSettings(data_dir=tmp_path_factory.mktemp("history") / "data")
            write_fraud_history(history.offline_dir, shuffle_labels_before=shuffle_before)
            settings = training_settings(
                history, training_feast, mlflow_server, registry.client_settings()
            )
            request = TrainingRequest(
                f"req-{uuid.uuid4().hex[:8]}", registry.settings.model_name, "manual", "test"
            )
            outcome = build_pipeline(settings).run(request, LoggedProgress(request.request_id))
            assert outcome.version is not None
            return outcome.version

        v1 = await asyncio.to_thread(train, datetime(2026, 3, 8, tzinfo=UTC))  # labels shuffled
        v2 = await asyncio.to_thread(train, None)
        assert v1.stage == models_pb2.MODEL_STAGE_PRODUCTION
        assert v2.stage == models_pb2.MODEL_STAGE_CANARY, v2.gate.reason
        serving = await start_serving(
            serving_settings(
                kafka=kafka,
                redis=redis_server,
                triton=triton_server,
                feast=feast_settings,
                storage=storage,
                registry_address=f"127.0.0.1:{registry.port}",
                model_name=registry.settings.model_name,
            )
        )
        await serving.wait_serving()
        await serving.wait_following()

        # the start-up read: production v1 and the canary's 20 %, each with its threshold
        users = [f"ru-{i}" for i in range(1000)]
        answers = await asyncio.gather(*(serving.predict(transaction(u)) for u in users))
        share = sum(a.model_version == 2 for a in answers) / len(users)
        assert 0.16 <= share <= 0.24, share
        thresholds = {1: v1.threshold, 2: v2.threshold}
        for answer in answers:
            declined = answer.fraud_probability >= thresholds[answer.model_version]
            assert (answer.decision == predictor_pb2.DECISION_DECLINE) == declined

        answered: dict[int, int] = {1: 0, 2: 0}
        failures: list[str] = []
        stop = asyncio.Event()

        async def caller(worker: int) -> None:
            n = 0
            while not stop.is_set():
                n += 1
                try:
                    answer = await serving.predict(
                        transaction(f"w{worker}-{n % 40}"), deadline_s=10
                    )
                    answered[answer.model_version] += 1
                except grpc.aio.AioRpcError as exc:
                    failures.append(f"{exc.code().name}: {exc.details()}")

        async def only(version: int, n: int) -> bool:
            # n answers in a row (counted from now) all from ``version``
            start = dict(answered)
            await asyncio.sleep(0.2)
            other = 3 - version
            return answered[other] == start[other] and answered[version] - start[version] >= n

        callers = [asyncio.create_task(caller(w)) for w in range(16)]
        try:
            promoted = await asyncio.to_thread(
                client.set_alias, "production", 2, reason="canary looked good"
            )
            assert promoted.version == 2
            await wait_for(lambda: only(2, 50), 60, "answers from v2 only")
            rolled = await asyncio.to_thread(client.rollback, "test rollback")
            assert rolled.version == 1
            await wait_for(lambda: only(1, 50), 60, "answers from v1 only")
        finally:
            stop.set()
            await asyncio.gather(*callers)
        assert failures == []
        assert answered[1] > 0 and answered[2] > 0
    finally:
        client.close()
        if serving is not None:
            await stop_serving(serving)
        registry.stop()


async def test_python_m_services_serving_with_two_workers_on_one_port(
    kafka: KafkaSettings,
    redis_server: RedisSettings,
    triton_server: TritonSettings,
    feast_settings: FeastSettings,
    storage: StorageSettings,
    store: FeatureStore,
    shared_model: str,
    registry: tuple[StandInRegistry, str],
) -> None:
    """The service as deployed: ``python -m services.serving`` configured by environment,
    here with two worker processes sharing the gRPC port and one metrics endpoint."""
    servicer, address = registry
    servicer.set("production", 1, THRESHOLD_V1)
    await ensure_topics(kafka)
    port, metrics_port = localinfra.free_port(), localinfra.free_port()
    env = {
        **os.environ,
        "MLOPS_SERVING_PORT": str(port),
        "MLOPS_SERVING_METRICS_PORT": str(metrics_port),
        "MLOPS_SERVING_WORKERS": "2",
        "MLOPS_KAFKA_BOOTSTRAP": kafka.bootstrap,
        "MLOPS_KAFKA_TOPIC_PREFIX": kafka.topic_prefix,
        "MLOPS_KAFKA_BROKER_FLAVOR": "tansu",
        "MLOPS_REDIS_PORT": str(redis_server.port),
        "MLOPS_TRITON_GRPC_PORT": str(triton_server.grpc_port),
        "MLOPS_FEAST_PROJECT": feast_settings.project,
        "MLOPS_STORAGE_DATA_DIR": str(storage.data_dir),
        "MLOPS_REGISTRY_CLIENT_ADDRESS": address,
        "MLOPS_REGISTRY_CLIENT_MODEL_NAME": shared_model,
        "MLOPS_SERVING_HEALTH_INTERVAL_S": "0.2",
    }
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "services.serving", env=env, start_new_session=True
    )
    try:

        async def serving_on_fresh_connections() -> bool:
            for _ in range(6):  # the kernel may hand each connection to either worker
                async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                    try:
                        reply = await health_pb2_grpc.HealthStub(channel).Check(
                            health_pb2.HealthCheckRequest(service="mlops.v1.Predictor"),
                            timeout=1,
                        )
                    except grpc.aio.AioRpcError:
                        return False
                    if reply.status != health_pb2.HealthCheckResponse.SERVING:
                        return False
            return True

        await wait_for(serving_on_fresh_connections, 90, "both workers serving", interval_s=0.3)
        channels = [grpc.aio.insecure_channel(f"127.0.0.1:{port}") for _ in range(8)]
        try:
            answers = await asyncio.gather(
                *(
                    predictor_pb2_grpc.PredictorStub(channels[i % 8]).Predict(
                        predictor_pb2.PredictRequest(transaction=transaction(f"pm-{i}")),
                        timeout=5,
                    )
                    for i in range(80)
                )
            )
        finally:
            for channel in channels:
                await channel.close()
        assert all(a.model_version == 1 for a in answers)

        def scrape() -> dict[str, float]:
            with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics") as reply:
                text = reply.read().decode()
            samples: dict[str, float] = {}
            for line in text.splitlines():
                if line.startswith("mlops_serving_predictions_total{"):
                    samples[line.split("{")[1].split("}")[0]] = float(line.rsplit(" ", 1)[1])
            return samples

        samples = await asyncio.to_thread(scrape)
        assert sum(samples.values()) == 80  # both workers' counts, summed
    finally:
        if process.returncode is None:
            process.terminate()
        assert await asyncio.wait_for(process.wait(), 30) == 0
