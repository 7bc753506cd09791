"""What ingestion does with each record, as pure logic: decode, validate, deduplicate, route.

``EventRouter.route`` turns one record read from ``events.transactions`` or ``events.labels``
into either an ``Accepted`` event (its validated protobuf, ready for ``events.validated`` or
``events.validated.labels``) or a ``Rejected`` one (a ``DeadLetter`` for ``events.dlq`` with the
original key, bytes and headers untouched, and why). Nothing raises: whatever a record holds,
it ends up on one of the two paths, so a poison record never stops the consumer.

``Ingestor.process`` does that for a batch and asks a ``ClaimStore`` (Redis in the service)
which accepted events were seen before:

- first time an id is seen: the store records the record's source position (partition/offset
  under a key naming the topic); forwarded;
- the very same record again (same topic/partition/offset: a re-delivery after a crash,
  whose output may never have gone out): forwarded again (downstream is idempotent by id);
- another record with an id already claimed: a duplicate; counted and logged, neither
  forwarded nor dead-lettered (it is not invalid, only redundant).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import Protocol

from services.shared.codecs import decode_external, protobuf_headers
from services.shared.errors import InvalidArgument
from services.shared.proto.mlops.v1 import events_pb2
from services.shared.sender import OutboundRecord, Source, dead_letter, protobuf_text
from services.shared.topics import Topics
from services.shared.usecase.schemas import (
    MAX_RECORD_BYTES,
    epoch_parts,
    validate_label,
    validate_transaction,
)

Headers = Sequence[tuple[str, bytes]]


class EventKind(StrEnum):
    TRANSACTION = "transaction"
    LABEL = "label"


class ConsumedRecord(Protocol):
    """A record as read from a product topic (aiokafka's ConsumerRecord is one)."""

    @property
    def topic(self) -> str: ...
    @property
    def partition(self) -> int: ...
    @property
    def offset(self) -> int: ...
    @property
    def key(self) -> bytes | None: ...
    @property
    def value(self) -> bytes | None: ...
    @property
    def headers(self) -> Headers: ...
    @property
    def timestamp(self) -> int | None: ...  # broker/producer time, epoch milliseconds


def topic_tag(topic: str) -> str:
    """A topic's stand-in in claim keys: 8 hex digits of its BLAKE2b hash.

    Ids are unique per topic (a label shares its transaction's id), so a claim key names the
    topic, and the position it stores is then only partition/offset (``claim_position``).
    The full name (``<prefix>events.transactions``) would be most of the bytes Redis reads,
    parses and stores per claim; a hash keeps topics of different deployments apart all the
    same."""
    return hashlib.blake2b(topic.encode(), digest_size=4).hexdigest()


def claim_position(partition: int, offset: int) -> str:
    """Where a record was read within its (claimed) topic: what makes a re-delivery
    recognisable."""
    return f"{partition}/{offset}"


@dataclass(slots=True)
class Accepted:
    """A valid event, waiting for the duplicate check."""

    record: ConsumedRecord
    kind: EventKind
    event_id: str
    event_time: datetime
    output: OutboundRecord


@dataclass(slots=True)
class Rejected:
    """An invalid record and its dead letter."""

    record: ConsumedRecord
    reason_code: str
    field: str
    reason: str
    output: OutboundRecord


class Verdict(StrEnum):
    FIRST = "first"  # never seen: forward
    REDELIVERY = "redelivery"  # this very record again: forward again
    DUPLICATE = "duplicate"  # another record with a claimed id: drop, count


def verdict(stored_position: str | None, position: str) -> Verdict:
    """The duplicate check's answer given what the claim store held before this claim."""
    if stored_position is None:
        return Verdict.FIRST
    return Verdict.REDELIVERY if stored_position == position else Verdict.DUPLICATE


class ClaimStore(Protocol):
    """Claims ids atomically: records ``position`` for each key not yet claimed."""

    async def claim(self, claims: Sequence[tuple[str, str]]) -> list[str | None]:
        """For each (key, position), in order: the position stored before (None if the key
        was free, in which case ``position`` is now stored)."""
        ...


def _stamp(
    message: events_pb2.ValidatedTransaction | events_pb2.ValidatedLabel,
    event_time: datetime,
    now_parts: tuple[int, int],
    record: ConsumedRecord,
) -> None:
    """Set the times and the source position (fields set in place: several times faster
    than building sub-messages and copying them in)."""
    message.event_time.seconds, message.event_time.nanos = epoch_parts(event_time)
    message.ingested_at.seconds, message.ingested_at.nanos = now_parts
    source = message.source
    source.topic = record.topic
    source.partition = record.partition
    source.offset = record.offset


class EventRouter:
    """Decodes, validates and routes one record of a product topic."""

    def __init__(self, topics: Topics, *, max_record_bytes: int = MAX_RECORD_BYTES) -> None:
        self.topics = topics
        self.max_record_bytes = max_record_bytes
        self._kinds = {topics.transactions: EventKind.TRANSACTION, topics.labels: EventKind.LABEL}
        # the same for every record: built once (the producer does not modify headers)
        self._transaction_headers = protobuf_headers(events_pb2.ValidatedTransaction())
        self._label_headers = protobuf_headers(events_pb2.ValidatedLabel())
        self._now: datetime | None = None
        self._now_epoch = (0, 0)

    def _now_parts(self, now: datetime) -> tuple[int, int]:
        # a batch shares one ingestion time: converted once
        if now is not self._now:
            self._now, self._now_epoch = now, epoch_parts(now)
        return self._now_epoch

    @property
    def source_topics(self) -> list[str]:
        return list(self._kinds)

    def route(self, record: ConsumedRecord, *, now: datetime) -> Accepted | Rejected:
        kind = self._kinds.get(record.topic)
        if kind is None:
            return self.reject(
                record, "unknown_topic", "", f"{record.topic} is not a product topic", now=now
            )
        if record.value is not None and len(record.value) > self.max_record_bytes:
            return self.reject(
                record,
                "record_too_large",
                "",
                f"{len(record.value)} bytes is over the limit of {self.max_record_bytes}",
                now=now,
            )
        try:
            if kind is EventKind.TRANSACTION:
                return self._transaction(record, now)
            return self._label(record, now)
        except InvalidArgument as exc:
            return self.reject(record, exc.code, exc.field, str(exc), now=now)

    def _transaction(self, record: ConsumedRecord, now: datetime) -> Accepted:
        data = decode_external(record.value, record.headers, events_pb2.Transaction)
        valid = validate_transaction(data, now=now)
        message = events_pb2.ValidatedTransaction(
            transaction_id=valid.transaction_id,
            user_id=valid.user_id,
            merchant_id=valid.merchant_id,
            amount=valid.amount,
            currency=valid.currency,
            channel=valid.channel,
            country=valid.country,
        )
        _stamp(message, valid.event_time, self._now_parts(now), record)
        return Accepted(
            record=record,
            kind=EventKind.TRANSACTION,
            event_id=valid.transaction_id,
            event_time=valid.event_time,
            output=OutboundRecord(
                self.topics.validated,
                valid.user_id.encode(),
                message.SerializeToString(),
                self._transaction_headers,
            ),
        )

    def _label(self, record: ConsumedRecord, now: datetime) -> Accepted:
        data = decode_external(record.value, record.headers, events_pb2.Label)
        valid = validate_label(data, now=now)
        message = events_pb2.ValidatedLabel(
            transaction_id=valid.transaction_id, is_fraud=valid.is_fraud
        )
        _stamp(message, valid.event_time, self._now_parts(now), record)
        return Accepted(
            record=record,
            kind=EventKind.LABEL,
            event_id=valid.transaction_id,
            event_time=valid.event_time,
            output=OutboundRecord(
                self.topics.validated_labels,
                valid.transaction_id.encode(),
                message.SerializeToString(),
                self._label_headers,
            ),
        )

    def reject(
        self, record: ConsumedRecord, reason_code: str, field: str, reason: str, *, now: datetime
    ) -> Rejected:
        output = dead_letter(
            self.topics.dlq,
            key=record.key,
            value=record.value,
            headers=record.headers,
            source=Source(record.topic, record.partition, record.offset, record.timestamp),
            reason_code=reason_code,
            reason=reason,
            field=field,
            now=now,
        )
        return Rejected(
            record=record,
            reason_code=reason_code,
            field=protobuf_text(field),
            reason=protobuf_text(reason),
            output=output,
        )


@dataclass
class BatchOutcome:
    """What a batch became: the records to produce (in input order) and the accounting."""

    outputs: list[OutboundRecord] = field(default_factory=list)
    forwarded: list[Accepted] = field(default_factory=list)
    redelivered: list[Accepted] = field(default_factory=list)  # subset of forwarded
    duplicates: list[Accepted] = field(default_factory=list)
    rejected: list[Rejected] = field(default_factory=list)


class Ingestor:
    """The ingestion domain: a batch of product records in, the records to produce out."""

    def __init__(self, router: EventRouter, claims: ClaimStore, *, namespace: str) -> None:
        self.router = router
        self.claims = claims
        self.namespace = namespace
        # a claim key is this plus the event id (``topic_tag``: ids are unique per source
        # topic); only records of the source topics are ever accepted
        self._claim_prefix = {t: f"{namespace}:{topic_tag(t)}:" for t in router.source_topics}

    async def process(
        self, records: Sequence[ConsumedRecord], *, now: datetime | None = None
    ) -> BatchOutcome:
        moment = now or datetime.now(UTC)
        route = self.router.route
        routed = [route(record, now=moment) for record in records]
        accepted = [r for r in routed if isinstance(r, Accepted)]
        prefixes = self._claim_prefix
        claims = [
            (
                prefixes[a.record.topic] + a.event_id,
                claim_position(a.record.partition, a.record.offset),
            )
            for a in accepted
        ]
        stored = await self.claims.claim(claims)
        answers = iter(zip(stored, claims, strict=True))
        outcome = BatchOutcome()
        outputs, forwarded = outcome.outputs, outcome.forwarded
        for item in routed:
            if isinstance(item, Rejected):
                outcome.rejected.append(item)
                outputs.append(item.output)
                continue
            before, (_, where) = next(answers)
            answer = verdict(before, where)
            if answer is Verdict.DUPLICATE:
                outcome.duplicates.append(item)
                continue
            if answer is Verdict.REDELIVERY:
                outcome.redelivered.append(item)
            forwarded.append(item)
            outputs.append(item.output)
        return outcome
