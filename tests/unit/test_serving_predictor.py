"""The Predictor's logic with in-memory stand-ins for the online store and Triton."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from aiokafka import AIOKafkaProducer
from prometheus_client import REGISTRY

from services.serving.prediction_log import PredictionLog, RecordEncoder
from services.serving.predictor import Predictor
from services.serving.routing import CanaryRouter, RoutingTable, ServedModel, user_bucket
from services.serving.scoring import VersionNotServed
from services.shared.errors import InvalidArgument, Unavailable
from services.shared.proto.mlops.v1 import events_pb2, monitoring_pb2
from services.shared.usecase.features import (
    MERCHANT_FEATURES,
    MODEL_INPUTS,
    USER_FEATURES,
    TransactionColumns,
    model_inputs,
)

PRODUCTION = ServedModel(1, "production", 100, 0.5)
CANARY = ServedModel(2, "canary", 50, 0.3)
SHADOW = ServedModel(3, "shadow", 0, 0.9)


class FakeFeatures:
    """The online store as a dict; ``down`` makes every read fail as Redis would."""

    layout = SimpleNamespace(join_keys=["user_id", "merchant_id"])

    def __init__(self, rows: dict[str, dict[str, Any]] | None = None) -> None:
        self.rows = rows or {}
        self.down = False
        self.reads: list[int] = []

    async def read(self, entities: dict[str, list[str]], timeout_s: float | None = None) -> Any:
        if self.down:
            raise Unavailable("online store unavailable")
        n = len(entities["user_id"])
        self.reads.append(n)
        columns: dict[str, list[Any]] = {}
        for name in USER_FEATURES:
            columns[name] = [self.rows.get(u, {}).get(name) for u in entities["user_id"]]
        for name in MERCHANT_FEATURES:
            columns[name] = [self.rows.get(m, {}).get(name) for m in entities["merchant_id"]]
        return columns


def score_of(version: int, matrix: np.ndarray) -> np.ndarray:
    """A deterministic stand-in model: different per version, depends on every input."""
    weights = np.linspace(0.05, 0.2, matrix.shape[1]) * version
    return (1 / (1 + np.exp(-(matrix @ weights - 1.0)))).astype(np.float32)


class FakeScorer:
    def __init__(self) -> None:
        self.calls: list[tuple[int, int]] = []
        self.hang: set[int] = set()
        self.fail: set[int] = set()
        self.unloaded: set[int] = set()
        self.before_fail: Any = None

    async def score(self, version: int, features: np.ndarray, timeout_s: float) -> np.ndarray:
        self.calls.append((version, features.shape[0]))
        if version in self.hang:
            await asyncio.sleep(3600)
        if version in self.fail:
            raise Unavailable(f"Triton down while scoring version {version}")
        if version in self.unloaded:
            if self.before_fail is not None:
                self.before_fail()
            raise VersionNotServed(f"version {version} is not loaded")
        return score_of(version, features)


def producer_never_used() -> AIOKafkaProducer:
    raise AssertionError("unit tests never start the prediction log")


def pending(log: PredictionLog) -> list[monitoring_pb2.PredictionRecord]:
    """What the log would send, parsed back."""
    encoder = RecordEncoder()
    return [
        monitoring_pb2.PredictionRecord.FromString(raw)
        for batch in log.take(10**9)
        for raw in encoder.encode_batch(batch)
    ]


def make(
    table: RoutingTable | None = None,
    *,
    features: FakeFeatures | None = None,
    degrade: bool = True,
    capacity: int = 1000,
) -> tuple[Predictor, FakeFeatures, FakeScorer, PredictionLog]:
    features = features or FakeFeatures()
    scorer = FakeScorer()
    log = PredictionLog(producer_never_used, "predictions.log", capacity=capacity)
    predictor = Predictor(
        model_name="fraud_detector",
        router=CanaryRouter(table or RoutingTable(production=PRODUCTION)),
        features=features,  # type: ignore[arg-type]
        scorer=scorer,  # type: ignore[arg-type]
        prediction_log=log,
        batch_max_delay_s=0.001,
        degrade_without_features=degrade,
    )
    return predictor, features, scorer, log


def txn(user: str = "u-1", merchant: str = "m-1", **overrides: Any) -> events_pb2.Transaction:
    fields: dict[str, Any] = {
        "transaction_id": f"t-{user}-{overrides.get('amount', 10.0)}",
        "user_id": user,
        "merchant_id": merchant,
        "amount": 10.0,
        "currency": "EUR",
        "channel": "pos",
        "country": "DE",
        "event_time": (datetime.now(UTC) - timedelta(seconds=30)).isoformat(),
    }
    fields.update(overrides)
    return events_pb2.Transaction(**fields)


def expected_inputs(
    txns: list[events_pb2.Transaction], rows: dict[str, dict[str, Any]]
) -> np.ndarray:
    online = {n: [rows.get(t.user_id, {}).get(n) for t in txns] for n in USER_FEATURES}
    online.update(
        {n: [rows.get(t.merchant_id, {}).get(n) for t in txns] for n in MERCHANT_FEATURES}
    )
    return model_inputs(
        TransactionColumns(
            amount=np.array([t.amount for t in txns]),
            channel=[t.channel for t in txns],
            country=[t.country for t in txns],
            event_time_epoch=np.array(
                [datetime.fromisoformat(t.event_time).timestamp() for t in txns]
            ),
        ),
        online,
    )


ROWS = {
    "u-1": {
        "user_txn_count_24h": 7,
        "user_amount_mean_7d": 3.0,
        "user_home_country": "FR",
        "user_last_txn_epoch": time.time() - 120,
    },
    "m-1": {"merchant_txn_count_24h": 40, "merchant_fraud_rate_7d": 0.2},
}


async def test_concurrent_requests_share_one_feature_read_and_one_triton_call() -> None:
    predictor, features, scorer, log = make(features=FakeFeatures(ROWS))
    txns = [txn("u-1", amount=float(10 + i)) for i in range(12)]
    answers = await asyncio.gather(*(predictor.predict(t, f"r{i}") for i, t in enumerate(txns)))
    assert features.reads == [12]
    assert scorer.calls == [(1, 12)]
    expected = score_of(1, expected_inputs(txns, ROWS))
    np.testing.assert_allclose([a.fraud_probability for a in answers], expected, rtol=1e-6)
    for i, answer in enumerate(answers):
        assert answer.request_id == f"r{i}"
        assert answer.transaction_id == txns[i].transaction_id
        assert answer.model_name == "fraud_detector"
        assert (answer.model_version, answer.route) == (1, monitoring_pb2.ROUTE_PRODUCTION)
        assert answer.declined == (answer.fraud_probability >= PRODUCTION.threshold)
        assert not answer.degraded
    entries = pending(log)
    assert [e.request_id for e in entries] == [f"r{i}" for i in range(12)]
    record = entries[3]
    assert record.transaction == txns[3]
    assert record.fraud_probability == pytest.approx(answers[3].fraud_probability)
    assert record.flagged == answers[3].declined
    assert (record.model_version, record.route, record.degraded) == (
        1,
        monitoring_pb2.ROUTE_PRODUCTION,
        False,
    )
    assert set(record.features) == set(MODEL_INPUTS)
    np.testing.assert_allclose(
        [record.features[n] for n in MODEL_INPUTS], expected_inputs([txns[3]], ROWS)[0], rtol=1e-6
    )
    assert record.latency_ms > 0
    assert record.predicted_at.seconds > 0


async def test_canary_users_get_the_canary_and_its_threshold() -> None:
    table = RoutingTable(production=PRODUCTION, canary=CANARY)
    predictor, _, scorer, _ = make(table)
    users = [f"user-{i}" for i in range(40)]
    answers = await asyncio.gather(*(predictor.predict(txn(u)) for u in users))
    for user, answer in zip(users, answers, strict=True):
        on_canary = user_bucket(user) < CANARY.traffic_percent * 100
        assert answer.model_version == (2 if on_canary else 1)
        assert answer.route == (
            monitoring_pb2.ROUTE_CANARY if on_canary else monitoring_pb2.ROUTE_PRODUCTION
        )
        threshold = CANARY.threshold if on_canary else PRODUCTION.threshold
        assert answer.declined == (answer.fraud_probability >= threshold)
    assert sorted(v for v, _ in scorer.calls) == [1, 2]  # one call per version


async def test_without_the_online_store_answers_use_defaults_and_say_degraded() -> None:
    features = FakeFeatures(ROWS)
    features.down = True
    predictor, _, _, log = make(features=features)
    before = REGISTRY.get_sample_value("mlops_serving_degraded_total") or 0.0
    transaction = txn("u-1")
    answer = await predictor.predict(transaction)
    assert answer.degraded
    expected = score_of(1, expected_inputs([transaction], {}))
    assert answer.fraud_probability == pytest.approx(float(expected[0]))
    assert pending(log)[0].degraded
    assert REGISTRY.get_sample_value("mlops_serving_degraded_total") == before + 1


async def test_without_the_online_store_answers_can_fail_instead() -> None:
    features = FakeFeatures()
    features.down = True
    predictor, _, _, log = make(features=features, degrade=False)
    with pytest.raises(Unavailable, match="online store"):
        await predictor.predict(txn())
    assert pending(log) == []


async def test_a_hung_model_is_unavailable_within_the_callers_time() -> None:
    predictor, _, scorer, _ = make()
    scorer.hang.add(1)
    started = time.monotonic()
    with pytest.raises(Unavailable, match="within the deadline"):
        await predictor.predict(txn(), timeout_s=0.1)
    # the model hangs forever: returning at all means the deadline held (slack for a busy CI)
    assert time.monotonic() - started < 2.0


async def test_a_failing_model_is_unavailable() -> None:
    predictor, _, scorer, _ = make()
    scorer.fail.add(1)
    started = time.monotonic()
    with pytest.raises(Unavailable, match="Triton down"):
        await predictor.predict(txn(), timeout_s=20.0)
    # no waiting for a switch (Triton is down): far sooner than the 20 s a wait would take
    assert time.monotonic() - started < 10.0


async def test_rows_of_a_version_switched_away_are_rescored_on_the_new_table() -> None:
    predictor, _, scorer, _ = make()
    scorer.unloaded.add(1)
    # the switch lands while the batch waits for version 1, which Triton has just unloaded
    new = ServedModel(4, "production", 100, 0.5)
    scorer.before_fail = lambda: predictor.router.update(RoutingTable(production=new))
    answer = await predictor.predict(txn())
    assert answer.model_version == 4
    assert [v for v, _ in scorer.calls] == [1, 4]


async def test_rows_wait_for_the_routing_event_when_triton_switched_first() -> None:
    predictor, _, scorer, _ = make()
    scorer.unloaded.add(1)
    new = ServedModel(5, "production", 100, 0.5)
    loop = asyncio.get_running_loop()
    scorer.before_fail = lambda: loop.call_later(
        0.05, predictor.router.update, RoutingTable(production=new)
    )
    answer = await predictor.predict(txn(), timeout_s=2.0)
    assert answer.model_version == 5


async def test_without_a_routing_event_an_unserved_version_is_unavailable() -> None:
    predictor, _, scorer, _ = make()
    scorer.unloaded.add(1)
    started = time.monotonic()
    with pytest.raises(Unavailable, match="version 1 is not loaded"):
        await predictor.predict(txn(), timeout_s=0.2)
    # the wait for a routing event is bounded by the caller's deadline (slack for a busy CI)
    assert time.monotonic() - started < 2.0


async def test_the_shadow_is_scored_and_logged_but_never_answers() -> None:
    predictor, _, scorer, log = make(RoutingTable(production=PRODUCTION, shadow=SHADOW))
    answers = await asyncio.gather(*(predictor.predict(txn(f"s-{i}"), f"r{i}") for i in range(5)))
    assert all(a.model_version == 1 and a.route == monitoring_pb2.ROUTE_PRODUCTION for a in answers)
    await predictor.close()  # waits for the shadow scoring
    entries = pending(log)
    shadows = [e for e in entries if e.route == monitoring_pb2.ROUTE_SHADOW]
    assert sorted(e.request_id for e in shadows) == [f"r{i}" for i in range(5)]
    assert all(e.model_version == 3 for e in shadows)
    assert all(e.flagged == (e.fraud_probability >= SHADOW.threshold) for e in shadows)
    assert (3, 5) in scorer.calls


async def test_a_failing_shadow_changes_nothing_for_callers() -> None:
    predictor, _, scorer, log = make(RoutingTable(production=PRODUCTION, shadow=SHADOW))
    scorer.unloaded.add(3)
    answer = await predictor.predict(txn(), "r1")
    await predictor.close()
    assert answer.model_version == 1
    assert [e.route for e in pending(log)] == [monitoring_pb2.ROUTE_PRODUCTION]


async def test_a_new_shadow_scores_the_recent_answers_inputs_marked_replayed() -> None:
    predictor, _, scorer, log = make()
    txns = [txn(f"p-{i}") for i in range(6)]
    for i, t in enumerate(txns):  # a batch each
        await predictor.predict(t, f"r{i}")
    answered = {e.request_id: e for e in pending(log)}
    assert len(answered) == 6
    predictor.router.update(RoutingTable(production=PRODUCTION, shadow=SHADOW))
    await predictor.replay_done()  # the replay is a task of its own
    await predictor.close()
    assert [c for c in scorer.calls if c[0] == 3] == [(3, 6)]  # one Triton call for all
    replayed = pending(log)
    assert sorted(e.request_id for e in replayed) == [f"r{i}" for i in range(6)]
    for entry in replayed:
        original = answered[entry.request_id]
        assert entry.replayed and entry.route == monitoring_pb2.ROUTE_SHADOW
        assert entry.model_version == 3 and entry.latency_ms == 0.0
        assert entry.transaction == original.transaction
        assert dict(entry.features) == pytest.approx(dict(original.features))
        inputs = np.array([[original.features[n] for n in MODEL_INPUTS]], np.float32)
        assert entry.fraud_probability == pytest.approx(float(score_of(3, inputs)[0]), rel=1e-6)
        assert entry.flagged == (entry.fraud_probability >= SHADOW.threshold)
        assert entry.predicted_at.ToSeconds() >= original.predicted_at.ToSeconds()
    assert not any(e.replayed for e in answered.values())


async def test_a_replay_keeps_only_the_window_and_skips_the_shadows_own_answers() -> None:
    features = FakeFeatures()
    scorer = FakeScorer()
    log = PredictionLog(producer_never_used, "predictions.log", capacity=1000)
    canary_all = ServedModel(3, "canary", 100, 0.9)
    router = CanaryRouter(RoutingTable(production=PRODUCTION, canary=canary_all))
    predictor = Predictor(
        model_name="fraud_detector",
        router=router,
        features=features,  # type: ignore[arg-type]
        scorer=scorer,  # type: ignore[arg-type]
        prediction_log=log,
        batch_max_delay_s=0.001,
        shadow_replay_max_rows=3,
    )
    for i in range(5):  # one batch each; only the newest 3 rows are kept
        await predictor.predict(txn(f"c-{i}"), f"c{i}")
    router.update(RoutingTable(production=PRODUCTION))
    await predictor.predict(txn("p-0"), "p0")
    log.take(10**9)
    # v3 answered c0-c4 itself (as the canary): a shadow v3 has nothing of them to replay
    router.update(RoutingTable(production=PRODUCTION, shadow=SHADOW))
    await predictor.replay_done()
    await predictor.close()
    assert [(e.request_id, e.replayed) for e in pending(log)] == [("p0", True)]


async def test_no_replay_when_off_or_when_the_shadow_stays() -> None:
    predictor, _, _, log = make(RoutingTable(production=PRODUCTION, shadow=SHADOW))
    await predictor.predict(txn(), "r1")
    await predictor.close()
    log.take(10**9)
    predictor.router.update(RoutingTable(production=PRODUCTION, shadow=SHADOW))  # same shadow
    await predictor.replay_done()
    assert pending(log) == []

    off = Predictor(
        model_name="fraud_detector",
        router=CanaryRouter(RoutingTable(production=PRODUCTION)),
        features=FakeFeatures(),  # type: ignore[arg-type]
        scorer=FakeScorer(),  # type: ignore[arg-type]
        prediction_log=log,
        shadow_replay_s=0,
    )
    await off.predict(txn(), "r2")
    log.take(10**9)
    off.router.update(RoutingTable(production=PRODUCTION, shadow=SHADOW))
    await off.replay_done()
    await off.close()
    assert pending(log) == []


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"amount": 0.0}, "transaction.amount: must be greater than 0"),
        ({"currency": "euro"}, "transaction.currency: "),
        ({"merchant_id": ""}, "transaction.merchant_id: is required"),
        (
            {"event_time": (datetime.now(UTC) + timedelta(hours=1)).isoformat()},
            "transaction.event_time: ",
        ),
    ],
)
async def test_invalid_transactions_name_the_field(overrides: dict[str, Any], message: str) -> None:
    predictor, _, scorer, _ = make()
    with pytest.raises(InvalidArgument) as caught:
        await predictor.predict(txn(**overrides))
    assert str(caught.value).startswith(message)
    assert scorer.calls == []


async def test_a_missing_transaction_is_named() -> None:
    predictor, _, _, _ = make()
    with pytest.raises(InvalidArgument, match=r"^transaction: is required$"):
        await predictor.predict(None)


async def test_batches_answer_in_order_and_name_the_bad_item() -> None:
    predictor, _, _, _ = make()
    txns = [txn(f"b-{i}", amount=float(i + 1)) for i in range(5)]
    answers = await predictor.predict_many([(t, "") for t in txns])
    assert [a.transaction_id for a in answers] == [t.transaction_id for t in txns]
    assert len({a.request_id for a in answers}) == 5  # generated, all different
    with pytest.raises(InvalidArgument, match=r"^requests\[2\]\.transaction\.amount: "):
        await predictor.predict_many([(txns[0], ""), (txns[1], ""), (txn(amount=-1.0), "")])


async def test_no_time_left_is_refused_up_front() -> None:
    predictor, _, scorer, _ = make()
    with pytest.raises(Exception, match="deadline"):
        await predictor.predict(txn(), timeout_s=0.001)
    assert scorer.calls == []


async def test_a_full_prediction_log_drops_and_counts_instead_of_waiting() -> None:
    predictor, _, _, log = make(capacity=3)
    before = REGISTRY.get_sample_value("mlops_serving_prediction_log_dropped_total") or 0.0
    answers = await asyncio.gather(*(predictor.predict(txn(f"d-{i}")) for i in range(5)))
    assert len(answers) == 5
    assert log.dropped == 2
    assert len(pending(log)) == 3
    assert REGISTRY.get_sample_value("mlops_serving_prediction_log_dropped_total") == before + 2


async def test_after_one_vain_wait_an_unserved_version_fails_at_once() -> None:
    predictor, _, scorer, _ = make()
    scorer.unloaded.add(1)
    with pytest.raises(Unavailable):
        await predictor.predict(txn(), timeout_s=0.2)
    started = time.monotonic()
    with pytest.raises(Unavailable, match="version 1 is not loaded"):
        await predictor.predict(txn(), timeout_s=20.0)
    # no second wait: far sooner than the 20 s deadline a wait would use up
    assert time.monotonic() - started < 10.0
