"""What the prediction log says about the models in service, as Prometheus metrics.

``PredictionLogMetrics`` is the monitoring service's domain object for predictions.log: it
reads ``PredictionRecord``s (already decoded; the Kafka transport is
reader.py) and keeps, per model version, how many predictions were served on which
route with which decision, the distribution of fraud probabilities, the answers given with
default features (degraded), how long records took to reach monitoring, and how far the
consumer is behind the log. Pure logic over a ``CollectorRegistry`` of its own, so tests
read the exact values.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from datetime import datetime

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from services.shared.errors import InvalidArgument
from services.shared.model_aliases import ROUTE_NAMES
from services.shared.proto.mlops.v1 import monitoring_pb2

PROBABILITY_BUCKETS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99)
DELAY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 3600)


def validate(record: monitoring_pb2.PredictionRecord) -> None:
    """Raises ``InvalidArgument`` naming the field for a record that breaks the contract."""
    probability = record.fraud_probability
    if not (math.isfinite(probability) and 0.0 <= probability <= 1.0):
        raise InvalidArgument(
            "fraud_probability", f"{probability!r} is not in [0, 1]", code="invalid_field"
        )
    if not record.model_name:
        raise InvalidArgument("model_name", "is empty", code="invalid_field")
    if not record.transaction.transaction_id:
        raise InvalidArgument("transaction.transaction_id", "is empty", code="invalid_field")


class PredictionLogMetrics:
    """Prometheus metrics of the predictions the platform served."""

    def __init__(self, registry: CollectorRegistry) -> None:
        version = ["model_name", "model_version"]
        self.predictions = Counter(
            "mlops_monitoring_predictions_total",
            "Predictions in predictions.log, by model version, route and decision",
            [*version, "route", "decision"],
            registry=registry,
        )
        self.fraud_probability = Histogram(
            "mlops_monitoring_fraud_probability",
            "Fraud probabilities served, by model version",
            version,
            buckets=PROBABILITY_BUCKETS,
            registry=registry,
        )
        self.degraded = Counter(
            "mlops_monitoring_degraded_predictions_total",
            "Predictions answered with default features (the online store was unreachable)",
            version,
            registry=registry,
        )
        self.log_delay = Histogram(
            "mlops_monitoring_prediction_log_delay_seconds",
            "From a prediction's predicted_at to monitoring reading it from predictions.log",
            buckets=DELAY_BUCKETS,
            registry=registry,
        )
        self.rejected = Counter(
            "mlops_monitoring_records_rejected_total",
            "predictions.log records that could not be read, by reason",
            ["reason_code"],
            registry=registry,
        )
        self.consumer_lag = Gauge(
            "mlops_monitoring_consumer_lag_records",
            "High watermark minus position, per consumed partition of predictions.log",
            ["group", "topic", "partition"],
            registry=registry,
        )
        # (model_name, model_version, route, flagged) -> its series (``_children_of``)
        self._children: dict[tuple[str, int, int, bool], tuple[Counter, Histogram, Counter]] = {}

    def observe(self, record: monitoring_pb2.PredictionRecord, *, read_at: datetime) -> None:
        """Count one served prediction. Raises ``InvalidArgument`` (nothing counted) for a
        record that breaks the contract."""
        validate(record)
        key = (record.model_name, record.model_version, record.route, record.flagged)
        children = self._children.get(key)
        if children is None:
            children = self._children[key] = self._children_of(*key)
        predictions, probability, degraded = children
        predictions.inc()
        probability.observe(record.fraud_probability)
        if record.degraded:
            degraded.inc()
        if record.HasField("predicted_at"):
            at = record.predicted_at
            delay = read_at.timestamp() - (at.seconds + at.nanos * 1e-9)
            self.log_delay.observe(max(delay, 0.0))

    def _children_of(
        self, model_name: str, model_version: int, route: int, flagged: bool
    ) -> tuple[Counter, Histogram, Counter]:
        """The labelled series one kind of record updates (looked up once per kind: a
        ``labels()`` call per record cost as much as the rest of ``observe``)."""
        version = (model_name, str(model_version))
        decision = "decline" if flagged else "approve"
        route_name = ROUTE_NAMES.get(route, "unspecified")
        return (
            self.predictions.labels(*version, route_name, decision),
            self.fraud_probability.labels(*version),
            self.degraded.labels(*version),
        )

    def reject(self, reason_code: str) -> None:
        """Count a record that could not be read (it stays in the log for inspection)."""
        self.rejected.labels(reason_code).inc()

    def report_lag(self, group: str, topic: str, lag_by_partition: Mapping[int, int]) -> None:
        """Replace the lag gauges with the partitions currently consumed (a rebalance may have
        moved some away: their old figures would be stale)."""
        self.consumer_lag.clear()
        for partition, lag in lag_by_partition.items():
            self.consumer_lag.labels(group, topic, str(partition)).set(max(lag, 0))
