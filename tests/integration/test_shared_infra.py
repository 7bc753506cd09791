"""Shared infrastructure code against the real processes: topics, the Tansu workaround, the
gRPC bootstrap (health, reflection, error mapping, auth)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from prometheus_client import REGISTRY

from services.cli import localinfra
from services.shared import broker_compat
from services.shared.errors import InvalidArgument, NotFound
from services.shared.grpc_server import BearerTokenAuth, GrpcServer
from services.shared.kafka import (
    consumer_group_lag,
    create_consumer,
    create_producer,
    ensure_topics,
)
from services.shared.proto.mlops.v1 import models_pb2, registry_pb2, registry_pb2_grpc
from services.shared.settings import KafkaSettings
from services.shared.topics import Topics


async def test_ensure_topics_creates_the_contract_topics_once(kafka: KafkaSettings) -> None:
    created = await ensure_topics(kafka)
    topics = Topics.from_settings(kafka)
    assert sorted(created) == sorted(topics.all())
    assert await ensure_topics(kafka) == []
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka.bootstrap)
    await admin.start()
    try:
        assert set(topics.all()) <= set(await admin.list_topics())
    finally:
        await admin.close()


async def test_end_offsets_is_the_log_end_on_tansu(kafka: KafkaSettings) -> None:
    """Tansu's ListOffsets(latest) returns the last batch's base offset + 1; with the
    workaround (on only for broker_flavor=tansu) end_offsets is the true log end."""
    topic = f"{kafka.topic_prefix}offsets"
    producer = create_producer(kafka, client_id="test", linger_ms=50)
    await producer.start()
    try:
        batch = [await producer.send(topic, b"x", partition=0) for _ in range(25)]
        for future in batch:
            await future
        await producer.send_and_wait(topic, b"y", partition=0)
    finally:
        await producer.stop()
    consumer = create_consumer(kafka, group_id=None, client_id="test")
    await consumer.start()
    try:
        tp = TopicPartition(topic, 0)
        assert (await consumer.end_offsets([tp]))[tp] == 26
    finally:
        await consumer.stop()


async def test_a_position_past_the_end_is_reset_as_kafka_would(kafka: KafkaSettings) -> None:
    """Tansu answers a fetch from beyond the log end with nothing (Kafka: OFFSET_OUT_OF_RANGE);
    a consumer left there (its topic re-created by a broker restart) would wait for ever. With
    the workaround it starts over per auto_offset_reset, and reads what is there."""
    topic = f"{kafka.topic_prefix}past-end"
    producer = create_producer(kafka, client_id="test")
    await producer.start()
    try:
        for i in range(5):
            await producer.send_and_wait(topic, b"r%d" % i, partition=0)
    finally:
        await producer.stop()
    consumer = create_consumer(kafka, group_id=None, client_id="test")  # earliest
    told: list[TopicPartition] = []
    forget = broker_compat.on_position_reset(told.append)
    await consumer.start()
    try:
        tp = TopicPartition(topic, 0)
        consumer.assign([tp])
        consumer.seek(tp, 12_000)  # where it was before the broker restart
        values: list[bytes] = []
        deadline = asyncio.get_running_loop().time() + 30
        while len(values) < 5:
            assert asyncio.get_running_loop().time() < deadline, (
                values,
                await consumer.position(tp),
            )
            batches = await consumer.getmany(timeout_ms=500)
            values += [r.value for records in batches.values() for r in records]
        assert values == [b"r%d" % i for i in range(5)]
        assert told == [tp]  # a client keeping its own offsets learns of the reset
    finally:
        forget()
        await consumer.stop()


async def test_consumers_do_not_autocommit(kafka: KafkaSettings) -> None:
    topic = f"{kafka.topic_prefix}commit"
    producer = AIOKafkaProducer(bootstrap_servers=kafka.bootstrap)
    await producer.start()
    await producer.send_and_wait(topic, b"a", partition=0)
    await producer.stop()
    consumer: AIOKafkaConsumer = create_consumer(
        kafka, topic, group_id=f"{topic}-g", client_id="test"
    )
    await consumer.start()
    try:
        records = await consumer.getmany(timeout_ms=10_000)
        assert sum(len(r) for r in records.values()) == 1
        assert await consumer.committed(TopicPartition(topic, 0)) is None
    finally:
        await consumer.stop()


class _Registry(registry_pb2_grpc.ModelRegistryServicer):
    async def GetModelVersion(self, request, context):  # type: ignore[no-untyped-def]
        if request.version < 0:
            raise InvalidArgument("version", "must not be negative")
        if request.version == 404:
            raise NotFound("no such version")
        if request.version == 500:
            raise RuntimeError("boom")
        return models_pb2.ModelVersion(model_name=request.model_name, version=request.version)

    async def SetAlias(self, request, context):  # type: ignore[no-untyped-def]
        return models_pb2.ModelVersion(model_name=request.model_name, version=request.version)


@pytest.fixture
async def registry_channel() -> AsyncIterator[grpc.aio.Channel]:
    server = GrpcServer(
        host="127.0.0.1",
        port=0,
        service_names=["mlops.v1.ModelRegistry"],
        auth=BearerTokenAuth("token-1", ["SetAlias"]),
    )
    registry_pb2_grpc.add_ModelRegistryServicer_to_server(_Registry(), server.server)
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{server.port}")
    try:
        yield channel
    finally:
        await channel.close()
        await server.stop(0)


async def test_errors_map_to_status_codes(registry_channel: grpc.aio.Channel) -> None:
    registry_stub = registry_pb2_grpc.ModelRegistryStub(registry_channel)
    ok = await registry_stub.GetModelVersion(registry_pb2.GetModelVersionRequest(version=3))
    assert ok.version == 3
    cases = {
        -1: grpc.StatusCode.INVALID_ARGUMENT,
        404: grpc.StatusCode.NOT_FOUND,
        500: grpc.StatusCode.INTERNAL,
    }
    for version, code in cases.items():
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await registry_stub.GetModelVersion(
                registry_pb2.GetModelVersionRequest(version=version)
            )
        assert info.value.code() is code
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await registry_stub.GetModelVersion(registry_pb2.GetModelVersionRequest(version=-1))
    assert "version" in (info.value.details() or "")


async def test_mutating_calls_need_the_token(registry_channel: grpc.aio.Channel) -> None:
    registry_stub = registry_pb2_grpc.ModelRegistryStub(registry_channel)
    request = registry_pb2.SetAliasRequest(
        model_name="m", version=2, alias=models_pb2.MODEL_ALIAS_PRODUCTION
    )
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await registry_stub.SetAlias(request)
    assert info.value.code() is grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await registry_stub.SetAlias(request, metadata=[("authorization", "Bearer nope")])
    assert info.value.code() is grpc.StatusCode.PERMISSION_DENIED
    answer = await registry_stub.SetAlias(request, metadata=[("authorization", "Bearer token-1")])
    assert answer.version == 2


async def test_health_and_reflection(registry_channel: grpc.aio.Channel) -> None:
    channel = registry_channel
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "mlops.v1.ModelRegistry"):
        reply = await health.Check(health_pb2.HealthCheckRequest(service=service))
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    reflection = reflection_pb2_grpc.ServerReflectionStub(channel)

    async def requests():  # type: ignore[no-untyped-def]
        yield reflection_pb2.ServerReflectionRequest(list_services="")

    names: set[str] = set()
    async for response in reflection.ServerReflectionInfo(requests()):
        names |= {s.name for s in response.list_services_response.service}
    assert {"mlops.v1.ModelRegistry", "grpc.health.v1.Health"} <= names


async def test_consumer_group_lag_counts_uncommitted_records(kafka: KafkaSettings) -> None:
    topic = f"{kafka.topic_prefix}lag"
    group = f"{topic}-g"
    producer = create_producer(kafka, client_id="test")
    await producer.start()
    try:
        for i in range(7):
            await producer.send_and_wait(topic, b"r%d" % i, partition=0)
    finally:
        await producer.stop()
    assert sum((await consumer_group_lag(kafka, group, [topic])).values()) == 7
    consumer = create_consumer(kafka, topic, group_id=group, client_id="test")
    await consumer.start()
    try:
        seen = 0
        while seen < 5:
            batch = await consumer.getmany(timeout_ms=5_000, max_records=5 - seen)
            seen += sum(len(r) for r in batch.values())
        await consumer.commit({TopicPartition(topic, 0): 5})
    finally:
        await consumer.stop()
    lag = await consumer_group_lag(kafka, group, [topic])
    assert lag[TopicPartition(topic, 0)] == 2
    assert sum(lag.values()) == 2


async def test_sends_across_a_restart_of_the_local_broker_do_not_fail(tmp_path: Path) -> None:
    """Tansu refuses the first writes to a topic re-created after its restart with
    UnknownError (broker_compat); aiokafka would fail those sends, and a service failing a
    send must stop. With the workaround they are retried: a producer sending steadily across
    the restart sees every send complete. (What was sent while the broker was away is lost
    on the in-memory broker whatever the client does; this checks the failures only.)"""
    port = localinfra.free_port()
    broker = localinfra.RunningProcess(localinfra.tansu(port), tmp_path / "tansu-1.log")
    kafka = KafkaSettings(bootstrap=f"127.0.0.1:{port}", broker_flavor="tansu", partitions=2)
    topic = "restart.sends"
    await ensure_topics(kafka, [topic])
    producer = create_producer(kafka, client_id="test")
    await producer.start()
    retried_before = _produce_retries()
    failures: list[BaseException] = []

    async def send(i: int) -> None:
        try:
            await producer.send_and_wait(topic, b"%d" % i, partition=i % 2)
        except KafkaError as exc:
            failures.append(exc)

    sends: list[asyncio.Task[None]] = []
    stop = asyncio.Event()

    async def keep_sending() -> None:  # 250 sends/s throughout
        while not stop.is_set():
            sends.append(asyncio.create_task(send(len(sends))))
            await asyncio.sleep(0.004)

    def restart() -> localinfra.RunningProcess:
        broker.stop()
        return localinfra.RunningProcess(localinfra.tansu(port), tmp_path / "tansu-2.log")

    sender = asyncio.create_task(keep_sending())
    try:
        await asyncio.sleep(2.0)
        broker = await asyncio.to_thread(restart)  # sends go on meanwhile
        await asyncio.sleep(1.0)
        await ensure_topics(kafka, [topic])  # what kafka.keep_topics does in the services
        await asyncio.sleep(2.0)
        stop.set()
        await sender
        await asyncio.gather(*sends)
    finally:
        stop.set()
        await producer.stop()
        broker.stop()
    assert failures == [], f"{len(failures)} of {len(sends)} sends failed: {failures[:3]}"
    retried = _produce_retries() - retried_before
    print(f"{len(sends)} sends, {retried} batches retried after UnknownError")


def _produce_retries() -> float:
    return REGISTRY.get_sample_value("mlops_kafka_tansu_produce_retries_total") or 0.0
