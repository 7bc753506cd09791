"""Decoding, the offline feature log and the sink of the features service."""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import os
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from services.features.events import (
    MerchantFact,
    TransactionRef,
    UndecodableEvent,
    decode_label,
    decode_merchant_facts,
    decode_refs,
    decode_transaction,
    encode_facts,
    fact_position,
)
from services.features.offline_log import (
    CreatedClock,
    FeatureLogWriter,
    StampedRow,
    event_date,
)
from services.features.sink import FeatureSink
from services.features.windows import FeatureRow
from services.shared.proto.mlops.v1 import events_pb2
from services.shared.usecase.features import MERCHANT_FEATURES, USER_FEATURES

T0 = 1_767_225_600_000_000  # 2026-01-01T00:00:00Z


def user_row(user: str, t: int, count: int = 1) -> FeatureRow:
    features = {
        "user_txn_count_1h": count,
        "user_txn_count_24h": count,
        "user_amount_sum_24h": 10.5 * count,
        "user_amount_mean_7d": 10.5,
        "user_distinct_merchants_24h": 1,
        "user_last_txn_epoch": t / 1e6,
        "user_home_country": "DE",
    }
    return FeatureRow("user_activity", user, t, features, t, t)


# ------------------------------------------------------------------------------------ events


def test_validated_events_decode_to_microsecond_times() -> None:
    message = events_pb2.ValidatedTransaction(
        transaction_id="t1", user_id="u1", merchant_id="m1", amount=12.5, country="DE"
    )
    message.event_time.seconds, message.event_time.nanos = 1_767_225_600, 123_456_789
    message.ingested_at.seconds = 1_767_225_601
    txn = decode_transaction(message.SerializeToString())
    assert txn.event_time_us == T0 + 123_456  # truncated to the microsecond
    assert txn.ingested_us == T0 + 1_000_000
    assert (txn.transaction_id, txn.user_id, txn.merchant_id, txn.amount, txn.country) == (
        "t1",
        "u1",
        "m1",
        12.5,
        "DE",
    )

    label = events_pb2.ValidatedLabel(transaction_id="t1", is_fraud=True)
    label.event_time.seconds = 1_767_225_600
    decoded = decode_label(label.SerializeToString())
    assert decoded.is_fraud and decoded.ingested_us == decoded.event_time_us == T0


@pytest.mark.parametrize(
    ("payload", "code"),
    [
        (b"\xff\xff\xff", "malformed_protobuf"),
        (events_pb2.ValidatedTransaction(transaction_id="t").SerializeToString(), "missing_field"),
    ],
)
def test_unreadable_transactions_say_why(payload: bytes, code: str) -> None:
    with pytest.raises(UndecodableEvent) as caught:
        decode_transaction(payload)
    assert caught.value.reason_code == code


def test_facts_travel_in_batches_and_round_trip() -> None:
    refs = [TransactionRef("t1", "m1", T0), TransactionRef("t2", "m2", T0 + 1)]
    assert decode_refs(encode_facts(refs)) == refs
    facts = [
        MerchantFact("txn", "m1", "t1", T0, False, T0, T0 + 2),
        MerchantFact("label", "m1", "t1", T0, True, T0 + 5, T0 + 6),
    ]
    assert decode_merchant_facts(encode_facts(facts)) == facts
    assert fact_position(7, 1) > fact_position(7, 0) and fact_position(8, 0) > fact_position(
        7, 9999
    )
    with pytest.raises(UndecodableEvent) as caught:
        decode_merchant_facts(b'[["fraud", "m1", "t1", 1, 0, 1, 1]]')
    assert caught.value.reason_code == "invalid_field"
    with pytest.raises(UndecodableEvent) as caught:
        decode_refs(b"{not json")
    assert caught.value.reason_code == "malformed_json"


def test_facts_are_routed_like_kafkas_default_partitioner() -> None:
    from aiokafka.partitioner import DefaultPartitioner

    from services.features.outbound import partition_for_key

    for key in (b"t1", b"merchant-42", "ü-ser".encode()):
        assert partition_for_key(key, 4) == DefaultPartitioner()(key, [0, 1, 2, 3], [0, 1, 2, 3])


class SlowBroker:
    """Stands in for aiokafka's producer: ``send_batch`` returns once the previous batch of
    the partition has left (here: when the test says so), the future when acknowledged."""

    def __init__(self) -> None:
        self.leave = asyncio.Event()
        self.sent: list[tuple[str, int, list[bytes | None]]] = []
        self.acks: list[asyncio.Future[None]] = []
        self.sent_more = asyncio.Condition()

    async def wait_sent(self, count: int) -> None:
        async with self.sent_more:
            await self.sent_more.wait_for(lambda: len(self.acks) >= count)

    def create_batch(self) -> Any:
        from aiokafka.producer.message_accumulator import BatchBuilder

        return BatchBuilder(16384, 0, is_transactional=False)

    async def partitions_for(self, topic: str) -> set[int]:
        return {0, 1, 2, 3}

    async def send_batch(self, batch: Any, topic: str, partition: int) -> asyncio.Future[None]:
        await self.leave.wait()
        self.sent.append((topic, partition, [None] * batch.record_count()))
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.acks.append(future)
        async with self.sent_more:
            self.sent_more.notify_all()
        return future


def test_outbound_send_hands_over_without_waiting_and_flush_waits_for_the_broker() -> None:
    from services.features.outbound import OutboundRecords
    from services.shared.sender import RecordSender

    async def scenario() -> None:
        broker = SlowBroker()
        outbound = OutboundRecords(RecordSender(broker, dlq_topic="events.dlq"), 4)
        outbound.add("changelog", 1, b"k1", b"v1")
        outbound.add("changelog", 1, b"k2", None)
        await asyncio.wait_for(outbound.send(), 1)  # returns although nothing could leave yet
        outbound.add("changelog", 2, b"k3", b"v3")
        flushed = asyncio.ensure_future(outbound.flush())
        await asyncio.wait({flushed}, timeout=0.05)  # nothing can leave: flush must not end
        assert not flushed.done() and broker.sent == []
        broker.leave.set()
        await asyncio.wait_for(broker.wait_sent(2), 1)
        assert [(t, p, len(r)) for t, p, r in broker.sent] == [
            ("changelog", 1, 2),
            ("changelog", 2, 1),
        ]  # in the order of the sends
        assert not flushed.done()  # sent, not acknowledged yet
        for ack in broker.acks:
            ack.set_result(None)
        await asyncio.wait_for(flushed, 1)
        # a failed delivery is raised by the next flush (nothing gets acknowledged)
        outbound.add("changelog", 3, b"k4", b"v4")
        flushed = asyncio.ensure_future(outbound.flush())
        await asyncio.wait_for(broker.wait_sent(3), 1)
        broker.acks[-1].set_exception(RuntimeError("broker said no"))
        with pytest.raises(RuntimeError, match="broker said no"):
            await asyncio.wait_for(flushed, 1)
        await outbound.close()

    asyncio.run(scenario())


# ------------------------------------------------------------------------------- offline log


def test_feature_log_writes_immutable_parquet_per_event_date(tmp_path: Path) -> None:
    writer = FeatureLogWriter(tmp_path / "user_activity", "user_id", USER_FEATURES, "w1")
    clock = CreatedClock()
    rows = [
        StampedRow(user_row("u1", T0 - 1), clock.next()),
        StampedRow(user_row("u1", T0 + 5, 2), clock.next()),
        StampedRow(user_row("u2", T0 + 7), clock.next()),
    ]
    files = writer.write(rows)
    assert [f.parent.name for f in files] == ["event_date=2025-12-31", "event_date=2026-01-01"]
    assert all(
        f.name.startswith("part-") and f.name.endswith(f"-w1-{i:06d}.parquet")
        for i, f in enumerate(files, 1)
    )
    assert not list(tmp_path.rglob(".*"))  # no temporaries left

    table = pq.ParquetFile(files[1]).read()  # the file itself, not the hive dataset
    assert table.schema.names == [
        "user_id",
        *USER_FEATURES,
        "event_timestamp",
        "created_timestamp",
    ]
    assert table.schema.field("event_timestamp").type == pa.timestamp("us", tz="UTC")
    assert table.schema.field("created_timestamp").type == pa.timestamp("us", tz="UTC")
    assert table.schema.field("user_txn_count_1h").type == pa.int64()
    assert table.schema.field("user_home_country").type == pa.string()
    assert table.column("user_id").to_pylist() == ["u1", "u2"]
    assert table.column("user_txn_count_1h").to_pylist() == [2, 1]
    stamps = table.column("event_timestamp").cast(pa.int64()).to_pylist()
    assert stamps == [T0 + 5, T0 + 7]
    created = table.column("created_timestamp").cast(pa.int64()).to_pylist()
    assert created == [rows[1].created_us, rows[2].created_us]
    assert event_date(T0) == "2026-01-01" and event_date(T0 - 1) == "2025-12-31"


def test_a_failed_write_leaves_nothing_behind(tmp_path: Path) -> None:
    writer = FeatureLogWriter(tmp_path, "merchant_id", MERCHANT_FEATURES, "w1")
    bad = FeatureRow("merchant_activity", "m1", T0, {"merchant_txn_count_24h": "many"}, T0, T0)
    with pytest.raises((pa.ArrowInvalid, pa.ArrowTypeError, KeyError)):
        writer.write([StampedRow(bad, 1)])
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []


def test_stale_temporaries_are_removed(tmp_path: Path) -> None:
    writer = FeatureLogWriter(tmp_path, "user_id", USER_FEATURES, "w1")
    stale = tmp_path / "event_date=2026-01-01" / ".part-x.parquet.tmp"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"partial")
    fresh = stale.with_name(".part-y.parquet.tmp")
    fresh.write_bytes(b"in progress")
    os.utime(stale, (0, 0))
    assert writer.remove_stale_temporaries(older_than_s=60) == 1
    assert not stale.exists() and fresh.exists()


def test_created_clock_is_strictly_increasing() -> None:
    clock = CreatedClock()
    stamps = [clock.next() for _ in range(1000)]
    assert all(b > a for a, b in itertools.pairwise(stamps))


# ------------------------------------------------------------------------------------ sink


class RecordingOnlineStore:
    def __init__(self, failures: int = 0) -> None:
        self.pushes: list[tuple[str, list[StampedRow]]] = []
        self.failures = failures

    def push(self, view: str, rows: Sequence[StampedRow]) -> None:
        if self.failures:
            self.failures -= 1
            raise ConnectionError("redis down")
        self.pushes.append((view, list(rows)))


class FlakyWriter(FeatureLogWriter):
    failures = 1

    def write(self, rows: Sequence[StampedRow]) -> list[Path]:
        if self.failures:
            self.failures -= 1
            raise OSError("disk full")
        return super().write(rows)


def recorder(acked: list[int]) -> Callable[[int], Callable[[], Awaitable[None]]]:
    def ack(n: int) -> Callable[[], Awaitable[None]]:
        async def done() -> None:
            acked.append(n)

        return done

    return ack


async def test_sink_pushes_latest_rows_and_acks_only_after_the_offline_write(
    tmp_path: Path,
) -> None:
    online = RecordingOnlineStore()
    writer = FlakyWriter(tmp_path, "user_id", USER_FEATURES, "w1")
    sink = FeatureSink(
        online, {"user_activity": writer}, flush_interval_s=3600, flush_max_rows=1000
    )
    acked: list[int] = []
    ack = recorder(acked)
    sink.start()
    try:
        # two batches queued before the pusher runs go out as one push
        await sink.publish([user_row("u1", T0), user_row("u2", T0)], [ack(1), ack(2)])
        await sink.publish([user_row("u1", T0 + 1, 2)], [ack(3)])
        await sink.drain()
        assert len(online.pushes) == 1
        view, pushed = online.pushes[0]
        assert view == "user_activity"
        assert [(s.row.entity_id, s.row.event_time_us) for s in pushed] == [
            ("u1", T0 + 1),
            ("u2", T0),
        ]
        assert acked == []  # not durable offline yet
        await sink.flush_if_due()
        assert acked == []  # not due

        with pytest.raises(OSError, match="disk full"):
            await sink.flush()
        assert acked == [] and sink.pending_rows == 3  # kept for the next attempt
        await sink.flush()
        assert acked == [1, 2, 3]
        table = pq.ParquetFile(next(tmp_path.rglob("*.parquet"))).read()
        assert table.num_rows == 3
        created = table.column("created_timestamp").cast(pa.int64()).to_pylist()
        assert created == sorted(created) and len(set(created)) == 3
    finally:
        await sink.close()


async def test_a_failed_push_is_retried_and_nothing_is_acked_before(tmp_path: Path) -> None:
    online = RecordingOnlineStore(failures=2)
    writer = FeatureLogWriter(tmp_path, "user_id", USER_FEATURES, "w1")
    sink = FeatureSink(
        online,
        {"user_activity": writer},
        flush_interval_s=3600,
        flush_max_rows=1000,
        retry_after_s=0.01,
    )
    acked: list[int] = []
    sink.start()
    try:
        await sink.publish([user_row("u1", T0)], [recorder(acked)(1)])
        await sink.drain()
        assert online.failures == 0 and len(online.pushes) == 1
        assert acked == []
    finally:
        await sink.close()  # drains and writes the offline log: now acked
    assert acked == [1]
    assert len(list(tmp_path.rglob("*.parquet"))) == 1


async def test_sink_flushes_early_when_many_rows_wait(tmp_path: Path) -> None:
    writer = FeatureLogWriter(tmp_path, "user_id", USER_FEATURES, "w1")
    sink = FeatureSink(
        RecordingOnlineStore(), {"user_activity": writer}, flush_interval_s=3600, flush_max_rows=2
    )
    acked = asyncio.Event()

    async def ack() -> None:
        acked.set()

    sink.start()
    try:
        await sink.publish([user_row("u1", T0)], [])
        await sink.drain()
        assert sink.pending_rows == 1
        await sink.publish([user_row("u2", T0)], [ack])
        await asyncio.wait_for(acked.wait(), timeout=5)
        assert sink.pending_rows == 0
    finally:
        await sink.close()


async def test_a_redelivered_earlier_row_goes_offline_but_not_online(tmp_path: Path) -> None:
    online = RecordingOnlineStore()
    writer = FeatureLogWriter(tmp_path, "user_id", USER_FEATURES, "w1")
    sink = FeatureSink(
        online, {"user_activity": writer}, flush_interval_s=3600, flush_max_rows=1000
    )
    current = user_row("u1", T0, count=2)
    earlier = dataclasses.replace(user_row("u1", T0, count=1), current=False)
    sink.start()
    try:
        await sink.publish([current, earlier], [])
        await sink.drain()
        assert [[s.row for s in rows] for _, rows in online.pushes] == [[current]]
        assert online.pushes[0][1][0].row.features["user_txn_count_24h"] == 2
        await sink.flush()
        table = pq.ParquetFile(next(tmp_path.rglob("*.parquet"))).read()
        assert sorted(table.column("user_txn_count_24h").to_pylist()) == [1, 2]
    finally:
        await sink.close()
