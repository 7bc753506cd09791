"""What the features service reads and passes between its agents, decoded.

Inputs are the ingestion service's protobuf messages (``ValidatedTransaction`` keyed by
user_id on ``events.validated``, ``ValidatedLabel`` keyed by transaction_id on
``events.validated.labels``). Between its own agents the service re-partitions facts through
two internal topics, in batches (compact JSON lists):

- ``TransactionRef`` (partitioned by transaction_id): which merchant a transaction belongs to
  and when it happened, for the label join;
- ``MerchantFact`` (partitioned by merchant_id): a transaction or a joined label.

All times are integer microseconds since the epoch (event times are truncated to the
microsecond, the resolution of the offline store's timestamps).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

from google.protobuf.message import DecodeError

from services.shared.proto.mlops.v1 import events_pb2

US_PER_SECOND = 1_000_000


class UndecodableEvent(ValueError):
    """A record on a validated or internal topic that the service cannot read."""

    def __init__(self, reason_code: str, reason: str, field: str = "") -> None:
        super().__init__(reason)
        self.reason_code = reason_code
        self.reason = reason
        self.field = field


def timestamp_us(seconds: int, nanos: int) -> int:
    return seconds * US_PER_SECOND + nanos // 1000


@dataclass(frozen=True, slots=True)
class TransactionEvent:
    """A validated transaction, as far as the streaming features need it."""

    transaction_id: str
    user_id: str
    merchant_id: str
    amount: float
    country: str
    event_time_us: int
    ingested_us: int


@dataclass(frozen=True, slots=True)
class LabelEvent:
    transaction_id: str
    is_fraud: bool
    event_time_us: int
    ingested_us: int


def _require(value: str, field: str) -> str:
    if not value:
        raise UndecodableEvent("missing_field", f"{field} is empty", field)
    return value


def decode_transaction(value: bytes | None) -> TransactionEvent:
    message = events_pb2.ValidatedTransaction()
    try:
        message.ParseFromString(value or b"")
    except DecodeError as exc:
        raise UndecodableEvent("malformed_protobuf", f"not a ValidatedTransaction: {exc}") from exc
    if not message.HasField("event_time"):
        raise UndecodableEvent("missing_field", "event_time is not set", "event_time")
    if not (math.isfinite(message.amount) and message.amount > 0):
        raise UndecodableEvent("invalid_field", "amount must be finite and > 0", "amount")
    event_time = timestamp_us(message.event_time.seconds, message.event_time.nanos)
    ingested = (
        timestamp_us(message.ingested_at.seconds, message.ingested_at.nanos)
        if message.HasField("ingested_at")
        else event_time
    )
    return TransactionEvent(
        transaction_id=_require(message.transaction_id, "transaction_id"),
        user_id=_require(message.user_id, "user_id"),
        merchant_id=_require(message.merchant_id, "merchant_id"),
        amount=message.amount,
        country=message.country,
        event_time_us=event_time,
        ingested_us=ingested,
    )


def decode_label(value: bytes | None) -> LabelEvent:
    message = events_pb2.ValidatedLabel()
    try:
        message.ParseFromString(value or b"")
    except DecodeError as exc:
        raise UndecodableEvent("malformed_protobuf", f"not a ValidatedLabel: {exc}") from exc
    if not message.HasField("event_time"):
        raise UndecodableEvent("missing_field", "event_time is not set", "event_time")
    event_time = timestamp_us(message.event_time.seconds, message.event_time.nanos)
    ingested = (
        timestamp_us(message.ingested_at.seconds, message.ingested_at.nanos)
        if message.HasField("ingested_at")
        else event_time
    )
    return LabelEvent(
        transaction_id=_require(message.transaction_id, "transaction_id"),
        is_fraud=message.is_fraud,
        event_time_us=event_time,
        ingested_us=ingested,
    )


@dataclass(frozen=True, slots=True)
class TransactionRef:
    """Internal: a transaction's merchant and event time, routed by transaction_id."""

    transaction_id: str
    merchant_id: str
    event_time_us: int

    def packed(self) -> list[Any]:
        return [self.transaction_id, self.merchant_id, self.event_time_us]

    @classmethod
    def unpacked(cls, item: Any) -> TransactionRef:
        transaction_id, merchant_id, event_time_us = item
        return cls(str(transaction_id), str(merchant_id), int(event_time_us))


@dataclass(frozen=True, slots=True)
class MerchantFact:
    """Internal: something that happened to a merchant, routed by merchant_id.

    ``kind`` is ``"txn"`` (a transaction at ``event_time_us``) or ``"label"`` (the label of
    the transaction at ``event_time_us``; ``is_fraud`` set). ``trigger_*`` are the times of
    the event that caused the fact (the transaction, or the label), for freshness figures.
    """

    kind: str
    merchant_id: str
    transaction_id: str
    event_time_us: int
    is_fraud: bool = False
    trigger_event_us: int = 0
    trigger_ingested_us: int = 0

    def packed(self) -> list[Any]:
        return [
            self.kind,
            self.merchant_id,
            self.transaction_id,
            self.event_time_us,
            int(self.is_fraud),
            self.trigger_event_us,
            self.trigger_ingested_us,
        ]

    @classmethod
    def unpacked(cls, item: Any) -> MerchantFact:
        kind, merchant_id, transaction_id, event_time_us, is_fraud, event_us, ingested_us = item
        if kind not in ("txn", "label"):
            raise ValueError(f"unknown merchant fact kind {kind!r}")
        return cls(
            str(kind),
            str(merchant_id),
            str(transaction_id),
            int(event_time_us),
            bool(is_fraud),
            int(event_us),
            int(ingested_us),
        )


# Facts travel between the agents in batches: one record per destination partition per
# batch of events (a JSON list of packed facts), not one record per fact. Every record a
# faust agent consumes costs ~0.1-0.2 ms of faust's machinery; one per fact was the largest
# cost of the service. A fact's position in the stream is (record offset, index in record).
MAX_FACTS_PER_RECORD = 10_000
_JSON = json.JSONEncoder(separators=(",", ":"))
_INDEX_SPAN = 1 << 16  # > MAX_FACTS_PER_RECORD


def fact_position(offset: int, index: int) -> int:
    """A fact's position in its partition: increasing with offset, then index."""
    return offset * _INDEX_SPAN + index


def encode_facts(facts: list[TransactionRef] | list[MerchantFact]) -> bytes:
    if len(facts) > MAX_FACTS_PER_RECORD:
        raise ValueError(f"at most {MAX_FACTS_PER_RECORD} facts per record")
    return _JSON.encode([fact.packed() for fact in facts]).encode()


def decode_refs(value: bytes | None) -> list[TransactionRef]:
    return _decode_list(value, TransactionRef.unpacked, "transaction refs")


def decode_merchant_facts(value: bytes | None) -> list[MerchantFact]:
    return _decode_list(value, MerchantFact.unpacked, "merchant facts")


def _decode_list(value: bytes | None, unpack: Any, what: str) -> list[Any]:
    try:
        items = json.loads(value or b"")
    except ValueError as exc:
        raise UndecodableEvent("malformed_json", f"{what} are not JSON: {exc}") from exc
    if not isinstance(items, list):
        raise UndecodableEvent("malformed_json", f"{what} are not a JSON list")
    try:
        return [unpack(item) for item in items]
    except (TypeError, ValueError) as exc:
        raise UndecodableEvent("invalid_field", f"bad {what}: {exc}") from exc
