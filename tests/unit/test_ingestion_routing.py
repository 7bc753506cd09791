"""Ingestion's routing and duplicate detection (services/ingestion/routing.py), without Kafka."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import pytest
from doubles import InMemoryClaims, SourceRecord

from services.ingestion.routing import (
    Accepted,
    EventKind,
    EventRouter,
    Ingestor,
    Rejected,
    Verdict,
    topic_tag,
    verdict,
)
from services.shared.codecs import CONTENT_TYPE, MESSAGE_TYPE, PROTOBUF
from services.shared.proto.mlops.v1 import events_pb2
from services.shared.sender import MAX_DEAD_LETTER_VALUE, REASON_HEADER
from services.shared.settings import KafkaSettings
from services.shared.topics import Topics

NOW = datetime(2025, 6, 1, 12, 0, tzinfo=UTC)
TOPICS = Topics.from_settings(KafkaSettings(topic_prefix="p."))
TX: dict[str, Any] = {
    "transaction_id": "tx-1",
    "user_id": "user-7",
    "merchant_id": "merchant-3",
    "amount": 99.99,
    "currency": "GBP",
    "channel": "pos",
    "country": "GB",
    "event_time": "2025-06-01T11:58:00.250Z",
}


def _record(
    value: bytes | None,
    *,
    topic: str = TOPICS.transactions,
    offset: int = 0,
    partition: int = 1,
    key: bytes | None = b"user-7",
    headers: tuple[tuple[str, bytes], ...] = (),
) -> SourceRecord:
    return SourceRecord(topic, partition, offset, key, value, headers, timestamp=1_700_000_000_123)


def _tx(offset: int = 0, **changes: Any) -> SourceRecord:
    return _record(json.dumps({**TX, **changes}).encode(), offset=offset)


def _label(transaction_id: str, offset: int = 0, is_fraud: bool = False) -> SourceRecord:
    body = {
        "transaction_id": transaction_id,
        "is_fraud": is_fraud,
        "event_time": "2025-06-01T11:59:00Z",
    }
    return _record(
        json.dumps(body).encode(), topic=TOPICS.labels, offset=offset, key=transaction_id.encode()
    )


ROUTER = EventRouter(TOPICS)


def test_a_valid_transaction_becomes_a_validated_protobuf_keyed_by_user() -> None:
    routed = ROUTER.route(_tx(offset=41), now=NOW)
    assert isinstance(routed, Accepted)
    assert routed.kind is EventKind.TRANSACTION
    assert routed.event_id == "tx-1"
    assert routed.output.topic == "p.events.validated"
    assert routed.output.key == b"user-7"
    headers = dict(routed.output.headers)
    assert headers[CONTENT_TYPE] == PROTOBUF.encode()
    assert headers[MESSAGE_TYPE] == b"mlops.v1.ValidatedTransaction"
    message = events_pb2.ValidatedTransaction.FromString(routed.output.value)
    assert (message.transaction_id, message.user_id, message.merchant_id) == (
        "tx-1",
        "user-7",
        "merchant-3",
    )
    assert (message.amount, message.currency, message.channel, message.country) == (
        99.99,
        "GBP",
        "pos",
        "GB",
    )
    assert message.event_time.ToDatetime(tzinfo=UTC) == datetime(
        2025, 6, 1, 11, 58, 0, 250000, tzinfo=UTC
    )
    assert message.ingested_at.ToDatetime(tzinfo=UTC) == NOW
    assert (message.source.topic, message.source.partition, message.source.offset) == (
        "p.events.transactions",
        1,
        41,
    )


def test_a_valid_label_goes_to_its_stream_keyed_by_transaction() -> None:
    routed = ROUTER.route(_label("tx-9", offset=3, is_fraud=True), now=NOW)
    assert isinstance(routed, Accepted)
    assert routed.kind is EventKind.LABEL
    assert routed.output.topic == "p.events.validated.labels"
    assert routed.output.key == b"tx-9"
    message = events_pb2.ValidatedLabel.FromString(routed.output.value)
    assert message.is_fraud and message.transaction_id == "tx-9"
    assert message.source.offset == 3
    assert dict(routed.output.headers)[MESSAGE_TYPE] == b"mlops.v1.ValidatedLabel"


def test_a_protobuf_transaction_is_accepted_with_its_content_type() -> None:
    body = events_pb2.Transaction(**TX).SerializeToString()
    routed = ROUTER.route(_record(body, headers=((CONTENT_TYPE, PROTOBUF.encode()),)), now=NOW)
    assert isinstance(routed, Accepted)
    assert events_pb2.ValidatedTransaction.FromString(routed.output.value).amount == 99.99


def _dead_letter(routed: Accepted | Rejected) -> events_pb2.DeadLetter:
    assert isinstance(routed, Rejected), routed
    assert routed.output.topic == "p.events.dlq"
    return events_pb2.DeadLetter.FromString(routed.output.value)


def test_a_rejected_record_keeps_its_bytes_key_and_headers_and_says_why() -> None:
    value = json.dumps({**TX, "currency": "EURO"}).encode()
    headers = (("trace-id", b"abc"), ("empty", b""), ("bin", b"\x00\xff"))
    routed = ROUTER.route(_record(value, offset=17, headers=headers, key=b"user-7"), now=NOW)
    letter = _dead_letter(routed)
    assert routed.output.key == b"user-7"
    assert letter.original_value == value
    assert letter.original_key == b"user-7"
    assert [(h.key, h.value) for h in letter.original_headers] == list(headers)
    assert (letter.reason_code, letter.field) == ("invalid_value", "currency")
    assert "ISO 4217" in letter.reason
    assert (letter.source.topic, letter.source.partition, letter.source.offset) == (
        "p.events.transactions",
        1,
        17,
    )
    assert letter.rejected_at.ToDatetime(tzinfo=UTC) == NOW
    assert letter.source_timestamp.ToMilliseconds() == 1_700_000_000_123
    out_headers = dict(routed.output.headers)
    assert out_headers[REASON_HEADER] == b"invalid_value"
    assert out_headers[MESSAGE_TYPE] == b"mlops.v1.DeadLetter"


@pytest.mark.parametrize(
    ("value", "headers", "code"),
    [
        (b"\xff\xfe\x00", (), "malformed_json"),
        (b'{"amount": NaN}', (), "malformed_json"),
        (b"[1, 2]", (), "not_an_object"),
        (None, (), "empty_record"),
        (b"garbage", ((CONTENT_TYPE, PROTOBUF.encode()),), "malformed_protobuf"),
        (b"{}", ((CONTENT_TYPE, b"text/csv"),), "unsupported_content_type"),
        (b" " * 20_000, (), "record_too_large"),
    ],
)
def test_unreadable_records_are_dead_lettered_not_raised(
    value: bytes | None, headers: tuple[tuple[str, bytes], ...], code: str
) -> None:
    letter = _dead_letter(ROUTER.route(_record(value, headers=headers, key=None), now=NOW))
    assert letter.reason_code == code
    assert letter.original_value == (value or b"")
    assert letter.original_key == b""


def test_a_huge_record_is_dead_lettered_with_its_head_and_where_to_find_the_rest() -> None:
    value = b"{" + b" " * (2 * MAX_DEAD_LETTER_VALUE)
    letter = _dead_letter(ROUTER.route(_record(value, offset=9), now=NOW))
    assert letter.reason_code == "record_too_large"
    assert letter.original_value == value[:MAX_DEAD_LETTER_VALUE]
    assert "p.events.transactions/1/9" in letter.reason


def test_a_record_without_a_broker_timestamp_still_gets_a_dead_letter() -> None:
    record = SourceRecord(TOPICS.transactions, 0, 5, None, b"{", (), timestamp=None)
    letter = _dead_letter(ROUTER.route(record, now=NOW))
    assert not letter.HasField("source_timestamp")


def test_sender_text_with_lone_surrogates_cannot_break_the_dead_letter() -> None:
    value = json.dumps({**TX, "x\ud800": 1}).encode()  # JSON escapes: "\\ud800"
    letter = _dead_letter(ROUTER.route(_record(value), now=NOW))
    assert letter.reason_code == "unknown_field"
    assert letter.field.startswith("x\\ud800")


class TestIngestor:
    def _ingestor(self) -> tuple[Ingestor, InMemoryClaims]:
        claims = InMemoryClaims()
        return Ingestor(ROUTER, claims, namespace="ns"), claims

    async def test_outputs_keep_record_order_and_account_for_everything(self) -> None:
        ingestor, _ = self._ingestor()
        records = [
            _tx(0),
            _record(b"{", offset=1),
            _label("tx-1", offset=0),
            _tx(2, transaction_id="tx-2"),
        ]
        outcome = await ingestor.process(records, now=NOW)
        assert [o.topic for o in outcome.outputs] == [
            "p.events.validated",
            "p.events.dlq",
            "p.events.validated.labels",
            "p.events.validated",
        ]
        assert len(outcome.forwarded) == 3
        assert len(outcome.rejected) == 1
        assert outcome.duplicates == []

    async def test_a_resent_transaction_is_a_duplicate_and_is_not_forwarded(self) -> None:
        ingestor, claims = self._ingestor()
        first = await ingestor.process([_tx(0)], now=NOW)
        again = await ingestor.process([_tx(5, amount=1.0)], now=NOW)  # same id, other record
        assert len(first.forwarded) == 1
        assert again.outputs == [] and again.rejected == []
        assert [d.event_id for d in again.duplicates] == ["tx-1"]
        assert claims.positions[f"ns:{topic_tag('p.events.transactions')}:tx-1"] == "1/0"

    def test_claim_keys_name_the_topic_by_a_short_tag(self) -> None:
        # a label shares its transaction's id; another deployment's topics are other topics
        tags = {topic_tag(t) for t in ("p.events.transactions", "p.events.labels", "events.labels")}
        assert len(tags) == 3 and all(len(t) == 8 and int(t, 16) >= 0 for t in tags)

    async def test_duplicates_within_one_batch_are_caught(self) -> None:
        ingestor, _ = self._ingestor()
        outcome = await ingestor.process([_tx(0), _tx(1), _tx(2)], now=NOW)
        assert len(outcome.forwarded) == 1
        assert [d.record.offset for d in outcome.duplicates] == [1, 2]

    async def test_the_same_record_read_again_after_a_crash_is_forwarded_again(self) -> None:
        ingestor, _ = self._ingestor()
        await ingestor.process([_tx(0), _tx(1, transaction_id="tx-2")], now=NOW)
        replay = await ingestor.process([_tx(0), _tx(1, transaction_id="tx-2")], now=NOW)
        assert len(replay.forwarded) == 2
        assert len(replay.redelivered) == 2
        assert replay.duplicates == []

    async def test_labels_are_deduplicated_by_transaction_apart_from_transactions(self) -> None:
        ingestor, _ = self._ingestor()
        outcome = await ingestor.process(
            [_tx(0), _label("tx-1", offset=0), _label("tx-1", offset=1)], now=NOW
        )
        assert [a.kind for a in outcome.forwarded] == [EventKind.TRANSACTION, EventKind.LABEL]
        assert [(d.kind, d.record.offset) for d in outcome.duplicates] == [(EventKind.LABEL, 1)]

    async def test_invalid_records_claim_nothing(self) -> None:
        ingestor, claims = self._ingestor()
        await ingestor.process([_tx(0, amount=-1)], now=NOW)
        assert claims.positions == {}
        assert len((await ingestor.process([_tx(1)], now=NOW)).forwarded) == 1

    async def test_an_empty_batch_does_nothing(self) -> None:
        ingestor, _ = self._ingestor()
        outcome = await ingestor.process([], now=NOW)
        assert outcome.outputs == []


def test_verdicts() -> None:
    assert verdict(None, "t/0/1") is Verdict.FIRST
    assert verdict("t/0/1", "t/0/1") is Verdict.REDELIVERY
    assert verdict("t/0/1", "t/0/2") is Verdict.DUPLICATE
    assert verdict("t/1/1", "t/0/1") is Verdict.DUPLICATE
