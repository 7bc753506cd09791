"""predictions.log records: the direct wire encoding parses to the same messages."""

from __future__ import annotations

import numpy as np
from aiokafka import AIOKafkaProducer

from services.serving.prediction_log import (
    PredictionBatch,
    PredictionEntry,
    PredictionLog,
    RecordEncoder,
)
from services.shared.proto.mlops.v1 import events_pb2, monitoring_pb2
from services.shared.usecase.features import MODEL_INPUTS


def entry(i: int, **changes: object) -> PredictionEntry:
    rng = np.random.default_rng(i)
    fields: dict[str, object] = {
        "request_id": f"req-{i}",
        "transaction": events_pb2.Transaction(
            transaction_id=f"t-{i}",
            user_id=f"user-{i}",
            merchant_id="merchant-ü",
            amount=12.5 + i,
            currency="EUR",
            channel="web",
            country="FR",
            event_time="2026-01-01T00:00:00+00:00",
        ),
        "features": (rng.normal(size=len(MODEL_INPUTS)) * 10**i).astype(np.float32),
        "fraud_probability": float(rng.random()),
        "flagged": i % 2 == 0,
        "model_name": "fraud_detector",
        "model_version": 3 + i * 1000,
        "route": monitoring_pb2.ROUTE_SHADOW if i % 3 == 0 else monitoring_pb2.ROUTE_PRODUCTION,
        "degraded": i % 4 == 1,
        "latency_ms": 0.25 * i,
        "predicted_at": 1_767_225_600.123456 + i,
    }
    fields.update(changes)
    return PredictionEntry(**fields)  # type: ignore[arg-type]


def batch(rows: int, **changes: object) -> PredictionBatch:
    rng = np.random.default_rng(rows)
    fields: dict[str, object] = {
        "request_ids": [f"req-{i}" if i % 5 else "" for i in range(rows)],
        "transactions": [entry(i).transaction for i in range(rows)],
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


def test_a_batch_encodes_to_the_records_of_its_entries() -> None:
    encoder = RecordEncoder()
    for one in (
        batch(9),
        batch(4, degraded=True, route=monitoring_pb2.ROUTE_SHADOW, predicted_at=12.0),
        # a name longer than one varint byte of length; defaults everywhere else
        batch(3, model_version=0, model_name="m" * 150, predicted_at=0.0),
        batch(2, route=monitoring_pb2.ROUTE_UNSPECIFIED, request_ids=["", ""]),
    ):
        entries = one.entries()
        encoded = encoder.encode_batch(one)
        assert len(encoded) == len(entries)
        for row, raw in zip(entries, encoded, strict=True):
            parsed = monitoring_pb2.PredictionRecord.FromString(raw)
            assert parsed == row.to_record()
            assert dict(parsed.features) == dict(
                zip(MODEL_INPUTS, row.features.tolist(), strict=True)
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
