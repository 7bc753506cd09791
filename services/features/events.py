"""What the features service reads and passes between its agents, decoded.

Inputs are the ingestion service's protobuf messages (``ValidatedTransaction`` keyed by
user_id on ``events.validated``, ``ValidatedLabel`` keyed by transaction_id on
``events.validated.labels``). Between its own agents the service re-keys facts through two
internal topics, as compact JSON:

- ``TransactionRef`` (keyed by transaction_id): which merchant a transaction belongs to and
  when it happened, for the label join;
- ``MerchantFact`` (keyed by merchant_id): a transaction or a joined label of a merchant.

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
    """Internal: a transaction's merchant and event time, keyed by transaction_id."""

    transaction_id: str
    merchant_id: str
    event_time_us: int

    def encode(self) -> bytes:
        return _dumps({"m": self.merchant_id, "t": self.event_time_us})

    @classmethod
    def decode(cls, key: bytes | None, value: bytes | None) -> TransactionRef:
        data = _loads(value)
        try:
            return cls(_key(key), str(data["m"]), int(data["t"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise UndecodableEvent("invalid_field", f"bad transaction ref: {exc!r}") from exc


@dataclass(frozen=True, slots=True)
class MerchantFact:
    """Internal: something that happened to a merchant, keyed by merchant_id.

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

    def encode(self) -> bytes:
        return _dumps(
            {
                "k": self.kind,
                "id": self.transaction_id,
                "t": self.event_time_us,
                "f": int(self.is_fraud),
                "et": self.trigger_event_us,
                "it": self.trigger_ingested_us,
            }
        )

    @classmethod
    def decode(cls, key: bytes | None, value: bytes | None) -> MerchantFact:
        data = _loads(value)
        kind = str(data.get("k"))
        if kind not in ("txn", "label"):
            raise UndecodableEvent("invalid_field", f"unknown merchant fact kind {kind!r}", "k")
        try:
            return cls(
                kind=kind,
                merchant_id=_key(key),
                transaction_id=str(data["id"]),
                event_time_us=int(data["t"]),
                is_fraud=bool(data["f"]),
                trigger_event_us=int(data["et"]),
                trigger_ingested_us=int(data["it"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise UndecodableEvent("invalid_field", f"bad merchant fact: {exc!r}") from exc


def _dumps(data: dict[str, Any]) -> bytes:
    return json.dumps(data, separators=(",", ":")).encode()


def _loads(value: bytes | None) -> dict[str, Any]:
    try:
        data = json.loads(value or b"")
    except ValueError as exc:
        raise UndecodableEvent("malformed_json", f"internal message is not JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise UndecodableEvent("malformed_json", "internal message is not a JSON object")
    return data


def _key(key: bytes | None) -> str:
    if not key:
        raise UndecodableEvent("missing_key", "record has no key", "key")
    return key.decode("utf-8", errors="replace")
