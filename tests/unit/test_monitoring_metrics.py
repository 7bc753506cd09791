"""PredictionLogMetrics: what predictions.log records turn into, read back exactly."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from prometheus_client import CollectorRegistry

from services.monitoring.prediction_metrics import PredictionLogMetrics
from services.shared.errors import InvalidArgument
from services.shared.proto.mlops.v1 import monitoring_pb2

NOW = datetime(2026, 11, 1, 12, 0, tzinfo=UTC)


def _record(
    probability: float = 0.2,
    *,
    version: int = 3,
    route: int = monitoring_pb2.ROUTE_PRODUCTION,
    flagged: bool = False,
    degraded: bool = False,
    predicted_at: datetime | None = NOW - timedelta(seconds=2),
) -> monitoring_pb2.PredictionRecord:
    record = monitoring_pb2.PredictionRecord(
        request_id="r-1",
        fraud_probability=probability,
        flagged=flagged,
        model_name="fraud_detector",
        model_version=version,
        route=route,
        degraded=degraded,
    )
    record.transaction.transaction_id = "t-1"
    if predicted_at is not None:
        record.predicted_at.FromDatetime(predicted_at)
    return record


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


@pytest.fixture
def metrics(registry: CollectorRegistry) -> PredictionLogMetrics:
    return PredictionLogMetrics(registry)


def _value(registry: CollectorRegistry, name: str, **labels: str) -> float:
    value = registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


def test_counts_predictions_by_version_route_and_decision(
    metrics: PredictionLogMetrics, registry: CollectorRegistry
) -> None:
    metrics.observe(_record(0.1), read_at=NOW)
    metrics.observe(_record(0.2), read_at=NOW)
    metrics.observe(_record(0.97, flagged=True), read_at=NOW)
    metrics.observe(_record(0.5, version=4, route=monitoring_pb2.ROUTE_CANARY), read_at=NOW)

    total = "mlops_monitoring_predictions_total"
    v3 = {"model_name": "fraud_detector", "model_version": "3", "route": "production"}
    assert _value(registry, total, **v3, decision="approve") == 2
    assert _value(registry, total, **v3, decision="decline") == 1
    assert (
        _value(
            registry,
            total,
            model_name="fraud_detector",
            model_version="4",
            route="canary",
            decision="approve",
        )
        == 1
    )


def test_fraud_probability_histogram_per_version(
    metrics: PredictionLogMetrics, registry: CollectorRegistry
) -> None:
    for probability in (0.01, 0.3, 0.3, 0.95):
        metrics.observe(_record(probability), read_at=NOW)
    version = {"model_name": "fraud_detector", "model_version": "3"}
    name = "mlops_monitoring_fraud_probability"
    assert _value(registry, f"{name}_count", **version) == 4
    assert _value(registry, f"{name}_sum", **version) == pytest.approx(1.56)
    assert _value(registry, f"{name}_bucket", **version, le="0.3") == 3
    assert _value(registry, f"{name}_bucket", **version, le="0.9") == 3
    assert _value(registry, f"{name}_bucket", **version, le="0.95") == 4


def test_degraded_answers_and_delay(
    metrics: PredictionLogMetrics, registry: CollectorRegistry
) -> None:
    metrics.observe(_record(degraded=True, predicted_at=NOW - timedelta(seconds=3)), read_at=NOW)
    metrics.observe(_record(predicted_at=NOW - timedelta(milliseconds=20)), read_at=NOW)
    metrics.observe(_record(predicted_at=None), read_at=NOW)  # no time: no delay sample

    degraded = "mlops_monitoring_degraded_predictions_total"
    assert _value(registry, degraded, model_name="fraud_detector", model_version="3") == 1
    delay = "mlops_monitoring_prediction_log_delay_seconds"
    assert _value(registry, f"{delay}_count") == 2
    assert _value(registry, f"{delay}_sum") == pytest.approx(3.02)
    assert _value(registry, f"{delay}_bucket", le="0.025") == 1


def test_a_record_from_the_future_counts_no_negative_delay(
    metrics: PredictionLogMetrics, registry: CollectorRegistry
) -> None:
    metrics.observe(_record(predicted_at=NOW + timedelta(seconds=1)), read_at=NOW)
    assert _value(registry, "mlops_monitoring_prediction_log_delay_seconds_sum") == 0.0


@pytest.mark.parametrize("probability", [float("nan"), -0.1, 1.5, float("inf")])
def test_an_impossible_probability_is_refused_and_not_counted(
    metrics: PredictionLogMetrics, registry: CollectorRegistry, probability: float
) -> None:
    with pytest.raises(InvalidArgument) as raised:
        metrics.observe(_record(probability), read_at=NOW)
    assert raised.value.field == "fraud_probability"
    assert registry.get_sample_value("mlops_monitoring_predictions_total", {}) is None
    assert (
        _value(
            registry,
            "mlops_monitoring_fraud_probability_count",
            model_name="fraud_detector",
            model_version="3",
        )
        == 0
    )


def test_a_record_without_model_name_is_refused(metrics: PredictionLogMetrics) -> None:
    record = _record()
    record.model_name = ""
    with pytest.raises(InvalidArgument) as raised:
        metrics.observe(record, read_at=NOW)
    assert raised.value.field == "model_name"


def test_rejections_are_counted_by_reason(
    metrics: PredictionLogMetrics, registry: CollectorRegistry
) -> None:
    metrics.reject("malformed_protobuf")
    metrics.reject("malformed_protobuf")
    metrics.reject("empty_record")
    name = "mlops_monitoring_records_rejected_total"
    assert _value(registry, name, reason_code="malformed_protobuf") == 2
    assert _value(registry, name, reason_code="empty_record") == 1


def test_lag_report_replaces_partitions_no_longer_consumed(
    metrics: PredictionLogMetrics, registry: CollectorRegistry
) -> None:
    name = "mlops_monitoring_consumer_lag_records"
    labels = {"group": "monitoring", "topic": "predictions.log"}
    metrics.report_lag("monitoring", "predictions.log", {0: 5, 1: 7})
    assert _value(registry, name, **labels, partition="1") == 7
    metrics.report_lag("monitoring", "predictions.log", {0: 0})
    assert _value(registry, name, **labels, partition="0") == 0
    assert registry.get_sample_value(name, {**labels, "partition": "1"}) is None
