"""predictions.log records: the direct wire encoding parses to the same messages."""

from __future__ import annotations

import numpy as np
from aiokafka import AIOKafkaProducer
from google.protobuf.timestamp_pb2 import Timestamp

from services.serving.prediction_log import PredictionBatch, PredictionLog, RecordEncoder
from services.shared.proto.mlops.v1 import events_pb2, monitoring_pb2
from services.shared.usecase.features import MODEL_INPUTS


def transaction(i: int) -> events_pb2.Transaction:
    return events_pb2.Transaction(
        transaction_id=f"t-{i}",
        user_id=f"user-{i}",
        merchant_id="merchant-ü",
        amount=12.5 + i,
        currency="EUR",
        channel="web",
        country="FR",
        event_time="2026-01-01T00:00:00+00:00",
    )


def reference_records(batch: PredictionBatch) -> list[monitoring_pb2.PredictionRecord]:
    """Each row's record built field by field with the protobuf API (the slow, obvious way)."""
    seconds = int(batch.predicted_at)
    predicted_at = Timestamp(seconds=seconds, nanos=int((batch.predicted_at - seconds) * 1e9))
    return [
        monitoring_pb2.PredictionRecord(
            request_id=batch.request_ids[i],
            transaction=batch.transactions[i],
            features=dict(zip(MODEL_INPUTS, batch.features[i].tolist(), strict=True)),
            fraud_probability=batch.fraud_probabilities[i],
            flagged=batch.flagged[i],
            model_name=batch.model_name,
            model_version=batch.model_version,
            route=batch.route,  # type: ignore[arg-type]
            degraded=batch.degraded,
            latency_ms=batch.latencies_ms[i],
            predicted_at=predicted_at,
            replayed=batch.replayed,
        )
        for i in range(len(batch))
    ]


def batch(rows: int, **changes: object) -> PredictionBatch:
    rng = np.random.default_rng(rows)
    fields: dict[str, object] = {
        "request_ids": [f"req-{i}" if i % 5 else "" for i in range(rows)],
        "transactions": [transaction(i) for i in range(rows)],
        "features": (rng.normal(size=(rows, len(MODEL_INPUTS))) * 50).astype(np.float32),
        "fraud_probabilities": [float(p) for p in rng.random(rows)],
        "flagged": [i % 3 == 0 for i in range(rows)],
        "latencies_ms": [0.5 * i for i in range(rows)],
        "model_name": "fraud_detector",
        "model_version": 7,
        "route": monitoring_pb2.ROUTE_CANARY,
        "degraded": False,
        "predicted_at": 1_767_225_600.5,
    }
    fields.update(changes)
    return PredictionBatch(**fields)  # type: ignore[arg-type]


def test_a_batch_encodes_to_the_records_of_its_rows() -> None:
    encoder = RecordEncoder()
    for one in (
        batch(9),
        batch(4, degraded=True, route=monitoring_pb2.ROUTE_SHADOW, predicted_at=12.0),
        # a name longer than one varint byte of length; defaults everywhere else
        batch(3, model_version=0, model_name="m" * 150, predicted_at=0.0),
        batch(2, route=monitoring_pb2.ROUTE_UNSPECIFIED, request_ids=["", ""]),
        batch(5, route=monitoring_pb2.ROUTE_SHADOW, replayed=True, predicted_at=0.0),
    ):
        expected = reference_records(one)
        encoded = encoder.encode_batch(one)
        assert len(encoded) == len(expected) == len(one)
        for i, (row, raw) in enumerate(zip(expected, encoded, strict=True)):
            parsed = monitoring_pb2.PredictionRecord.FromString(raw)
            assert parsed == row
            assert dict(parsed.features) == dict(
                zip(MODEL_INPUTS, one.features[i].tolist(), strict=True)
            )
    assert encoder.encode_batch(batch(0)) == []


def never_started() -> AIOKafkaProducer:
    raise AssertionError("not started here")


def test_the_buffer_keeps_what_fits_and_counts_the_rest() -> None:
    log = PredictionLog(never_started, "predictions.log", capacity=10)
    log.record(batch(4))
    log.record(batch(9))  # 6 fit
    log.record(batch(2))  # none fit
    assert log.dropped == 3 + 2
    assert log.buffered == 10
    taken = log.take()
    assert [len(b) for b in taken] == [4, 6]
    assert taken[1].request_ids == batch(9).request_ids[:6]
    assert log.buffered == 0
    log.record(batch(2))  # room again once handed over
    assert log.buffered == 2
