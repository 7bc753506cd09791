"""The traffic simulator (services/cli/simulator.py): determinism, realism, fraud
patterns, drift, and invalid/duplicate records that ingestion must catch."""

from __future__ import annotations

import itertools
import json
import statistics
from collections import Counter
from datetime import UTC, datetime, timedelta

import pytest

from services.cli.simulate import record_value
from services.cli.simulator import (
    SimEvent,
    SimulationConfig,
    TrafficSimulator,
    daily_rhythm,
)
from services.shared.codecs import decode_external
from services.shared.errors import InvalidArgument
from services.shared.proto.mlops.v1 import events_pb2
from services.shared.usecase.schemas import validate_label, validate_transaction

END = datetime(2025, 3, 10, tzinfo=UTC)
SMALL = SimulationConfig(seed=3, users=300, merchants=60, transactions_per_user_per_day=4)


def _history(config: SimulationConfig, days: float = 2.0) -> list[SimEvent]:
    return list(TrafficSimulator(config).history(END - timedelta(days=days), END))


def _transactions(events: list[SimEvent]) -> list[SimEvent]:
    return [e for e in events if e.kind == "transaction" and e.expect == "valid"]


def test_the_same_seed_and_start_give_the_same_events() -> None:
    first = _history(SMALL, 1)
    assert first == _history(SMALL, 1)
    other = _history(SMALL.model_copy(update={"seed": 4}), 1)
    assert [e.value for e in first[:50]] != [e.value for e in other[:50]]


def test_users_and_merchants_are_stable_across_runs_but_transaction_ids_are_not() -> None:
    sim = TrafficSimulator(SMALL)
    a = _transactions(list(sim.history(END - timedelta(days=1), END)))
    b = _transactions(list(sim.live(END, max_transactions=200)))
    assert {e.value["user_id"] for e in a} & {e.value["user_id"] for e in b}
    assert not {e.value["transaction_id"] for e in a} & {e.value["transaction_id"] for e in b}
    assert TrafficSimulator(SMALL).users == sim.users


def test_history_is_in_time_order_within_its_window_and_every_record_is_valid() -> None:
    events = _history(SMALL, 2)
    assert all(a.at <= b.at for a, b in itertools.pairwise(events))
    assert events[0].at >= END - timedelta(days=2) and events[-1].at <= END
    now = END + timedelta(seconds=1)
    for event in events:
        data = decode_external(record_value(event), None, events_pb2.Transaction)
        if event.kind == "transaction":
            valid = validate_transaction(data, now=now)
            assert valid.event_time == event.at.replace(
                microsecond=event.at.microsecond // 1000 * 1000
            )
            assert event.key == valid.user_id
        else:
            assert validate_label(data, now=now).transaction_id == event.key


def test_every_transaction_gets_exactly_one_label_after_it() -> None:
    events = _history(SMALL, 2)
    seen: dict[str, SimEvent] = {}
    labels: Counter[str] = Counter()
    for event in events:
        if event.kind == "transaction":
            seen[event.value["transaction_id"]] = event
        else:
            transaction = seen[event.key]  # the label never precedes its transaction
            assert event.value["is_fraud"] == transaction.is_fraud
            assert event.at >= transaction.at
            labels[event.key] += 1
    assert set(labels) == set(seen)
    assert set(labels.values()) == {1}


def test_label_delay_is_configurable() -> None:
    config = SMALL.model_copy(update={"label_delay_s": 600.0})
    events = list(TrafficSimulator(config).live(END, max_transactions=300))
    when = {e.value["transaction_id"]: e.at for e in events if e.kind == "transaction"}
    delays = [(e.at - when[e.key]).total_seconds() for e in events if e.kind == "label"]
    assert min(delays) >= 300 and max(delays) <= 900
    assert 500 < statistics.mean(delays) < 700


@pytest.mark.parametrize("fraud_rate", [0.02, 0.05])
def test_the_fraud_rate_is_as_configured(fraud_rate: float) -> None:
    config = SimulationConfig(seed=11, fraud_rate=fraud_rate, users=1000)
    transactions = _transactions(_history(config, 10))
    share = sum(bool(e.is_fraud) for e in transactions) / len(transactions)
    assert len(transactions) == pytest.approx(1000 * 3 * 10, rel=0.03)
    assert share == pytest.approx(fraud_rate, rel=0.2)


def test_live_traffic_has_the_fraud_rate_from_its_first_minute() -> None:
    # fraud episodes begun before the start go on into it: a fresh `mlops simulate` is not a
    # quiet stretch (a cold start had 2 % fraud in the first minute of a 5 % world)
    config = SimulationConfig(
        seed=42, users=400, transactions_per_user_per_day=2160, fraud_rate=0.05
    )
    first_minute = [
        e
        for second in range(8)
        for e in _transactions(
            list(TrafficSimulator(config).live(END + timedelta(seconds=second), duration_s=60))
        )
    ]
    share = sum(bool(e.is_fraud) for e in first_minute) / len(first_minute)
    assert len(first_minute) > 4000
    assert 0.04 < share < 0.065


def test_the_concept_shift_is_abrupt_and_keeps_the_fraud_rate() -> None:
    # at --concept-drift-at the fraudsters switch at once: from the onset every fraud follows the
    # new pattern (small pos payments at home) and fraud stays at its rate (growing the new
    # pattern from nothing had ~1 % fraud for minutes: the shift first looked like an improvement)
    config = SimulationConfig(
        seed=43,
        users=400,
        transactions_per_user_per_day=2160,
        fraud_rate=0.05,
        concept_drift_at=300.0,
    )
    onset = timedelta(seconds=300)
    after: list[SimEvent] = []
    for second in range(6):
        start = END + timedelta(seconds=second)
        events = _transactions(list(TrafficSimulator(config).live(start, duration_s=420)))
        after += [e for e in events if start + onset <= e.at < start + onset + timedelta(minutes=2)]
    fraud = [e for e in after if e.is_fraud]
    assert len(after) > 6000
    assert 0.04 < len(fraud) / len(after) < 0.065
    assert {e.value["channel"] for e in fraud} == {"pos"}


def test_with_the_daily_rhythm_there_is_more_traffic_by_day_than_at_night() -> None:
    rhythmic = SMALL.model_copy(update={"daily_rhythm": True})
    hours = Counter(e.at.hour for e in _transactions(_history(rhythmic, 4)))
    assert sum(hours[h] for h in (12, 13, 14)) > 3 * sum(hours[h] for h in (2, 3, 4))
    assert daily_rhythm(datetime(2025, 1, 1, 3, tzinfo=UTC)) < daily_rhythm(
        datetime(2025, 1, 1, 13, tzinfo=UTC)
    )
    # live traffic follows the same rhythm (at its wall-clock hours)
    night = _transactions(list(TrafficSimulator(rhythmic).live(END, duration_s=3 * 3600)))
    noon = _transactions(
        list(TrafficSimulator(rhythmic).live(END + timedelta(hours=12), duration_s=3 * 3600))
    )
    assert len(noon) > 3 * len(night)


def test_live_traffic_continues_the_history_at_the_same_per_user_rate() -> None:
    # the per-user rate sets every 1 h / 24 h count the model sees: live traffic at another
    # rate than the history the model was trained on is a different world (its inputs drift)
    days = 2.0
    history = _transactions(_history(SMALL, days))
    sim = TrafficSimulator(SMALL)
    assert sim.live_rate == pytest.approx(300 * 4 / 86_400)
    live = _transactions(list(sim.live(END, duration_s=days * 86_400)))
    assert len(live) == pytest.approx(len(history), rel=0.05)
    # without the rhythm, night and day are alike in both
    hours = Counter(e.at.hour for e in history)
    assert sum(hours[h] for h in (12, 13, 14)) == pytest.approx(
        sum(hours[h] for h in (2, 3, 4)), rel=0.2
    )


def _profile(events: list[SimEvent], sim: TrafficSimulator) -> dict[str, float]:
    users = {u.user_id: u for u in sim.users}
    fraud = [e for e in events if e.is_fraud]
    legit = [e for e in events if not e.is_fraud]

    def foreign(es: list[SimEvent]) -> float:
        return sum(e.value["country"] != users[e.key].country for e in es) / len(es)

    def ratio(es: list[SimEvent]) -> float:
        return statistics.median(e.value["amount"] / users[e.key].typical_amount for e in es)

    def pos(es: list[SimEvent]) -> float:
        return sum(e.value["channel"] == "pos" for e in es) / len(es)

    return {
        "fraud_foreign": foreign(fraud),
        "legit_foreign": foreign(legit),
        "fraud_ratio": ratio(fraud),
        "legit_ratio": ratio(legit),
        "fraud_pos": pos(fraud),
        "legit_pos": pos(legit),
    }


def test_fraud_has_recognisable_patterns_until_the_concept_drifts() -> None:
    config = SimulationConfig(seed=5, users=1000, fraud_rate=0.05, concept_drift_at=4 * 86400)
    sim = TrafficSimulator(config)
    start = END - timedelta(days=8)
    events = _transactions(list(sim.history(start, END)))
    before = _profile([e for e in events if e.at < start + timedelta(days=4)], sim)
    after = _profile([e for e in events if e.at >= start + timedelta(days=4, hours=1)], sim)
    # before: abroad, large, web/app
    assert before["fraud_foreign"] > 0.5
    assert before["legit_foreign"] < 0.1
    assert before["fraud_ratio"] > 3 * before["legit_ratio"]
    assert before["fraud_pos"] < 0.15
    # after: home country, small, pos
    assert after["fraud_foreign"] < 0.05
    assert after["fraud_ratio"] < before["legit_ratio"]
    assert after["fraud_pos"] == 1.0


def test_fraud_comes_in_bursts_on_one_card() -> None:
    sim = TrafficSimulator(SimulationConfig(seed=8, fraud_rate=0.05))
    fraud = [
        e for e in _transactions(list(sim.history(END - timedelta(days=3), END))) if e.is_fraud
    ]
    gaps = []
    by_user: dict[str, list[datetime]] = {}
    for e in fraud:
        by_user.setdefault(e.key, []).append(e.at)
    for times in by_user.values():
        gaps += [(b - a).total_seconds() for a, b in itertools.pairwise(times)]
    assert statistics.median(gaps) < 120  # minutes apart, not hours


def test_data_drift_doubles_amounts_and_moves_channels_to_web() -> None:
    config = SimulationConfig(seed=9, data_drift_at=3600.0, rate=4.0, fraud_rate=0.0)
    events = _transactions(list(TrafficSimulator(config).live(END, duration_s=7200)))
    before = [e for e in events if e.at < END + timedelta(seconds=3600)]
    after = [e for e in events if e.at >= END + timedelta(seconds=3600)]
    median_before = statistics.median(e.value["amount"] for e in before)
    median_after = statistics.median(e.value["amount"] for e in after)
    assert median_after / median_before == pytest.approx(2.0, rel=0.1)

    def web(es: list[SimEvent]) -> float:
        return sum(e.value["channel"] == "web" for e in es) / len(es)

    assert web(after) > web(before) + 0.1


def test_live_traffic_runs_at_the_configured_rate_and_stops_when_asked() -> None:
    config = SMALL.model_copy(update={"rate": 40.0, "label_delay_s": 10.0})
    events = list(TrafficSimulator(config).live(END, duration_s=300))
    transactions = [e for e in events if e.kind == "transaction"]
    assert len(transactions) == pytest.approx(40 * 300, rel=0.05)
    assert all(e.at <= END + timedelta(seconds=300) for e in transactions)
    assert sum(e.kind == "label" for e in events) == len(transactions)
    counted = list(TrafficSimulator(config).live(END, max_transactions=123))
    assert sum(e.kind == "transaction" for e in counted) == 123


def test_invalid_records_carry_the_reason_ingestion_will_give() -> None:
    config = SMALL.model_copy(update={"invalid_fraction": 0.5})
    events = list(TrafficSimulator(config).live(END, max_transactions=600))
    invalid = [e for e in events if e.expect == "invalid"]
    assert 200 < len(invalid) < 400
    codes = Counter()
    for event in invalid:
        with pytest.raises(InvalidArgument) as caught:
            data = decode_external(record_value(event), None, events_pb2.Transaction)
            validate_transaction(data, now=END + timedelta(hours=1))
        assert caught.value.code == event.reason_code
        codes[event.reason_code] += 1
    assert set(codes) >= {
        "missing_field",
        "invalid_type",
        "out_of_range",
        "invalid_value",
        "event_in_future",
        "invalid_time",
        "unknown_field",
        "too_long",
        "malformed_json",
        "not_an_object",
    }
    # no label for a transaction that was never valid
    invalid_ids = {e.value.get("transaction_id") for e in invalid}
    assert not invalid_ids & {e.key for e in events if e.kind == "label"}


def test_duplicates_are_the_same_transaction_sent_again_later() -> None:
    config = SMALL.model_copy(update={"duplicate_fraction": 0.2})
    events = list(TrafficSimulator(config).live(END, max_transactions=500))
    originals = {
        e.value["transaction_id"]: e
        for e in events
        if e.kind == "transaction" and e.expect == "valid"
    }
    copies = [e for e in events if e.expect == "duplicate"]
    assert 50 < len(copies) < 150
    for copy in copies:
        original = originals[copy.value["transaction_id"]]
        assert record_value(copy) == record_value(original) and copy.key == original.key
        assert copy.at > original.at
    assert sum(e.kind == "label" for e in events) == len(originals)


def test_records_are_compact_utf8_json() -> None:
    event = _transactions(_history(SMALL, 0.1))[0]
    raw = record_value(event)
    assert json.loads(raw.decode("utf-8")) == event.value
    assert b" " not in raw
    assert event.value["event_time"].endswith("Z")


def test_config_is_validated() -> None:
    with pytest.raises(ValueError, match="fraud_rate"):
        SimulationConfig(fraud_rate=0.9)
    with pytest.raises(ValueError, match="users"):
        SimulationConfig(users=0)
