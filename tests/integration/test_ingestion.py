"""The ingestion service against a real Tansu broker and a real Redis.

- a known stream with every class of invalid record: the DLQ holds exactly those, with their
  reasons and original bytes/headers; the validated streams hold the valid events once;
  the archive holds them once;
- Redis going away mid-stream: nothing is skipped, everything arrives once it is back;
- kill -9 of the service process (twice, mid-stream): no event lost, no id archived twice, and
  the only repeats on the validated stream are re-deliveries of the very same source record.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import sys
import time
import urllib.request
import uuid
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
from aiokafka import AIOKafkaProducer, TopicPartition
from aiokafka.structs import ConsumerRecord
from prometheus_client import REGISTRY
from service_env import settings_environment

from services.cli import localinfra
from services.cli.simulate import publish, record_value
from services.cli.simulator import SimulationConfig, TrafficSimulator
from services.ingestion.archive import OfflineArchive
from services.ingestion.claims import RedisClaims, connect
from services.ingestion.main import serve
from services.ingestion.settings import IngestionSettings
from services.shared.codecs import CONTENT_TYPE, PROTOBUF
from services.shared.datasets import LABELS, TRANSACTIONS
from services.shared.kafka import create_consumer, ensure_topics
from services.shared.proto.mlops.v1 import events_pb2
from services.shared.settings import KafkaSettings, RedisSettings, StorageSettings
from services.shared.topics import Topics

Record = ConsumerRecord[bytes, bytes]


# ----------------------------------------------------------------------------- helpers


def _settings(
    kafka: KafkaSettings, redis: RedisSettings, storage: StorageSettings, **extra: Any
) -> IngestionSettings:
    return IngestionSettings(
        kafka=kafka,
        redis=redis,
        storage=storage,
        metrics_port=0,
        group_id=f"{kafka.topic_prefix}ingestion",
        archive_group_id=f"{kafka.topic_prefix}ingestion-archive",
        archive_max_age_s=1.0,
        retry_initial_s=0.1,
        retry_max_s=0.5,
        **extra,
    )


@contextlib.asynccontextmanager
async def _running(settings: IngestionSettings) -> AsyncIterator[asyncio.Task[None]]:
    """The service in this process (its loops are the same as under ``python -m``)."""
    stop = asyncio.Event()
    task = asyncio.create_task(serve(settings, stop))
    try:
        yield task
    finally:
        stop.set()
        await asyncio.wait_for(task, timeout=60)


async def _end_offsets(kafka: KafkaSettings, topics: list[str]) -> dict[TopicPartition, int]:
    consumer = create_consumer(kafka, group_id=None, client_id="test-offsets")
    await consumer.start()
    try:
        tps = [TopicPartition(t, p) for t in topics for p in range(kafka.partitions)]
        return await consumer.end_offsets(tps)
    finally:
        await consumer.stop()


async def _wait_processed(
    kafka: KafkaSettings, group: str, topics: list[str], timeout_s: float = 90
) -> None:
    """Until ``group`` has committed the end of every partition of ``topics``: everything
    read was produced and acknowledged."""
    deadline = time.monotonic() + timeout_s
    ends = await _end_offsets(kafka, topics)
    consumer = create_consumer(kafka, group_id=group, client_id="test-committed")
    await consumer.start()
    try:
        while True:
            committed = {tp: await consumer.committed(tp) or 0 for tp in ends}
            if all(committed[tp] >= end for tp, end in ends.items()):
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"{group} committed {committed}, ends {ends}")
            await asyncio.sleep(0.1)
    finally:
        await consumer.stop()


async def _read_all(kafka: KafkaSettings, topic: str) -> list[Record]:
    """Every record of ``topic``, up to its end offsets now."""
    ends = await _end_offsets(kafka, [topic])
    consumer = create_consumer(kafka, group_id=None, client_id="test-reader")
    await consumer.start()
    records: list[Record] = []
    try:
        consumer.assign(list(ends))
        await consumer.seek_to_beginning(*ends)
        deadline = time.monotonic() + 30
        while True:
            behind = [tp for tp, end in ends.items() if await consumer.position(tp) < end]
            if not behind:
                break
            for batch in (await consumer.getmany(*behind, timeout_ms=200)).values():
                records.extend(
                    r for r in batch if r.offset < ends[TopicPartition(r.topic, r.partition)]
                )
            assert time.monotonic() < deadline, f"could not read {topic} to its end"
    finally:
        await consumer.stop()
    return records


async def _count(kafka: KafkaSettings, topics: list[str]) -> int:
    return sum((await _end_offsets(kafka, topics)).values())


async def _poll(
    condition: Callable[[], Any], what: str, timeout_s: float = 60, interval_s: float = 0.1
) -> Any:
    """Until ``condition()`` (sync or async) holds."""
    deadline = time.monotonic() + timeout_s
    while True:
        result = condition()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return result
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        await asyncio.sleep(interval_s)


def _archived(storage: StorageSettings, dataset: str) -> list[str]:
    """transaction_id of every archived row of ``dataset``."""
    return [
        tx_id
        for path, *_ in OfflineArchive(storage.offline_dir).files(dataset)
        for tx_id in pq.read_table(path, partitioning=None).column("transaction_id").to_pylist()
    ]


def _metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


# ----------------------------------------------------------------- the known stream

NOW = datetime.now(UTC)
RECENT = (NOW - timedelta(minutes=3)).isoformat()
TX: dict[str, Any] = {
    "user_id": "user-1",
    "merchant_id": "merchant-1",
    "amount": 25.0,
    "currency": "EUR",
    "channel": "web",
    "country": "DE",
    "event_time": RECENT,
}
TRACE = ("trace-id", b"trace-0123")


def _json(**fields: Any) -> bytes:
    return json.dumps(fields).encode()


def _tx(tx_id: str, **changes: Any) -> bytes:
    return _json(transaction_id=tx_id, **{**TX, **changes})


# (topic kind, key, value, headers, expected): expected is ("valid", id), ("duplicate", id) or
# ("dlq", reason_code, field)
STREAM: list[tuple[str, bytes | None, bytes | None, list[tuple[str, bytes]], tuple[str, ...]]] = [
    ("tx", b"user-1", _tx("tx-v1"), [TRACE], ("valid", "tx-v1")),
    ("tx", b"user-2", _tx("tx-v2", user_id="user-2", amount=999_999.99), [], ("valid", "tx-v2")),
    ("tx", b"user-3", _tx("tx-v3", user_id="user-3", channel="pos"), [], ("valid", "tx-v3")),
    (
        "tx",
        b"user-4",
        events_pb2.Transaction(
            transaction_id="tx-pb1", **{**TX, "user_id": "user-4"}
        ).SerializeToString(),
        [(CONTENT_TYPE, PROTOBUF.encode())],
        ("valid", "tx-pb1"),
    ),
    ("tx", b"user-1", _tx("tx-v1"), [TRACE], ("duplicate", "tx-v1")),  # re-sent as is
    ("tx", b"user-2", _tx("tx-v2", user_id="user-2", amount=5.0), [], ("duplicate", "tx-v2")),
    (
        "label",
        b"tx-v1",
        _json(transaction_id="tx-v1", is_fraud=True, event_time=RECENT),
        [],
        ("valid", "tx-v1"),
    ),
    (
        "label",
        b"tx-v2",
        _json(transaction_id="tx-v2", is_fraud=False, event_time=RECENT),
        [],
        ("valid", "tx-v2"),
    ),
    (
        "label",
        b"tx-v1",
        _json(transaction_id="tx-v1", is_fraud=True, event_time=RECENT),
        [],
        ("duplicate", "tx-v1"),
    ),
    # -- invalid: one per class
    (
        "tx",
        b"user-9",
        b'{"transaction_id": "tx-x1", "amount": 3',
        [TRACE],
        ("dlq", "malformed_json", ""),
    ),
    ("tx", b"user-9", b'["tx-x2", 3]', [], ("dlq", "not_an_object", "")),
    (
        "tx",
        b"user-9",
        _json(transaction_id="tx-x3", **{k: v for k, v in TX.items() if k != "merchant_id"}),
        [],
        ("dlq", "missing_field", "merchant_id"),
    ),
    ("tx", b"user-9", _tx("tx-x4", amount="25.00"), [], ("dlq", "invalid_type", "amount")),
    ("tx", b"user-9", _tx("tx-x5", user_id=42), [], ("dlq", "invalid_type", "user_id")),
    ("tx", b"user-9", _tx("tx-x6", amount=-25.0), [], ("dlq", "out_of_range", "amount")),
    ("tx", b"user-9", _tx("tx-x7", amount=1_000_000.01), [], ("dlq", "out_of_range", "amount")),
    (
        "tx",
        b"user-9",
        _tx("tx-x8").replace(b'"amount": 25.0', b'"amount": NaN'),
        [],
        ("dlq", "malformed_json", ""),
    ),
    (
        "tx",
        b"user-9",
        _tx("tx-x9").replace(b'"amount": 25.0', b'"amount": Infinity'),
        [],
        ("dlq", "malformed_json", ""),
    ),
    (
        "tx",
        b"user-9",
        _tx("tx-x10").replace(b'"amount": 25.0', b'"amount": 1e999'),
        [],
        ("dlq", "invalid_value", "amount"),
    ),
    ("tx", b"user-9", _tx("tx-x11", currency="usd"), [], ("dlq", "invalid_value", "currency")),
    ("tx", b"user-9", _tx("tx-x12", country="ZZ"), [], ("dlq", "invalid_value", "country")),
    ("tx", b"user-9", _tx("tx-x13", channel="atm"), [], ("dlq", "invalid_value", "channel")),
    (
        "tx",
        b"user-9",
        _tx("tx-x14", event_time=(NOW + timedelta(hours=1)).isoformat()),
        [],
        ("dlq", "event_in_future", "event_time"),
    ),
    (
        "tx",
        b"user-9",
        _tx("tx-x15", event_time="2025-13-01T00:00:00Z"),
        [],
        ("dlq", "invalid_time", "event_time"),
    ),
    (
        "tx",
        b"user-9",
        _tx("tx-x16", event_time="12/03/2025 10:00"),
        [],
        ("dlq", "invalid_time", "event_time"),
    ),
    ("tx", b"user-9", _tx("t" * 65), [], ("dlq", "too_long", "transaction_id")),
    ("tx", b"user-9", _tx("tx-x17", cvv="123"), [], ("dlq", "unknown_field", "cvv")),
    (
        "tx",
        b"user-9",
        b"\x08\x96\x01 not protobuf \xff",
        [(CONTENT_TYPE, PROTOBUF.encode())],
        ("dlq", "malformed_protobuf", ""),
    ),
    ("tx", b"user-9", b'{"transaction_id": "tx-x18\xff\xfe"}', [], ("dlq", "malformed_json", "")),
    ("tx", b"user-9", None, [TRACE], ("dlq", "empty_record", "")),
    ("tx", None, _tx("tx-x19", merchant_id="m" * 30_000), [], ("dlq", "record_too_large", "")),
    (
        "tx",
        b"user-9",
        _tx("tx-x20"),
        [(CONTENT_TYPE, b"text/csv")],
        ("dlq", "unsupported_content_type", ""),
    ),
    (
        "tx",
        b"user-9",
        b'{"transaction_id": "tx-x21", "transaction_id": "tx-x22"}',
        [],
        ("dlq", "duplicate_field", "transaction_id"),
    ),
    (
        "label",
        b"tx-v3",
        _json(transaction_id="tx-v3", is_fraud="yes", event_time=RECENT),
        [],
        ("dlq", "invalid_type", "is_fraud"),
    ),
    (
        "label",
        b"tx-v3",
        _json(transaction_id="tx-v3", is_fraud=False),
        [],
        ("dlq", "missing_field", "event_time"),
    ),
]


async def test_a_known_stream_is_validated_deadlettered_deduplicated_and_archived(
    kafka: KafkaSettings, redis_server: RedisSettings, storage: StorageSettings
) -> None:
    topics = Topics.from_settings(kafka)
    await ensure_topics(kafka)
    rejected_before = _metric("mlops_ingestion_events_rejected_total", reason_code="invalid_value")
    duplicates_before = _metric("mlops_ingestion_duplicates_total", kind="transaction")

    producer = AIOKafkaProducer(bootstrap_servers=kafka.bootstrap, acks="all")
    await producer.start()
    positions: list[tuple[str, int, int]] = []
    try:
        for kind, key, value, headers, _ in STREAM:
            topic = topics.transactions if kind == "tx" else topics.labels
            meta = await producer.send_and_wait(topic, value, key=key, headers=headers)
            positions.append((topic, meta.partition, meta.offset))
    finally:
        await producer.stop()

    settings = _settings(kafka, redis_server, storage)
    async with _running(settings):
        await _wait_processed(kafka, settings.group_id, [topics.transactions, topics.labels])
        validated = await _read_all(kafka, topics.validated)
        labels = await _read_all(kafka, topics.validated_labels)
        dlq = await _read_all(kafka, topics.dlq)
        await _poll(
            lambda: len(_archived(storage, TRANSACTIONS)) >= 4
            and len(_archived(storage, LABELS)) >= 2,
            "valid events archived",
        )

    # validated transactions: each valid id once, from its first record, keyed by user
    forwarded = [events_pb2.ValidatedTransaction.FromString(r.value) for r in validated]
    assert sorted(m.transaction_id for m in forwarded) == ["tx-pb1", "tx-v1", "tx-v2", "tx-v3"]
    by_id = {m.transaction_id: m for m in forwarded}
    assert by_id["tx-v2"].amount == 999_999.99  # not the re-sent record's amount
    assert {r.key for r in validated} == {b"user-1", b"user-2", b"user-3", b"user-4"}
    for record, message in zip(validated, forwarded, strict=True):
        assert record.key == message.user_id.encode()
        assert dict(record.headers)[CONTENT_TYPE] == PROTOBUF.encode()
    first = {
        STREAM[i][4][1]: positions[i]
        for i in range(len(STREAM))
        if STREAM[i][4][0] == "valid" and STREAM[i][0] == "tx"
    }
    for tx_id, (topic, partition, offset) in first.items():
        source = by_id[tx_id].source
        assert (source.topic, source.partition, source.offset) == (topic, partition, offset)
        assert by_id[tx_id].ingested_at.seconds > 0

    # validated labels: once each, keyed by transaction
    forwarded_labels = [events_pb2.ValidatedLabel.FromString(r.value) for r in labels]
    assert sorted((m.transaction_id, m.is_fraud) for m in forwarded_labels) == [
        ("tx-v1", True),
        ("tx-v2", False),
    ]
    assert sorted(r.key for r in labels) == [b"tx-v1", b"tx-v2"]

    # DLQ: exactly the invalid records, untouched, with their reasons
    expected = {positions[i]: STREAM[i] for i in range(len(STREAM)) if STREAM[i][4][0] == "dlq"}
    letters = {}
    for record in dlq:
        letter = events_pb2.DeadLetter.FromString(record.value)
        position = (letter.source.topic, letter.source.partition, letter.source.offset)
        assert position not in letters, f"dead-lettered twice: {position}"
        letters[position] = (record, letter)
    assert set(letters) == set(expected)
    for position, (_, key, value, headers, (_, code, field)) in expected.items():
        record, letter = letters[position]
        assert (letter.reason_code, letter.field) == (code, field), letter.reason
        assert letter.reason
        assert letter.original_value == (value or b"")
        assert letter.original_key == (key or b"")
        assert [(h.key, h.value) for h in letter.original_headers] == headers
        assert record.key == key
        assert letter.source_timestamp.seconds > 0 and letter.rejected_at.seconds > 0
        assert dict(record.headers)["reason-code"] == code.encode()

    # archive: the valid events, once
    assert sorted(_archived(storage, TRANSACTIONS)) == ["tx-pb1", "tx-v1", "tx-v2", "tx-v3"]
    assert sorted(_archived(storage, LABELS)) == ["tx-v1", "tx-v2"]

    # metrics counted what happened
    invalid_values = sum(1 for s in STREAM if s[4][:2] == ("dlq", "invalid_value"))
    assert (
        _metric("mlops_ingestion_events_rejected_total", reason_code="invalid_value")
        - rejected_before
        == invalid_values
    )
    assert _metric("mlops_ingestion_duplicates_total", kind="transaction") - duplicates_before == 2


# ------------------------------------------------------------------------ Redis outage


async def test_nothing_is_skipped_while_redis_is_down(
    kafka: KafkaSettings, storage: StorageSettings, tmp_path: Path
) -> None:
    topics = Topics.from_settings(kafka)
    await ensure_topics(kafka)
    port = localinfra.free_port()
    redis = localinfra.RunningProcess(localinfra.redis(port, None), tmp_path / "redis.log")
    settings = _settings(kafka, RedisSettings(port=port), storage)
    producer = AIOKafkaProducer(bootstrap_servers=kafka.bootstrap, acks="all")
    await producer.start()
    try:
        async with _running(settings):
            for n in range(20):
                await producer.send_and_wait(topics.transactions, _tx(f"tx-a{n}"), key=b"user-1")
            await _wait_processed(kafka, settings.group_id, [topics.transactions])
            redis.stop()
            retries_before = _metric("mlops_ingestion_retries_total", operation="dedup")
            for n in range(30):
                await producer.send_and_wait(topics.transactions, _tx(f"tx-b{n}"), key=b"user-1")
            await _poll(
                lambda: _metric("mlops_ingestion_retries_total", operation="dedup")
                > retries_before,
                "the validator retrying Redis",
            )
            # while Redis is down nothing new goes out, and nothing is committed past it
            assert await _count(kafka, [topics.validated]) == 20
            redis = localinfra.RunningProcess(localinfra.redis(port, None), tmp_path / "redis2.log")
            await _wait_processed(kafka, settings.group_id, [topics.transactions])
            ids = [
                events_pb2.ValidatedTransaction.FromString(r.value).transaction_id
                for r in await _read_all(kafka, topics.validated)
            ]
            assert sorted(ids) == sorted(
                [f"tx-a{n}" for n in range(20)] + [f"tx-b{n}" for n in range(30)]
            )
            await _poll(lambda: len(_archived(storage, TRANSACTIONS)) >= 50, "archive caught up")
        assert sorted(_archived(storage, TRANSACTIONS)) == sorted(ids)
    finally:
        await producer.stop()
        redis.stop()


# --------------------------------------------------------------------------- kill -9


def _ready(metrics_port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=1) as r:
            return 'mlops_service_ready{service="ingestion"} 1.0' in r.read().decode()
    except OSError:
        return False


def _service_process(
    kafka: KafkaSettings, redis: RedisSettings, storage: StorageSettings, log: Path
) -> localinfra.RunningProcess:
    port = localinfra.free_port()
    env = {
        **settings_environment(kafka, redis, storage),
        "MLOPS_INGESTION_METRICS_PORT": str(port),
        "MLOPS_INGESTION_GROUP_ID": f"{kafka.topic_prefix}ingestion",
        "MLOPS_INGESTION_ARCHIVE_GROUP_ID": f"{kafka.topic_prefix}ingestion-archive",
        "MLOPS_INGESTION_BATCH_MAX_RECORDS": "100",
        "MLOPS_INGESTION_ARCHIVE_MAX_ROWS": "250",
        "MLOPS_INGESTION_ARCHIVE_MAX_AGE_S": "1",
    }
    spec = localinfra.ProcessSpec(
        name="ingestion",
        command=[sys.executable, "-m", "services.ingestion"],
        ready=lambda: _ready(port),
        env=env,
        cwd=Path(__file__).resolve().parents[2],
        startup_timeout_s=60,
    )
    return localinfra.RunningProcess(spec, log)


async def test_kill_9_mid_stream_loses_nothing_and_archives_each_event_once(
    kafka: KafkaSettings, redis_server: RedisSettings, storage: StorageSettings, tmp_path: Path
) -> None:
    topics = Topics.from_settings(kafka)
    await ensure_topics(kafka)
    config = SimulationConfig(
        seed=17,
        users=200,
        merchants=40,
        transactions_per_user_per_day=12,
        label_delay_s=600,
        invalid_fraction=0.02,
        duplicate_fraction=0.03,
    )
    end = datetime.now(UTC) - timedelta(minutes=1)
    events = list(TrafficSimulator(config).history(end - timedelta(days=1), end))
    phases = [
        events[: len(events) // 3],
        events[len(events) // 3 : 2 * len(events) // 3],
        events[2 * len(events) // 3 :],
    ]
    valid_ids = {
        e.value["transaction_id"] for e in events if e.kind == "transaction" and e.expect == "valid"
    }
    label_ids = {e.key for e in events if e.kind == "label"}
    invalid = Counter((e.key.encode(), record_value(e)) for e in events if e.expect == "invalid")
    assert len(valid_ids) > 2000 and invalid and any(e.expect == "duplicate" for e in events)
    sources = [topics.transactions, topics.labels]
    outputs = [topics.validated, topics.validated_labels, topics.dlq]

    # kill -9 twice: once while the validator is half-way through the first third, once while
    # the archive is half-way through the first two thirds
    valid_in = [
        sum(e.kind == "transaction" and e.expect == "valid" for e in phase) for phase in phases
    ]
    triggers: list[Callable[[], Any]] = [
        lambda: _over(kafka, outputs, len(phases[0]) // 2),
        lambda: len(_archived(storage, TRANSACTIONS)) >= (valid_in[0] + valid_in[1]) // 2,
    ]
    at_kill: list[dict[str, int]] = []
    service = _service_process(kafka, redis_server, storage, tmp_path / "ingestion-1.log")
    try:
        for n, phase in enumerate(phases):
            await publish(phase, kafka, rate=4000)
            if n == len(triggers):
                break
            await _poll(triggers[n], f"progress before kill {n + 1}", timeout_s=90, interval_s=0.02)
            service.kill()
            service.stop()  # closes its log
            at_kill.append(
                {
                    "published": sum(len(p) for p in phases[: n + 1]),
                    "outputs": await _count(kafka, outputs),
                    "archived": len(_archived(storage, TRANSACTIONS)),
                    "validated": await _count(kafka, [topics.validated]),
                }
            )
            service = _service_process(
                kafka, redis_server, storage, tmp_path / f"ingestion-{n + 2}.log"
            )
        await _wait_processed(kafka, f"{kafka.topic_prefix}ingestion", sources, timeout_s=120)
        await _poll(
            lambda: set(_archived(storage, TRANSACTIONS)) >= valid_ids
            and set(_archived(storage, LABELS)) >= label_ids,
            "archive complete",
            timeout_s=60,
        )
    finally:
        service.stop()
    # the kills did interrupt work in progress
    assert at_kill[0]["outputs"] < at_kill[0]["published"], at_kill
    assert 0 < at_kill[1]["archived"] < at_kill[1]["validated"], at_kill

    # validated streams: every id; a repeat only as a re-delivery of the same source record
    for topic, ids, parse in (
        (topics.validated, valid_ids, events_pb2.ValidatedTransaction.FromString),
        (topics.validated_labels, label_ids, events_pb2.ValidatedLabel.FromString),
    ):
        seen: dict[str, set[tuple[str, int, int]]] = defaultdict(set)
        for record in await _read_all(kafka, topic):
            message = parse(record.value)
            seen[message.transaction_id].add(
                (message.source.topic, message.source.partition, message.source.offset)
            )
        assert set(seen) == ids, (
            f"{topic}: missing {len(ids - set(seen))}, extra {len(set(seen) - ids)}"
        )
        assert all(len(s) == 1 for s in seen.values()), (
            "a duplicate from another record got through"
        )

    # DLQ: exactly the invalid records (repeats only as re-deliveries of the same position)
    letters: dict[tuple[str, int, int], tuple[bytes, bytes]] = {}
    for record in await _read_all(kafka, topics.dlq):
        letter = events_pb2.DeadLetter.FromString(record.value)
        position = (letter.source.topic, letter.source.partition, letter.source.offset)
        letters[position] = (letter.original_key, letter.original_value)
    assert Counter(letters.values()) == invalid

    # archive: each event exactly once, nothing half-written left
    archived = _archived(storage, TRANSACTIONS)
    assert len(archived) == len(set(archived)) == len(valid_ids)
    archived_labels = _archived(storage, LABELS)
    assert len(archived_labels) == len(set(archived_labels)) == len(label_ids)
    assert not list(storage.offline_dir.rglob(".*.tmp"))


async def _over(kafka: KafkaSettings, topics: list[str], threshold: int) -> bool:
    return await _count(kafka, topics) >= threshold


# ------------------------------------------------------------------- the claim store


async def test_redis_claims_remember_the_first_position_with_a_ttl(
    redis_server: RedisSettings,
) -> None:
    client = connect(redis_server)
    ns = f"test-{uuid.uuid4().hex[:8]}"
    claims = RedisClaims(client, ttl_s=600, namespace=ns)
    try:
        keys = [(f"{ns}:t:tx-{n}", f"t/0/{n}") for n in range(3)]
        odd = (f"{ns}:t:ü:/ id", "t/1/9")  # ids may hold colons, slashes, spaces, non-ASCII
        assert await claims.claim([*keys, odd]) == [None, None, None, None]
        again = await claims.claim([keys[0], (keys[1][0], "t/0/77"), odd, keys[0]])
        assert again == ["t/0/0", "t/0/1", "t/1/9", "t/0/0"]
        # the same id twice in one batch: the first claims it, the second sees its position
        assert await claims.claim([(f"{ns}:t:tx-9", "t/2/1"), (f"{ns}:t:tx-9", "t/2/2")]) == [
            None,
            "t/2/1",
        ]
        bucket = claims.bucket_key(time.time())
        assert await client.hget(bucket, "t:ü:/ id") == b"t/1/9"
        assert 0 < await client.ttl(bucket) <= 2 * 600 + 60
        assert await claims.claim([]) == []
        with pytest.raises(ValueError, match="namespace"):
            await claims.claim([("elsewhere:t:tx-1", "t/0/1")])
    finally:
        await client.close()


async def test_redis_claims_last_between_one_and_two_ttls(redis_server: RedisSettings) -> None:
    """Bucket roll-over, on a clock the test moves: a claim is found in the previous bucket,
    forgotten two buckets later, and the bucket that fell out of range is removed."""
    client = connect(redis_server)
    ns = f"test-{uuid.uuid4().hex[:8]}"
    # the last second of a bucket (in the future: buckets expire at real times)
    now = [(int(time.time()) // 600 + 10) * 600 + 599.0]
    claims = RedisClaims(client, ttl_s=600, namespace=ns, clock=lambda: now[0])
    try:
        first_bucket = claims.bucket_key(now[0])
        assert await claims.claim([(f"{ns}:t:a", "t/0/1")]) == [None]
        now[0] += 1  # the next bucket: "a" is still held, in the previous one
        assert await claims.claim([(f"{ns}:t:a", "t/0/2"), (f"{ns}:t:b", "t/0/3")]) == [
            "t/0/1",
            None,
        ]
        assert await client.hget(claims.bucket_key(now[0]), "t:a") is None  # not copied
        now[0] += 600  # two buckets on: "a" is forgotten, "b" (previous bucket) is not
        assert await claims.claim([(f"{ns}:t:a", "t/0/4"), (f"{ns}:t:b", "t/0/5")]) == [
            None,
            "t/0/3",
        ]
        assert await client.exists(first_bucket) == 0
    finally:
        await client.close()


async def test_redis_claims_split_large_batches(redis_server: RedisSettings) -> None:
    client = connect(redis_server)
    ns = f"test-{uuid.uuid4().hex[:8]}"
    claims = RedisClaims(client, ttl_s=600, namespace=ns)
    try:
        batch = [(f"{ns}:t:tx-{n}", f"t/0/{n}") for n in range(7000)]
        batch.append((f"{ns}:t:tx-1", "t/0/99999"))  # in a later call than its first claim
        answers = await claims.claim(batch)
        assert answers == [None] * 7000 + ["t/0/1"]
        assert await client.hlen(claims.bucket_key(time.time())) == 7000
    finally:
        await client.close()


async def test_mlops_data_dlq_shows_what_was_dead_lettered(
    kafka: KafkaSettings,
    redis_server: RedisSettings,
    storage: StorageSettings,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from typer.testing import CliRunner

    from services.cli.data import app

    topics = Topics.from_settings(kafka)
    await ensure_topics(kafka)
    producer = AIOKafkaProducer(bootstrap_servers=kafka.bootstrap, acks="all")
    await producer.start()
    try:
        await producer.send_and_wait(topics.transactions, _tx("tx-d1", currency="EURO"))
        await producer.send_and_wait(topics.transactions, b"{oops")
        await producer.send_and_wait(topics.transactions, _tx("tx-d2"))
    finally:
        await producer.stop()
    settings = _settings(kafka, redis_server, storage)
    async with _running(settings):
        await _wait_processed(kafka, settings.group_id, [topics.transactions])
    for name, value in settings_environment(kafka).items():
        monkeypatch.setenv(name, value)
    result = await asyncio.to_thread(
        CliRunner().invoke, app, ["dlq", "--last", "5"], terminal_width=200
    )
    assert result.exit_code == 0, result.output
    assert "2 dead letters" in result.output
    assert "invalid_value" in result.output and "currency" in result.output
    assert "malformed_json" in result.output and "{oops" in result.output
