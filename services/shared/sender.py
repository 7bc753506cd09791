"""Sending records to Kafka, one way for every service: per-partition batches, dead letters.

``RecordSender.submit`` groups ``OutboundRecord``s per topic partition and hands each group to
the aiokafka producer as record batches (``create_batch``/``send_batch``: several times
cheaper per record than one ``send`` each). A record without an explicit partition goes where
Kafka's default partitioner puts its key (murmur2, ``partitioning.partition_for``), so
consumers keyed by user or transaction id see the partitioning the Java client would give.
Ingestion (validated events and dead letters), the features service (changelogs, re-keyed
facts, dead letters) and serving (predictions.log) all send through it.

One rule for a record over the broker's limit (``KafkaSettings.max_record_bytes``, key, value
and headers together; aiokafka puts the first record of a batch in it whatever its size, and
the broker then refuses the whole batch, which a retrying sender would retry forever): it is
not sent; a dead letter (reason ``record_too_large``, the value cut to
``MAX_DEAD_LETTER_VALUE``, where it was going in a header) goes to the dead-letter topic in its
place, counted in ``mlops_kafka_records_too_large_total`` and logged as an error. A dead letter
that is itself too large (only a giant key can make one) raises ``RecordTooLarge``: never
dropped silently.

``dead_letter`` builds the ``DeadLetter`` record every service sends for an input it cannot
use: the original key, bytes (capped) and headers, where it was read, why, and the headers
(content type, message type, ``reason-code``) consumers filter on.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

from aiokafka.errors import KafkaError
from prometheus_client import Counter

from services.shared.codecs import protobuf_headers
from services.shared.errors import PlatformError
from services.shared.logging import get_logger
from services.shared.partitioning import partition_for
from services.shared.proto.mlops.v1 import events_pb2

log = get_logger("sender")

Headers = Sequence[tuple[str, bytes]]
REASON_HEADER = "reason-code"
DESTINATION_HEADER = "destination-topic"  # on a record_too_large dead letter: where it went
RECORD_TOO_LARGE = "record_too_large"
# a dead letter must fit in a Kafka record itself (Kafka's default limit is 1 MiB); the whole
# original stays at its source position for as long as the topic keeps it
MAX_DEAD_LETTER_VALUE = 512 * 1024
_PARTITIONS_TTL_S = 60.0  # topics can gain partitions: look again now and then
_MAX_CACHED_KEYS = 500_000

TOO_LARGE = Counter(
    "mlops_kafka_records_too_large_total",
    "Records over the broker's record limit, dead-lettered instead of sent (by destination)",
    ["topic"],
)
_DEAD_LETTER_HEADERS = protobuf_headers(events_pb2.DeadLetter())


class RecordTooLarge(PlatformError):
    """A record exceeds the broker's limit and cannot even be dead-lettered."""

    code = "record_too_large"


@dataclass(frozen=True, slots=True)
class Source:
    """Where a record was read: what a dead letter points back to."""

    topic: str
    partition: int
    offset: int
    timestamp_ms: int | None = None  # the broker/producer timestamp, when known


@dataclass(slots=True)
class OutboundRecord:
    """A record to produce. ``partition`` None: the partition of ``key`` (random without)."""

    topic: str
    key: bytes | None
    value: bytes | None
    headers: list[tuple[str, bytes]] = field(default_factory=list)  # aiokafka wants a list
    partition: int | None = None
    source: Source | None = None  # what it was made from, for a dead letter if too large

    def size(self) -> int:
        """Bytes of key, value and headers (what counts against the broker's limit)."""
        return (
            len(self.key or b"")
            + len(self.value or b"")
            + sum(len(k) + len(v or b"") for k, v in self.headers)
        )


def dead_letter(
    dlq_topic: str,
    *,
    key: bytes | None,
    value: bytes | None,
    headers: Headers,
    source: Source | None,
    reason_code: str,
    reason: str,
    field: str = "",
    now: datetime | None = None,
    extra_headers: Headers = (),
    max_value: int = MAX_DEAD_LETTER_VALUE,
) -> OutboundRecord:
    """The ``DeadLetter`` record for an input that cannot be used, keyed as the original
    (its value cut to ``max_value`` bytes)."""
    original = value or b""
    if len(original) > max_value:
        where = (
            f"; the whole record is at {source.topic}/{source.partition}/{source.offset}"
            if source is not None
            else ""
        )
        reason = (
            f"{reason} (original value cut to its first {max_value} of "
            f"{len(original)} bytes{where})"
        )
        original = original[:max_value]
    letter = events_pb2.DeadLetter(
        original_key=key or b"",
        original_value=original,
        original_headers=[
            events_pb2.RecordHeader(key=protobuf_text(k), value=v or b"") for k, v in headers
        ],
        reason_code=reason_code,
        reason=protobuf_text(reason),
        field=protobuf_text(field),
    )
    letter.rejected_at.FromDatetime(now or datetime.now(UTC))
    if source is not None:
        letter.source.topic = source.topic
        letter.source.partition = source.partition
        letter.source.offset = source.offset
        if source.timestamp_ms is not None and source.timestamp_ms >= 0:
            letter.source_timestamp.FromMilliseconds(source.timestamp_ms)
    return OutboundRecord(
        dlq_topic,
        key,
        letter.SerializeToString(),
        [*_DEAD_LETTER_HEADERS, (REASON_HEADER, reason_code.encode()), *extra_headers],
        source=source,
    )


def protobuf_text(value: str | bytes) -> str:
    """A string any protobuf can carry (sender text may hold lone surrogates or bytes that
    are not UTF-8): escaped, not lost."""
    if isinstance(value, bytes):
        return value.decode("utf-8", "backslashreplace")
    return value.encode("utf-8", "backslashreplace").decode("utf-8")


class BatchProducer(Protocol):
    """What the sender needs of aiokafka's ``AIOKafkaProducer``."""

    def create_batch(self) -> Any: ...
    async def send_batch(
        self, batch: Any, topic: str, *, partition: int
    ) -> asyncio.Future[Any]: ...
    async def partitions_for(self, topic: str) -> set[int]: ...


@dataclass(slots=True)
class Delivery:
    """One record batch handed to the producer: its records and the broker's answer."""

    topic: str
    partition: int
    records: list[OutboundRecord]
    future: asyncio.Future[Any]


@dataclass(slots=True)
class DeliveryReport:
    """What ``deliver`` got acknowledged, and what failed (to send again) with the error."""

    delivered: list[Delivery] = field(default_factory=list)
    failed: list[OutboundRecord] = field(default_factory=list)
    error: BaseException | None = None


class RecordSender:
    """Hands records to a producer as one record batch per topic partition (at a time)."""

    def __init__(
        self, producer: BatchProducer, *, dlq_topic: str, max_record_bytes: int = 1_000_000
    ) -> None:
        self.producer = producer
        self.dlq_topic = dlq_topic
        self.max_record_bytes = max_record_bytes
        self.too_large = 0
        self._partitions: dict[str, list[int]] = {}
        self._partition_of: dict[tuple[str, bytes], int] = {}
        self._partitions_expire = 0.0

    def forget_partitions(self) -> None:
        """Ask the producer's metadata again (after a failure: partitions may have moved)."""
        self._partitions.clear()
        self._partition_of.clear()
        self._partitions_expire = time.monotonic() + _PARTITIONS_TTL_S

    async def partitions(self, topic: str) -> list[int]:
        if time.monotonic() > self._partitions_expire:
            self.forget_partitions()
        partitions = self._partitions.get(topic)
        if partitions is None:
            partitions = self._partitions[topic] = sorted(await self.producer.partitions_for(topic))
        return partitions

    async def _group(
        self, records: Iterable[OutboundRecord]
    ) -> dict[tuple[str, int], list[OutboundRecord]]:
        """``records`` per (topic, partition), each group in order (no await per record:
        this runs for every event)."""
        if time.monotonic() > self._partitions_expire:
            self.forget_partitions()
        partitions_of, partition_of = self._partitions, self._partition_of
        limit = self.max_record_bytes
        groups: dict[tuple[str, int], list[OutboundRecord]] = {}
        for given in records:
            record = self._too_large(given) if given.size() > limit else given
            topic, partition = record.topic, record.partition
            if partition is None:
                partitions = partitions_of.get(topic)
                if partitions is None:
                    partitions = partitions_of[topic] = sorted(
                        await self.producer.partitions_for(topic)
                    )
                key = record.key
                if key is None:
                    partition = partition_for(None, partitions)
                else:
                    cached = partition_of.get((topic, key))
                    if cached is None:
                        if len(partition_of) > _MAX_CACHED_KEYS:
                            partition_of.clear()
                        cached = partition_of[(topic, key)] = partition_for(key, partitions)
                    partition = cached
            group = groups.get((topic, partition))
            if group is None:
                groups[(topic, partition)] = [record]
            else:
                group.append(record)
        return groups

    def _too_large(self, record: OutboundRecord) -> OutboundRecord:
        size = record.size()
        reason = (
            f"a {size}-byte record for {record.topic} exceeds the broker's record limit of "
            f"{self.max_record_bytes} bytes (MLOPS_KAFKA_MAX_RECORD_BYTES)"
        )
        if record.topic == self.dlq_topic:
            raise RecordTooLarge(f"dead letter not sendable: {reason}")
        letter = dead_letter(
            self.dlq_topic,
            key=record.key,
            value=record.value,
            headers=record.headers,
            source=record.source,
            reason_code=RECORD_TOO_LARGE,
            reason=reason,
            extra_headers=[(DESTINATION_HEADER, record.topic.encode())],
            max_value=min(MAX_DEAD_LETTER_VALUE, self.max_record_bytes // 2),
        )
        if letter.size() > self.max_record_bytes:
            raise RecordTooLarge(f"dead letter not sendable either (key too large): {reason}")
        self.too_large += 1
        TOO_LARGE.labels(record.topic).inc()
        log.error(
            "record_too_large_dead_lettered",
            topic=record.topic,
            bytes=size,
            limit=self.max_record_bytes,
            dlq=self.dlq_topic,
        )
        return letter

    async def submit(self, records: Iterable[OutboundRecord]) -> list[Delivery]:
        """Hand ``records`` to the producer (per partition in their order); returns the
        deliveries, whose futures the broker's acknowledgement resolves. Raises
        ``RecordTooLarge`` before sending anything if a record can neither be sent nor
        dead-lettered."""
        groups = await self._group(records)
        deliveries: list[Delivery] = []
        producer = self.producer
        for (topic, partition), group in groups.items():
            batch = producer.create_batch()
            members: list[OutboundRecord] = []
            for record in group:
                if (
                    batch.append(
                        key=record.key, value=record.value, timestamp=None, headers=record.headers
                    )
                    is None
                ):  # full: send it, start the next one with this record
                    batch.close()
                    future = await producer.send_batch(batch, topic, partition=partition)
                    deliveries.append(Delivery(topic, partition, members, future))
                    batch, members = producer.create_batch(), []
                    # the first record of a batch always fits (aiokafka)
                    batch.append(
                        key=record.key, value=record.value, timestamp=None, headers=record.headers
                    )
                members.append(record)
            if members:
                batch.close()
                future = await producer.send_batch(batch, topic, partition=partition)
                deliveries.append(Delivery(topic, partition, members, future))
        return deliveries

    async def deliver(self, records: Sequence[OutboundRecord]) -> DeliveryReport:
        """``submit`` and wait for every acknowledgement; what failed is in the report (send
        it again: consumers are idempotent), and the partitions are looked up afresh."""
        report = DeliveryReport()
        try:
            deliveries = await self.submit(records)
        except KafkaError as exc:  # metadata or buffer trouble before anything was sent
            report.failed, report.error = list(records), exc
            self.forget_partitions()
            return report
        results = await asyncio.gather(*(d.future for d in deliveries), return_exceptions=True)
        for delivery, result in zip(deliveries, results, strict=True):
            if isinstance(result, BaseException):
                report.failed.extend(delivery.records)
                report.error = result
            else:
                report.delivered.append(delivery)
        if report.failed:
            self.forget_partitions()
        return report
