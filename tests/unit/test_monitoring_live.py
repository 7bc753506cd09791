"""The monitoring domain without Kafka: the prediction-label join (bounds, expiry, what a
restart must re-read), live quality per version and route, paired scores, drift events with a
cooldown, and the JSON API over them."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry

from services.monitoring.api import create_app
from services.monitoring.drift import DriftConfig
from services.monitoring.live_metrics import LiveMetrics
from services.monitoring.monitor import LiveMonitor, MonitorConfig
from services.monitoring.outcomes import OutcomeJoin, Prediction
from services.shared.drift_reference import DriftReference, build_reference
from services.shared.proto.mlops.v1 import events_pb2, monitoring_pb2
from services.shared.usecase.features import MODEL_INPUTS

pytestmark = pytest.mark.unit


def _prediction(txid: str, at: float, partition: int = 0, offset: int = 0, version: int = 1,
                route: str = "production") -> Prediction:  # fmt: skip
    return Prediction(txid, "fraud", version, route, 0.1, False, at, partition, offset)


def test_join_pairs_each_version_with_the_label_and_counts_what_leaves_unmatched() -> None:
    join = OutcomeJoin(max_wait_s=100.0, max_pending=3, label_linger_s=10.0)
    assert join.add_prediction(_prediction("a", 0.0, offset=0)) == ([], [])
    assert join.add_prediction(_prediction("a", 0.0, offset=1, version=2, route="shadow")) == (
        [],
        [],
    )
    outcomes = join.add_label("a", True, 5.0, 0, 0)
    assert sorted(o.prediction.model_version for o in outcomes) == [1, 2]
    assert all(o.is_fraud for o in outcomes)
    # a late shadow score still meets the lingering label
    joined, _ = join.add_prediction(_prediction("a", 6.0, offset=2, version=3, route="shadow"))
    assert len(joined) == 1
    # capacity: the oldest goes first, counted
    for i, txid in enumerate("bcde"):
        join.add_prediction(_prediction(txid, 10.0 + i, offset=3 + i))
    assert join.counts.evicted == 1 and join.pending == 3
    # time: predictions older than max_wait_s (stream time) expire, counted
    join.add_label("zzz", False, 111.5, 0, 9)  # advances stream time; no prediction for it
    expired = join.expire()
    assert [p.transaction_id for p in expired] == ["c"]
    assert join.counts.expired == 1 and join.counts.joined == 3
    join.expire(200.0)
    assert join.counts.label_unmatched == 1  # "zzz" lingered and left alone


def test_a_replayed_shadow_score_joins_only_a_label_that_comes_after_it() -> None:
    join = OutcomeJoin(max_wait_s=100.0, max_pending=100, label_linger_s=10.0)

    def replayed(txid: str, at: float) -> Prediction:
        return Prediction(txid, "fraud", 3, "shadow", 0.2, False, at, 0, 9, replayed=True)

    # answered at 0, replayed on the new shadow at 20, labelled at 30: both versions joined
    join.add_prediction(_prediction("later", 0.0))
    join.add_prediction(replayed("later", 20.0))
    outcomes = join.add_label("later", True, 30.0, 0, 1)
    assert sorted(o.prediction.model_version for o in outcomes) == [1, 3]
    # labelled at 25 (lingering), replayed at 26: the label may be in the candidate's
    # training data, so the replayed score is not joined
    join.add_prediction(_prediction("earlier", 0.0))
    assert len(join.add_label("earlier", False, 25.0, 0, 2)) == 1
    assert join.add_prediction(replayed("earlier", 26.0)) == ([], [])
    # a re-read after a restart can bring the label after the replayed record although it
    # came first: record times decide, as the first time
    join.add_prediction(_prediction("reread", 0.0))
    join.add_prediction(replayed("reread", 40.0))
    outcomes = join.add_label("reread", False, 35.0, 0, 3)
    assert [o.prediction.model_version for o in outcomes] == [1]
    # an answer that is no longer waiting (joined, expired or evicted): nothing to join
    assert join.add_prediction(replayed("never-answered", 41.0)) == ([], [])
    assert join.counts.replayed_unused == 3 and join.counts.joined == 4
    assert join.pending == 0


def test_low_watermarks_keep_what_a_restart_must_read_again() -> None:
    join = OutcomeJoin(max_wait_s=1000.0, max_pending=100, label_linger_s=5.0)
    join.add_prediction(_prediction("a", 10.0, partition=0, offset=10))
    join.add_prediction(_prediction("b", 20.0, partition=0, offset=11))
    join.add_label("x", False, 5.0, 0, 40)  # a label from before the waiting predictions
    join.add_label("a", False, 30.0, 0, 41)
    join.expire(40.0)  # the lingering labels are gone
    prediction_mark, label_mark = join.low_watermarks([0, 1])[0]
    assert prediction_mark == 11  # "b" waits
    assert label_mark is not None and label_mark <= 41  # b's label may come after "a"'s
    assert join.low_watermarks([0, 1])[1] == (None, None)


def test_low_watermarks_are_each_partitions_oldest_waiting_entries() -> None:
    # the smallest offset still waiting per partition, on a random mix of predictions, labels,
    # evictions and expiry over four partitions (co-partitioned: a transaction's partition
    # follows from its id)
    rng = np.random.default_rng(3)
    join = OutcomeJoin(max_wait_s=50.0, max_pending=40, label_linger_s=8.0)
    offsets = [0, 0, 0, 0]
    for step in range(3000):
        number, now = int(rng.integers(400)), step / 10
        txid, partition = f"t{number}", number % 4
        offsets[partition] += 1
        if rng.random() < 0.6:
            join.add_prediction(_prediction(txid, now, partition, offsets[partition]))
        else:
            join.add_label(txid, False, now, partition, offsets[partition])
        if step % 50 == 0:
            join.expire()
        if step % 7:
            continue
        marks = join.low_watermarks([0, 1, 2, 3])
        for p in range(4):
            waiting = [x.offset for ps in join._pending.values() for x in ps if x.partition == p]
            labels = [x.offset for x in join._labels.values() if x.partition == p]
            assert marks[p][0] == min(waiting, default=None)
            if labels:
                assert marks[p][1] is not None and marks[p][1] <= min(labels)


def _record(
    txid: str, at: float, features: dict[str, float], score: float, version: int = 1
) -> monitoring_pb2.PredictionRecord:
    record = monitoring_pb2.PredictionRecord(
        transaction=events_pb2.Transaction(transaction_id=txid),
        features=features,
        fraud_probability=score,
        flagged=score >= 0.5,
        model_name="fraud",
        model_version=version,
        route=monitoring_pb2.ROUTE_PRODUCTION,
    )
    record.predicted_at.FromMilliseconds(int(at * 1000))
    return record


def _reference(rng: np.random.Generator, n: int) -> DriftReference:
    inputs = rng.normal(size=(n, len(MODEL_INPUTS)))
    scores = 1 / (1 + np.exp(-(inputs[:, 0] * 2 - 3)))
    labels = (rng.random(n) < scores).astype(np.int8)
    return build_reference(MODEL_INPUTS, inputs, scores, labels, np.ones(n, bool),
                           max_rows=n, seed=0)  # fmt: skip


def test_monitor_measures_quality_detects_drift_once_per_cooldown_and_serves_it() -> None:
    rng = np.random.default_rng(11)
    config = MonitorConfig(
        drift=DriftConfig(
            inputs=("log_amount", "amount_to_user_mean"),
            calibration_events=50_000,
            concept_warmup=500,
        ),
        min_labelled=50,
        min_positives=3,
        cooldown_s=10_000.0,
    )
    monitor = LiveMonitor(config, LiveMetrics(CollectorRegistry()))
    reference = _reference(rng, 5000)
    payload = reference.to_parquet()
    assert DriftReference.from_parquet(payload, MODEL_INPUTS).rows == 5000

    def batch(
        start: int, n: int, shift: float
    ) -> list[tuple[monitoring_pb2.PredictionRecord, int, int]]:
        x = rng.normal(size=(n, 2)) + shift
        scores = 1 / (1 + np.exp(-(x[:, 0] * 2 - 3)))
        return [
            (_record(f"t{start + i}", float(start + i),
                     {"log_amount": x[i, 0], "amount_to_user_mean": x[i, 1]}, float(scores[i])),
             (start + i) % 2, start + i)
            for i in range(n)
        ]  # fmt: skip

    first = batch(0, 2000, 0.0)
    assert monitor.add_predictions(first) == []
    assert monitor.reference_requests() == [("fraud", 1)]
    monitor.reference_loaded("fraud", 1, reference)
    for job in monitor.build_jobs():
        monitor.install_data_detectors(job.model_name, job.version, job.build())
    labels = [
        (r.transaction.transaction_id, bool(rng.random() < r.fraud_probability), i + 0.5, p, i)
        for i, (r, p, _) in enumerate(first)
    ]
    monitor.add_labels(labels)
    monitor.tick()
    figures = monitor.quality_figures()
    assert len(figures) == 1 and figures[0].status == "ok"
    assert figures[0].n_labelled == 2000 and figures[0].label_coverage == 1.0
    assert figures[0].pr_auc is not None and figures[0].pr_auc > 0.3

    assert monitor.add_predictions(batch(2000, 20_000, 0.0)) == []  # stationary: nothing
    events = monitor.add_predictions(batch(22_000, 3000, 0.8))
    assert events, "a shift of 0.8 sd on both inputs must be seen within 3000 events"
    # the score is a function of log_amount here: it moves too
    assert {e.kind for e in events} == {"data", "score"}
    assert all(e.model_version == 1 for e in events)
    assert len({e.signal for e in events}) == len(events)  # one event per signal (cooldown)
    assert monitor.add_predictions(batch(25_000, 3000, 0.8)) == []  # still in its cooldown
    # a signal in its cooldown is held at 0: a lasting shift costs no re-alarms per row
    detectors = monitor.production["fraud"].data
    assert detectors is not None and not detectors.per_input.statistic.any()
    assert detectors.pooled.statistic == 0.0 and not detectors.score.statistic.any()
    again = monitor.add_predictions(batch(40_000, 3000, 0.8))  # cooldown (10,000 s) over
    assert {e.signal for e in again} == {e.signal for e in events}

    client = TestClient(create_app(monitor))
    drift = client.get("/api/v1/drift").json()
    drifting = {s["signal"] for s in drift["signals"] if s["drifting"]}
    assert drifting == {e.signal for e in events}
    assert drift["recent_events"][0]["model_version"] == 1
    quality = client.get("/api/v1/quality").json()
    assert quality["versions"][0]["route"] == "production"
    assert client.get("/api/v1/paired", params={"model_name": "fraud", "baseline": 1,
                                                "candidate": 2}).json()["n"] == 0  # fmt: skip
    assert client.get("/api/v1/paired", params={"model_name": "fraud"}).status_code == 422


def test_paired_scores_return_transactions_both_versions_scored() -> None:
    from services.monitoring.outcomes import Outcome
    from services.monitoring.quality import PairedScores

    pairs = PairedScores(capacity=3)
    for i in range(5):
        pairs.add(Outcome(_prediction(f"t{i}", i, version=1), i % 2 == 0, i + 1.0))
        if i != 3:
            shadow = replace(_prediction(f"t{i}", i, version=2, route="shadow"), flagged=i == 4)
            pairs.add(Outcome(shadow, i % 2 == 0, i + 1.0))
    paired = pairs.paired("fraud", 1, 2, limit=10)
    assert paired["transaction_ids"] == ["t2", "t4"]  # t3 has no shadow score; t0, t1 rolled off
    assert paired["labels"] == [1, 1] and paired["n"] == 2
    # each version's decision at its own threshold, for the shadow judge's decision check
    assert paired["baseline_flagged"] == [False, False]
    assert paired["candidate_flagged"] == [False, True]


def test_a_concept_drifts_onset_is_when_the_transactions_changed_not_when_labels_came() -> None:
    # labels come 1,000 s after their predictions; the frauds scored from prediction 6,000 on
    # look legitimate. A drift-triggered training splits its data at the event's onset by the
    # transactions' time: an onset on the labels' clock left it nothing after the onset
    rng = np.random.default_rng(5)
    config = MonitorConfig(
        drift=DriftConfig(
            inputs=("log_amount",), calibration_events=50_000, concept_warmup=500, rank_warmup=30
        ),
        join_max_wait_s=1e9,
    )
    monitor = LiveMonitor(config, LiveMetrics(CollectorRegistry()))
    change, n, delay = 6000, 12_000, 1000.0
    frauds = rng.random(n) < 0.05
    scores = np.where(
        frauds & (np.arange(n) < change), rng.beta(8, 2, size=n), rng.beta(2, 8, size=n)
    )
    records = [
        (_record(f"t{i}", float(i), {"log_amount": 0.0}, float(scores[i])), i % 2, i)
        for i in range(n)
    ]
    monitor.add_predictions(records)
    events = monitor.add_labels([(f"t{i}", bool(frauds[i]), i + delay, i % 2, i) for i in range(n)])
    concept = [e for e in events if e.kind == "concept"]
    assert concept, [e.signal for e in events]
    first = concept[0]
    assert first.detected_at.ToSeconds() >= change + delay  # seen on the labels' clock
    assert change - 500 <= first.onset_at.ToSeconds() < change + 500  # dated on the traffic's
