"""Hostile input through the real broker: property-based fuzzing (hypothesis) of what product
services and strangers may write to the platform's topics.

- ``events.transactions`` / ``events.labels``: malformed JSON, wrong types, NaN and
  infinities, huge and empty payloads, invalid UTF-8, garbage and truncated protobuf,
  repeated keys, unknown fields, interleaved with valid events. Every hostile record ends in
  ``events.dlq`` with a reason code and a reason, every valid one in the validated streams,
  and the ingestion process (``python -m services.ingestion``) neither crashes nor stalls.
- ``training.requests``: records that are not ``RetrainRequest``s of the platform are
  dead-lettered by the training consumer (and never start a training).
- ``models.lifecycle``: garbage, truncated events, other message types, other models'
  routing, a table without a production version and a stale event, between two routing
  decisions: serving's routing follower applies exactly the two decisions and keeps
  following (it skips and logs the rest; no dead letter, since every replica reads the topic).

Bounded: a few examples of up to a few dozen records each (the CI budget), derandomized so a
failure reproduces.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
import urllib.request
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaProducer
from hypothesis import HealthCheck, given, settings
from hypothesis import settings as settings_
from hypothesis import strategies as st

from services.cli import localinfra
from services.shared.codecs import CONTENT_TYPE, PROTOBUF
from services.shared.kafka import create_consumer, ensure_topics
from services.shared.proto.mlops.v1 import events_pb2
from services.shared.settings import KafkaSettings, RedisSettings, StorageSettings
from services.shared.topics import Topics

Produced = tuple[str, bytes | None, bytes | None, list[tuple[str, bytes]]]  # kind, key, value, h


def _now() -> str:
    return datetime.now(UTC).isoformat()


def _transaction(tx_id: str) -> dict[str, Any]:
    return {
        "transaction_id": tx_id,
        "user_id": "user-fuzz",
        "merchant_id": "merchant-fuzz",
        "amount": 12.5,
        "currency": "EUR",
        "channel": "web",
        "country": "FR",
        "event_time": _now(),
    }


def _label(tx_id: str) -> dict[str, Any]:
    return {"transaction_id": tx_id, "is_fraud": False, "event_time": _now()}


def _fresh_id() -> str:
    return f"fz-{uuid.uuid4().hex[:16]}"


def _event(kind: str) -> dict[str, Any]:
    return _transaction(_fresh_id()) if kind == "tx" else _label(_fresh_id())


kinds = st.sampled_from(["tx", "label"])
odd_values = st.one_of(
    st.lists(st.integers(), max_size=3), st.dictionaries(st.text(max_size=5), st.integers())
)


@st.composite
def hostile(draw: st.DrawFn) -> Produced:
    """One record the platform must refuse, of one of the classes of the issue."""
    kind = draw(kinds)
    event = _event(kind)
    field = draw(st.sampled_from(sorted(event)))
    choice = draw(st.integers(0, 9))
    headers: list[tuple[str, bytes]] = []
    if choice == 0:  # malformed JSON: a valid event cut short, or text that is no JSON
        text = json.dumps(event)
        value = text[: draw(st.integers(1, len(text) - 1))].encode()
    elif choice == 1:  # a wrong type for a field
        event[field] = draw(odd_values)
        value = json.dumps(event).encode()
    elif choice == 2:  # NaN and infinities (not JSON, which Python would accept)
        literal = draw(st.sampled_from(["NaN", "Infinity", "-Infinity", "1e999"]))
        target = "amount" if kind == "tx" else "is_fraud"
        event[target] = "__X__"
        value = json.dumps(event).replace('"__X__"', literal).encode()
    elif choice == 3:  # huge: over the 16 KiB an event may take (the sender's cap of dead
        # letters over 512 KiB is unit-tested: tests/unit/test_shared_sender.py)
        event["padding"] = "x" * draw(st.integers(17 * 1024, 120 * 1024))
        value = json.dumps(event).encode()
    elif choice == 4:  # empty
        value = b""
    elif choice == 5:  # invalid UTF-8 inside a string
        value = json.dumps(event).encode().replace(b'"' + field.encode(), b'"\xff\xfe', 1)
    elif choice == 6:  # garbage protobuf
        headers = [(CONTENT_TYPE, PROTOBUF.encode())]
        value = draw(st.binary(min_size=1, max_size=300))
    elif choice == 7:  # truncated protobuf: a valid message cut short
        headers = [(CONTENT_TYPE, PROTOBUF.encode())]
        message = (
            events_pb2.Transaction(**event)  # type: ignore[arg-type]
            if kind == "tx"
            else events_pb2.Label(**event)  # type: ignore[arg-type]
        )
        whole = message.SerializeToString()
        value = whole[: draw(st.integers(0, len(whole) - 1))]
    elif choice == 8:  # a repeated key (which of the two did the sender mean?)
        text = json.dumps(event)
        value = (text[:-1] + f", {json.dumps(field)}: {json.dumps(event[field])}}}").encode()
    else:  # an unknown field
        name = "x_" + draw(st.text(st.characters(codec="utf-8"), min_size=1, max_size=20))
        event[name] = draw(st.integers())
        value = json.dumps(event).encode()
    key = draw(st.one_of(st.none(), st.binary(max_size=40)))
    return (kind, key, value, headers)


@st.composite
def valid(draw: st.DrawFn) -> Produced:
    kind = draw(kinds)
    event = _event(kind)
    if draw(st.booleans()):
        return (
            kind,
            event.get("user_id", event["transaction_id"]).encode(),
            json.dumps(event).encode(),
            [],
        )
    message = (
        events_pb2.Transaction(**event)  # type: ignore[arg-type]
        if kind == "tx"
        else events_pb2.Label(**event)  # type: ignore[arg-type]
    )
    return (kind, None, message.SerializeToString(), [(CONTENT_TYPE, PROTOBUF.encode())])


batches = st.lists(st.tuples(st.booleans(), hostile(), valid()), min_size=3, max_size=8)


def _ready(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=1) as r:
            return 'mlops_service_ready{service="ingestion"} 1.0' in r.read().decode()
    except OSError:
        return False


async def _read_from(kafka: KafkaSettings, topic: str, start: dict[int, int]) -> list[Any]:
    """The records of ``topic`` from ``start`` (per partition) to its end now."""
    from aiokafka import TopicPartition

    consumer = create_consumer(kafka, group_id=None, client_id="fuzz-reader")
    await consumer.start()
    try:
        tps = [TopicPartition(topic, p) for p in range(kafka.partitions)]
        ends = await consumer.end_offsets(tps)
        consumer.assign(tps)
        for tp in tps:
            consumer.seek(tp, start.get(tp.partition, 0))
        records: list[Any] = []
        deadline = time.monotonic() + 30
        while [tp for tp in tps if await consumer.position(tp) < ends[tp]]:
            for batch in (await consumer.getmany(timeout_ms=200)).values():
                records += [r for r in batch if r.offset < ends[TopicPartition(topic, r.partition)]]
            assert time.monotonic() < deadline, f"could not read {topic}"
        return records
    finally:
        await consumer.stop()


async def _produce(kafka: KafkaSettings, records: list[Produced]) -> list[tuple[str, int, int]]:
    topics = Topics.from_settings(kafka)
    producer = AIOKafkaProducer(
        bootstrap_servers=kafka.bootstrap, acks="all", max_request_size=2 * 1024 * 1024
    )
    await producer.start()
    try:
        positions = []
        for kind, key, value, headers in records:
            topic = topics.transactions if kind == "tx" else topics.labels
            meta = await producer.send_and_wait(topic, value, key=key, headers=headers)
            positions.append((topic, meta.partition, meta.offset))
        return positions
    finally:
        await producer.stop()


def test_every_hostile_record_is_dead_lettered_and_every_valid_one_goes_through(
    kafka: KafkaSettings, redis_server: RedisSettings, storage: StorageSettings, tmp_path: Path
) -> None:
    topics = Topics.from_settings(kafka)
    asyncio.run(ensure_topics(kafka))
    port = localinfra.free_port()
    spec = localinfra.ProcessSpec(
        name="ingestion",
        command=[sys.executable, "-m", "services.ingestion"],
        ready=lambda: _ready(port),
        env={
            "MLOPS_KAFKA_BOOTSTRAP": kafka.bootstrap,
            "MLOPS_KAFKA_TOPIC_PREFIX": kafka.topic_prefix,
            "MLOPS_KAFKA_BROKER_FLAVOR": kafka.broker_flavor,
            "MLOPS_KAFKA_PARTITIONS": str(kafka.partitions),
            "MLOPS_KAFKA_SESSION_TIMEOUT_MS": str(kafka.session_timeout_ms),
            "MLOPS_REDIS_HOST": redis_server.host,
            "MLOPS_REDIS_PORT": str(redis_server.port),
            "MLOPS_STORAGE_DATA_DIR": str(storage.data_dir),
            "MLOPS_INGESTION_METRICS_PORT": str(port),
            "MLOPS_INGESTION_GROUP_ID": f"{kafka.topic_prefix}ingestion",
            "MLOPS_INGESTION_ARCHIVE_GROUP_ID": f"{kafka.topic_prefix}ingestion-archive",
        },
        cwd=Path(__file__).resolve().parents[2],
        startup_timeout_s=90,
    )
    service = localinfra.RunningProcess(spec, tmp_path / "ingestion.log")
    seen = {"dlq": 0, "valid": 0}

    @settings(
        max_examples=5,
        deadline=None,
        derandomize=True,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(batches)
    def check(batch: list[tuple[bool, Produced, Produced]]) -> None:
        records: list[Produced] = []
        for hostile_first, bad, good in batch:
            records += [bad, good] if hostile_first else [good, bad]
        expected = ["dlq" if r in [b for _, b, _ in batch] else "valid" for r in records]
        starts = {
            t: {p: 0 for p in range(kafka.partitions)}
            for t in (topics.dlq, topics.validated, topics.validated_labels)
        }
        positions = asyncio.run(_produce(kafka, records))
        wanted = dict(zip(positions, expected, strict=True))
        deadline = time.monotonic() + 60
        while True:
            found: dict[tuple[str, int, int], str] = {}
            reasons: dict[tuple[str, int, int], tuple[str, str]] = {}
            for record in asyncio.run(_read_from(kafka, topics.dlq, starts[topics.dlq])):
                letter = events_pb2.DeadLetter.FromString(record.value)
                where = (letter.source.topic, letter.source.partition, letter.source.offset)
                found[where] = "dlq"
                reasons[where] = (letter.reason_code, letter.reason)
            for topic, schema in (
                (topics.validated, events_pb2.ValidatedTransaction),
                (topics.validated_labels, events_pb2.ValidatedLabel),
            ):
                for record in asyncio.run(_read_from(kafka, topic, starts[topic])):
                    source = schema.FromString(record.value).source
                    found[(source.topic, source.partition, source.offset)] = "valid"
            if all(where in found for where in wanted):
                break
            assert service.alive(), f"ingestion died:\n{service.tail()}"
            assert time.monotonic() < deadline, (
                "ingestion stalled: not accounted for "
                f"{[w for w in wanted if w not in found]}\n{service.tail()}"
            )
            time.sleep(0.3)
        for where, outcome in wanted.items():
            assert found[where] == outcome, (where, outcome, reasons.get(where))
            if outcome == "dlq":
                code, reason = reasons[where]
                assert code and reason, where
                seen["dlq"] += 1
            else:
                seen["valid"] += 1

    try:
        check()
        assert service.alive(), service.tail()
    finally:
        service.stop()
    assert seen["dlq"] >= 10 and seen["valid"] >= 10  # the property ran on real batches


class RecordingPipeline:
    """Stands in for the training pipeline (torch, MLflow): records what it was asked to run."""

    def __init__(self) -> None:
        self.ran: list[str] = []

    def run(self, request: Any, progress: Any) -> Any:
        from services.training.pipeline import TrainingOutcome

        self.ran.append(request.request_id)
        return TrainingOutcome(request.request_id, "run", "sha", {}, None)


not_requests = st.one_of(
    st.binary(max_size=200).map(lambda b: (b, [])),  # garbage (or an empty request)
    st.binary(min_size=1, max_size=200).map(  # garbage claiming to be a request
        lambda b: (b, [("message-type", b"mlops.v1.RetrainRequest")])
    ),
    st.builds(  # a well-formed message of another type
        lambda tx: (tx.SerializeToString(), [("message-type", b"mlops.v1.Transaction")]),
        st.builds(lambda i: events_pb2.Transaction(transaction_id=f"t{i}"), st.integers(0, 99)),
    ),
)


def test_records_on_training_requests_that_are_no_requests_are_dead_lettered(
    kafka: KafkaSettings, tmp_path: Path
) -> None:
    from services.shared.proto.mlops.v1 import monitoring_pb2
    from services.training.consumer import TrainingRequestConsumer
    from services.training.settings import TrainingSettings

    model_name = TrainingSettings().registry.model_name
    ours = monitoring_pb2.RetrainRequest(request_id="req-ours", model_name=model_name)

    @settings_(max_examples=3, deadline=None, derandomize=True)
    @given(st.lists(not_requests, min_size=2, max_size=6))
    def check(hostile_records: list[tuple[bytes, list[tuple[str, bytes]]]]) -> None:
        pipeline = RecordingPipeline()
        # topics and group of this example's own: each example starts from empty topics
        own = kafka.model_copy(update={"topic_prefix": f"t{uuid.uuid4().hex[:10]}."})
        topics = Topics.from_settings(own)
        settings = TrainingSettings(kafka=own, consumer_group=f"{own.topic_prefix}training")

        async def scenario() -> None:
            await ensure_topics(own)
            consumer = TrainingRequestConsumer(settings, pipeline)  # type: ignore[arg-type]
            consumer.retry_backoff_s = 0.1
            stop = asyncio.Event()
            running = asyncio.create_task(consumer.run(stop))
            producer = AIOKafkaProducer(bootstrap_servers=own.bootstrap, acks="all")
            await producer.start()
            try:
                positions = set()
                for value, headers in hostile_records:
                    meta = await producer.send_and_wait(
                        topics.training_requests, value, headers=headers
                    )
                    positions.add((meta.partition, meta.offset))
                await producer.send_and_wait(
                    topics.training_requests,
                    ours.SerializeToString(),
                    headers=[("message-type", b"mlops.v1.RetrainRequest")],
                )
            finally:
                await producer.stop()
            deadline = time.monotonic() + 60
            while True:
                letters = [
                    events_pb2.DeadLetter.FromString(r.value)
                    for r in await _read_from(own, topics.dlq, {})
                ]
                mine = {
                    (d.source.partition, d.source.offset): d
                    for d in letters
                    if d.source.topic == topics.training_requests
                }
                if positions <= set(mine) and pipeline.ran:
                    break
                assert not running.done(), running
                assert time.monotonic() < deadline, (positions, set(mine), pipeline.ran)
                await asyncio.sleep(0.2)
            stop.set()
            await asyncio.wait_for(running, 30)
            for where in positions:
                assert mine[where].reason_code == "not_a_retrain_request", mine[where]
                assert mine[where].reason
            assert "req-ours" in pipeline.ran  # the valid request behind them still ran

        asyncio.run(scenario())

    check()


class FailingPipeline(RecordingPipeline):
    """Fails a request named ``fails`` as a drift training with too few labels does."""

    def run(self, request: Any, progress: Any) -> Any:
        from services.shared.errors import FailedPrecondition

        if request.request_id == "fails":
            self.ran.append(request.request_id)
            raise FailedPrecondition("2 labelled transactions (0 frauds) since the drift onset")
        return super().run(request, progress)


def test_each_request_ends_with_a_result_that_mlops_train_wait_reports(
    kafka: KafkaSettings,
) -> None:
    # the autopilot acts on a failed training at once (it waited 30 minutes for a candidate);
    # `mlops train --wait` prints the result
    from services.cli.train import request_and_wait
    from services.shared.proto.mlops.v1 import monitoring_pb2
    from services.training.consumer import TrainingRequestConsumer
    from services.training.settings import TrainingSettings

    own = kafka.model_copy(update={"topic_prefix": f"t{uuid.uuid4().hex[:10]}."})
    topics = Topics.from_settings(own)
    settings = TrainingSettings(kafka=own, consumer_group=f"{own.topic_prefix}training")
    model_name = settings.registry.model_name
    pipeline = FailingPipeline()

    async def scenario() -> tuple[list[Any], list[Any]]:
        await ensure_topics(own)
        consumer = TrainingRequestConsumer(settings, pipeline)  # type: ignore[arg-type]
        stop = asyncio.Event()
        running = asyncio.create_task(consumer.run(stop))
        try:
            waited = [
                await request_and_wait(
                    settings,
                    monitoring_pb2.RetrainRequest(request_id=request_id, model_name=model_name),
                    timeout_s=60,
                )
                for request_id in ("fails", "works")
            ]
            assert not running.done(), running
        finally:
            stop.set()
            await asyncio.wait_for(running, 30)
        return waited, await _read_from(own, topics.training_results, {})

    (failed, worked), records = asyncio.run(scenario())
    assert pipeline.ran == ["fails", "works"]
    assert failed is not None and worked is not None
    assert failed.status == monitoring_pb2.TRAINING_STATUS_FAILED
    assert failed.error_code == "failed_precondition" and "drift onset" in failed.error
    assert failed.finished_at.seconds > 0 and failed.model_name == model_name
    assert worked.status == monitoring_pb2.TRAINING_STATUS_TRAINED and worked.run_id == "run"
    # one result per request, keyed by the model's name
    assert len(records) == 2 and all(r.key == model_name.encode() for r in records)


def test_records_on_other_partitions_during_a_training_run_are_handled_after_it(
    kafka: KafkaSettings, monkeypatch: Any
) -> None:
    """The consumer polls while a run holds it (to stay in its group); what that poll fetches
    from the other partitions must wait for the run, not be thrown away (CI run of
    2026-12-05: a dead letter never written; 6 of 8 tries under load before the fix)."""
    import threading

    import services.training.consumer as training_consumer
    from services.shared.proto.mlops.v1 import monitoring_pb2
    from services.training.settings import TrainingSettings

    polls = [0]
    original = training_consumer.create_consumer

    def counting_consumer(*args: Any, **kwargs: Any) -> Any:
        consumer = original(*args, **kwargs)
        getmany = consumer.getmany

        async def counted(*a: Any, **k: Any) -> Any:
            polls[0] += 1
            return await getmany(*a, **k)

        consumer.getmany = counted
        return consumer

    monkeypatch.setattr(training_consumer, "create_consumer", counting_consumer)
    release = threading.Event()

    started = threading.Event()

    class HeldPipeline(RecordingPipeline):
        def run(self, request: Any, progress: Any) -> Any:
            started.set()
            assert release.wait(60), "the test never released the run"
            return super().run(request, progress)

    topics = Topics.from_settings(kafka)
    settings = TrainingSettings(kafka=kafka, consumer_group=f"{kafka.topic_prefix}training")
    pipeline = HeldPipeline()

    async def scenario() -> None:
        await ensure_topics(kafka)
        consumer = training_consumer.TrainingRequestConsumer(settings, pipeline)  # type: ignore[arg-type]
        stop = asyncio.Event()
        running = asyncio.create_task(consumer.run(stop))
        producer = AIOKafkaProducer(bootstrap_servers=kafka.bootstrap, acks="all")
        await producer.start()
        try:
            ours = monitoring_pb2.RetrainRequest(
                request_id="req-held", model_name=settings.registry.model_name
            )
            await producer.send_and_wait(
                topics.training_requests,
                ours.SerializeToString(),
                headers=[("message-type", b"mlops.v1.RetrainRequest")],
                partition=0,
            )
            deadline = time.monotonic() + 60
            while not started.is_set():
                assert time.monotonic() < deadline and not running.done()
                await asyncio.sleep(0.1)
            hostile = await producer.send_and_wait(
                topics.training_requests, b"not a request", partition=1
            )
            polled = polls[0]
            while polls[0] < polled + 3:  # polls during the run that could have fetched it
                assert time.monotonic() < deadline and not running.done()
                await asyncio.sleep(0.1)
        finally:
            await producer.stop()
            release.set()
        where = (hostile.partition, hostile.offset)
        while True:
            letters = [
                events_pb2.DeadLetter.FromString(r.value)
                for r in await _read_from(kafka, topics.dlq, {})
            ]
            if where in {(d.source.partition, d.source.offset) for d in letters}:
                break
            assert time.monotonic() < deadline and not running.done(), (where, letters)
            await asyncio.sleep(0.2)
        stop.set()
        await asyncio.wait_for(running, 30)
        assert pipeline.ran == ["req-held"]

    asyncio.run(scenario())


LIFECYCLE_MODEL = "fraud_hostile"


def _routing_event(version: int, seconds: int, model: str = LIFECYCLE_MODEL) -> bytes:
    from google.protobuf.timestamp_pb2 import Timestamp

    from services.shared.proto.mlops.v1 import models_pb2

    return models_pb2.ModelEvent(
        event_id=f"e-{model}-{seconds}",
        type=models_pb2.MODEL_EVENT_TYPE_PROMOTED,
        model_name=model,
        occurred_at=Timestamp(seconds=seconds),
        served=[models_pb2.ServedVersion(version=version, alias="production", traffic_percent=100)],
    ).SerializeToString()


def _canary_only_event(seconds: int) -> bytes:
    from google.protobuf.timestamp_pb2 import Timestamp

    from services.shared.proto.mlops.v1 import models_pb2

    return models_pb2.ModelEvent(
        event_id=f"e-broken-{seconds}",
        type=models_pb2.MODEL_EVENT_TYPE_PROMOTED,
        model_name=LIFECYCLE_MODEL,
        occurred_at=Timestamp(seconds=seconds),
        served=[models_pb2.ServedVersion(version=9, alias="canary", traffic_percent=10)],
    ).SerializeToString()


not_our_lifecycle_events = st.one_of(
    st.binary(max_size=300),  # garbage, or empty
    st.binary(min_size=1, max_size=60).map(  # a valid event cut short
        lambda b: _routing_event(7, 1_800_000_100)[: max(1, len(b) % 40)]
    ),
    st.integers(0, 99).map(  # a well-formed message of another type
        lambda i: events_pb2.Transaction(transaction_id=f"t{i}").SerializeToString()
    ),
    st.integers(1, 50).map(  # another model's routing
        lambda v: _routing_event(v, 1_800_000_200, model="someone_elses_model")
    ),
    st.just(_canary_only_event(1_800_000_300)),  # ours, but no production version
    st.just(_routing_event(8, 1_700_000_000)),  # ours, but older than what was applied
)


def test_lifecycle_records_that_are_not_ours_leave_serving_routing_alone(
    kafka: KafkaSettings,
) -> None:
    """Serving's routing follower, reading models.lifecycle from the real broker, skips every
    record that is not a routing decision for its model (without dead-lettering: every serving
    replica reads the topic, each would write the letter) and keeps following."""
    from services.serving.routing import CanaryRouter
    from services.serving.routing_source import RoutingFollower
    from services.shared.settings import RegistryClientSettings

    @settings_(max_examples=3, deadline=None, derandomize=True)
    @given(st.lists(not_our_lifecycle_events, min_size=2, max_size=8))
    def check(hostile_records: list[bytes]) -> None:
        own = kafka.model_copy(update={"topic_prefix": f"t{uuid.uuid4().hex[:10]}."})
        topics = Topics.from_settings(own)

        async def scenario() -> None:
            await ensure_topics(own)
            router = CanaryRouter()
            follower = RoutingFollower(
                router,
                # no registry: the topic is the only source
                registry=RegistryClientSettings(address="127.0.0.1:1", model_name=LIFECYCLE_MODEL),
                kafka=own,
                lifecycle_topic=topics.lifecycle,
                retry_interval_s=0.2,
            )
            stop = asyncio.Event()
            running = asyncio.create_task(follower.run(stop))
            await asyncio.wait_for(follower.following.wait(), 60)
            producer = AIOKafkaProducer(bootstrap_servers=own.bootstrap, acks="all")
            await producer.start()
            key = LIFECYCLE_MODEL.encode()  # one partition: the order is the order sent

            async def production_is(version: int) -> None:
                deadline = time.monotonic() + 60
                while router.table is None or router.table.production.version != version:
                    assert not running.done(), running
                    assert time.monotonic() < deadline, router.table
                    await asyncio.sleep(0.05)

            try:
                await producer.send_and_wait(
                    topics.lifecycle, _routing_event(1, 1_800_000_000), key=key
                )
                await production_is(1)
                for value in hostile_records:
                    await producer.send_and_wait(topics.lifecycle, value, key=key)
                # a decision behind them is still applied, and none of them was
                await producer.send_and_wait(
                    topics.lifecycle, _routing_event(2, 1_800_000_400), key=key
                )
                await production_is(2)
            finally:
                await producer.stop()
            assert router.table is not None and router.table.canary is None
            assert follower._events_applied == 2  # exactly the two decisions
            stop.set()
            await asyncio.wait_for(running, 30)

        asyncio.run(scenario())

    check()
