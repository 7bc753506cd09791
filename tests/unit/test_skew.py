"""Training-serving skew without Feast: the comparison of served and recomputed model inputs
(services/shared/feature_recompute.py) and monitoring's sampling and export
(services/monitoring/skew.py), with a recomputer that answers from a table."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime, timedelta

from prometheus_client import CollectorRegistry

from services.monitoring.skew import SkewMetrics, SkewSampler
from services.shared.feature_recompute import (
    POINT_IN_TIME_OFFSET,
    Recomputed,
    ServedRow,
    as_of,
    compare,
)
from services.shared.proto.mlops.v1 import events_pb2, monitoring_pb2
from services.shared.usecase.features import MODEL_INPUTS

NOW = 1_800_000_000.0


def test_compare_flags_only_differences_beyond_the_tolerance() -> None:
    offline = [float(i) for i in range(len(MODEL_INPUTS))]
    served = dict(zip(MODEL_INPUTS, offline, strict=True))
    served[MODEL_INPUTS[3]] += 0.5
    served[MODEL_INPUTS[5]] += 5e-5  # float32 noise: equal
    del served[MODEL_INPUTS[7]]  # not logged: cannot be checked, so it counts as skew
    result = compare(served, offline)
    assert [c.name for c in result if c.skewed] == [MODEL_INPUTS[3], MODEL_INPUTS[7]]
    assert result[3].difference == 0.5
    assert result[7].served is None and result[7].difference is None


def test_the_point_in_time_is_just_before_the_event() -> None:
    event = datetime(2026, 1, 1, 12, tzinfo=UTC)
    assert as_of(event) == event - timedelta(microseconds=1) == event - POINT_IN_TIME_OFFSET


class TableRecomputer:
    """Recomputes by returning, per transaction, the served inputs with some changed."""

    def __init__(self, skewed: dict[str, set[str]]) -> None:
        self.skewed = skewed
        self.calls: list[list[str]] = []

    def recompute(self, rows: Sequence[ServedRow]) -> list[Recomputed]:
        self.calls.append([r.transaction_id for r in rows])
        out = []
        for row in rows:
            offline = [
                row.served[n] + (1.0 if n in self.skewed.get(row.transaction_id, set()) else 0.0)
                for n in MODEL_INPUTS
            ]
            out.append(
                Recomputed(
                    row.transaction_id, as_of(row.event_time), {}, compare(row.served, offline)
                )
            )
        return out


def _record(
    transaction_id: str, predicted_at: float, **fields: object
) -> monitoring_pb2.PredictionRecord:
    record = monitoring_pb2.PredictionRecord(
        transaction=events_pb2.Transaction(
            transaction_id=transaction_id,
            user_id="u",
            merchant_id="m",
            amount=10.0,
            channel="web",
            country="DE",
            event_time=datetime.fromtimestamp(predicted_at, UTC).isoformat(),
        ),
        features={name: 0.25 for name in MODEL_INPUTS},
        model_name="fraud_detector",
        model_version=1,
        **{"route": monitoring_pb2.ROUTE_PRODUCTION, **fields},  # type: ignore[arg-type]
    )
    record.predicted_at.FromSeconds(int(predicted_at))
    return record


def _sampler(
    recomputer: TableRecomputer, registry: CollectorRegistry, now: list[float], rate: float = 1.0
) -> SkewSampler:
    return SkewSampler(
        recomputer,  # type: ignore[arg-type]
        SkewMetrics(registry),
        sample_rate=rate,
        min_age_s=30,
        max_batch=2,
        max_waiting=3,
        clock=lambda: now[0],
    )


def test_sampling_is_decided_by_the_transaction_id() -> None:
    sampler = _sampler(TableRecomputer({}), CollectorRegistry(), [NOW], rate=0.1)
    keys = [f"tx-{i}".encode() for i in range(20_000)]
    chosen = [k for k in keys if sampler.wants(k)]
    assert 0.08 < len(chosen) / len(keys) < 0.12
    assert chosen == [k for k in keys if sampler.wants(k)]  # the same ones every time
    assert not sampler.wants(None)


def test_sampled_predictions_wait_then_export_skew_per_input() -> None:
    registry = CollectorRegistry()
    recomputer = TableRecomputer({"t1": {MODEL_INPUTS[0]}})
    now = [NOW]
    sampler = _sampler(recomputer, registry, now)
    sampler.offer(_record("t1", NOW - 40))
    sampler.offer(_record("t2", NOW - 35))
    sampler.offer(_record("t3", NOW - 5))  # too recent: the offline log may not have it yet
    sampler.offer(_record("s", NOW - 40, route=monitoring_pb2.ROUTE_SHADOW))
    sampler.offer(_record("d", NOW - 40, degraded=True))
    sampler.offer(_record("t4", NOW - 40))  # a fourth waiting row: over max_waiting, dropped
    sampler.offer(_record("t5", NOW - 40))

    rows = sampler.due()
    assert [r.transaction_id for r in rows] == ["t1", "t2"]  # max_batch
    sampler.compare(rows)

    def value(name: str, labels: dict[str, str]) -> float | None:
        return registry.get_sample_value(name, labels)

    assert value("mlops_monitoring_feature_skew_ratio", {"feature": MODEL_INPUTS[0]}) == 0.5
    assert value("mlops_monitoring_feature_skew_ratio", {"feature": MODEL_INPUTS[1]}) == 0.0
    assert (
        value("mlops_monitoring_feature_skew_abs_difference", {"feature": MODEL_INPUTS[0]}) == 0.5
    )
    for outcome, count in {
        "skewed": 1,
        "equal": 1,
        "skipped_shadow": 1,
        "skipped_degraded": 1,
        "dropped": 2,
    }.items():
        assert value("mlops_monitoring_skew_samples_total", {"outcome": outcome}) == count
    assert [r.transaction_id for r in sampler.due()] == []  # t3 is still too young
    now[0] += 30
    assert [r.transaction_id for r in sampler.due()] == ["t3"]


def test_a_failed_recomputation_is_counted_not_raised() -> None:
    class Broken:
        def recompute(self, rows: Sequence[ServedRow]) -> list[Recomputed]:
            raise OSError("no feature log yet")

    registry = CollectorRegistry()
    sampler = SkewSampler(
        Broken(),  # type: ignore[arg-type]
        SkewMetrics(registry),
        sample_rate=1.0,
        min_age_s=0,
        max_batch=10,
        max_waiting=10,
        clock=lambda: NOW,
    )
    sampler.offer(_record("t1", NOW - 1))
    assert sampler.compare(sampler.due()) == []
    assert (
        registry.get_sample_value("mlops_monitoring_skew_samples_total", {"outcome": "failed"}) == 1
    )
