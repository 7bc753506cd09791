"""The one way records go to Kafka (services/shared/sender.py), against a recording producer."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from aiokafka.errors import KafkaConnectionError
from aiokafka.producer.message_accumulator import BatchBuilder
from aiokafka.record.default_records import DefaultRecordBatch

from services.shared.codecs import MESSAGE_TYPE
from services.shared.partitioning import partition_for
from services.shared.proto.mlops.v1 import events_pb2
from services.shared.sender import (
    DESTINATION_HEADER,
    MAX_DEAD_LETTER_VALUE,
    REASON_HEADER,
    RECORD_TOO_LARGE,
    TOO_LARGE,
    OutboundRecord,
    RecordSender,
    RecordTooLarge,
    Source,
    dead_letter,
)

PARTITIONS = {"out": {0, 1, 2, 3}, "events.dlq": {0, 1}}


class RecordingProducer:
    """Stands in for AIOKafkaProducer: keeps every batch (decoded) and acknowledges it, or
    fails the batches of ``failing`` topics."""

    def __init__(self, *, batch_size: int = 16384, failing: set[str] | None = None) -> None:
        self.batch_size = batch_size
        self.failing = failing or set()
        self.batches: list[tuple[str, int, list[tuple[bytes | None, bytes | None, Any]]]] = []

    def create_batch(self) -> BatchBuilder:
        return BatchBuilder(self.batch_size, 0, is_transactional=False)

    async def partitions_for(self, topic: str) -> set[int]:
        return PARTITIONS[topic]

    async def send_batch(self, batch: Any, topic: str, *, partition: int) -> asyncio.Future[Any]:
        raw = DefaultRecordBatch(bytes(batch._build()))
        records = [(r.key, r.value, list(r.headers)) for r in raw]
        self.batches.append((topic, partition, records))
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        if topic in self.failing:
            future.set_exception(KafkaConnectionError("broker away"))
        else:
            future.set_result(None)
        return future


def test_records_go_per_partition_in_order_where_the_java_client_would_put_their_key() -> None:
    producer = RecordingProducer(batch_size=2048)
    sender = RecordSender(producer, dlq_topic="events.dlq")
    records = [
        OutboundRecord("out", f"k{i % 7}".encode(), b"v" * 100 + bytes([i])) for i in range(60)
    ]
    records.append(OutboundRecord("out", b"explicit", b"x", partition=2))
    report = asyncio.run(sender.deliver(records))
    assert not report.failed and report.error is None
    sent = [(t, p, key, value) for t, p, rs in producer.batches for key, value, _ in rs]
    assert sorted(v for *_, v in sent) == sorted(r.value for r in records)  # each once
    for topic, partition, key, _ in sent:
        expected = 2 if key == b"explicit" else partition_for(key, [0, 1, 2, 3])
        assert (topic, partition) == ("out", expected)
    for partition in range(4):  # per partition, the input order is kept
        values = [v for _, p, _, v in sent if p == partition]
        assert values == [r.value for r in records if r.value in values]
    assert len(producer.batches) > 4  # 2 KiB batches: full ones were cut and sent


def test_a_record_over_the_limit_is_dead_lettered_counted_and_never_sent() -> None:
    producer = RecordingProducer()
    sender = RecordSender(producer, dlq_topic="events.dlq", max_record_bytes=4096)
    before = TOO_LARGE.labels("out")._value.get()
    huge = OutboundRecord(
        "out", b"key", b"z" * 700_000, [("h", b"1")], source=Source("in", 3, 42, 1_700_000_000_000)
    )
    report = asyncio.run(sender.deliver([OutboundRecord("out", b"a", b"small"), huge]))
    assert not report.failed
    assert TOO_LARGE.labels("out")._value.get() == before + 1 and sender.too_large == 1
    out = [v for t, _, rs in producer.batches if t == "out" for _, v, _ in rs]
    assert out == [b"small"]
    [(_, _, [(key, value, headers)])] = [b for b in producer.batches if b[0] == "events.dlq"]
    assert key == b"key"
    letter = events_pb2.DeadLetter.FromString(value)
    assert letter.reason_code == RECORD_TOO_LARGE and "700" in letter.reason
    assert letter.source.topic == "in" and letter.source.offset == 42
    assert len(letter.original_value) == min(MAX_DEAD_LETTER_VALUE, 4096 // 2)
    assert dict(headers)[REASON_HEADER] == RECORD_TOO_LARGE.encode()
    assert dict(headers)[DESTINATION_HEADER] == b"out"


def test_a_dead_letter_that_cannot_be_sent_fails_loudly() -> None:
    sender = RecordSender(RecordingProducer(), dlq_topic="events.dlq", max_record_bytes=4096)
    with pytest.raises(RecordTooLarge):
        asyncio.run(sender.deliver([OutboundRecord("out", b"k" * 5000, b"v")]))
    with pytest.raises(RecordTooLarge):
        asyncio.run(sender.deliver([OutboundRecord("events.dlq", b"k", b"v" * 5000)]))


def test_failed_deliveries_come_back_to_be_sent_again() -> None:
    producer = RecordingProducer(failing={"events.dlq"})
    sender = RecordSender(producer, dlq_topic="events.dlq")
    records = [OutboundRecord("out", b"a", b"1"), OutboundRecord("events.dlq", b"b", b"2")]
    report = asyncio.run(sender.deliver(records))
    assert [r.value for r in report.failed] == [b"2"]
    assert isinstance(report.error, KafkaConnectionError)
    assert [d.topic for d in report.delivered] == ["out"]


def test_dead_letters_carry_the_original_the_reason_and_their_headers() -> None:
    letter = dead_letter(
        "events.dlq",
        key=b"user-1",
        value=b'{"amount": "NaN"}',
        headers=[("content-type", b"application/json"), ("\udcff", b"x")],
        source=Source("events.transactions", 1, 7, 1_700_000_000_123),
        reason_code="invalid_value",
        reason="amount: not a finite number \udcff",
        field="amount",
    )
    parsed = events_pb2.DeadLetter.FromString(letter.value or b"")
    assert (parsed.original_key, parsed.original_value) == (b"user-1", b'{"amount": "NaN"}')
    assert parsed.source.partition == 1 and parsed.source_timestamp.ToMilliseconds() == (
        1_700_000_000_123
    )
    assert parsed.field == "amount" and parsed.reason.startswith("amount: not a finite")
    assert [h.key for h in parsed.original_headers] == ["content-type", "\\udcff"]
    headers = dict(letter.headers)
    assert headers[MESSAGE_TYPE] == b"mlops.v1.DeadLetter"
    assert headers[REASON_HEADER] == b"invalid_value"
