"""predictions.log records: the direct wire encoding parses to the same messages."""

from __future__ import annotations

import numpy as np

from services.serving.prediction_log import PredictionEntry, RecordEncoder
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


def test_encoded_records_parse_to_the_entries_messages() -> None:
    entries = [entry(i) for i in range(7)]
    entries.append(
        entry(
            7,
            request_id="",
            features=np.zeros(len(MODEL_INPUTS), np.float32),
            fraud_probability=0.0,
            flagged=False,
            model_version=0,
            route=monitoring_pb2.ROUTE_UNSPECIFIED,
            degraded=False,
            latency_ms=0.0,
            model_name="x" * 200,  # a name longer than one varint byte of length
        )
    )
    encoded = RecordEncoder().encode(entries)
    assert len(encoded) == len(entries)
    for one, raw in zip(entries, encoded, strict=True):
        parsed = monitoring_pb2.PredictionRecord.FromString(raw)
        assert parsed == one.to_record()
        assert dict(parsed.features) == dict(zip(MODEL_INPUTS, one.features.tolist(), strict=True))


def test_nothing_to_encode() -> None:
    assert RecordEncoder().encode([]) == []
