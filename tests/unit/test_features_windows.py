"""Event-time window logic of the features service (services/features/windows.py)."""

from __future__ import annotations

import math
import random
from collections import Counter
from typing import Any

import pytest
from doubles import MemoryRecordLog

from services.features.events import MerchantFact, TransactionEvent
from services.features.windows import (
    MerchantActivity,
    Outcome,
    UserActivity,
    WindowPolicy,
)
from services.shared.usecase.features import DAY_US, HOUR_US, WEEK_US

T0 = 1_767_225_600_000_000  # 2026-01-01T00:00:00Z in microseconds
MINUTE_US = 60_000_000


def txn(
    txn_id: str,
    t: int,
    amount: float = 10.0,
    *,
    user: str = "u1",
    merchant: str = "m1",
    country: str = "DE",
) -> TransactionEvent:
    return TransactionEvent(txn_id, user, merchant, amount, country, t, t + 1000)


def users(lateness_us: int = HOUR_US, **kwargs: Any) -> tuple[UserActivity, MemoryRecordLog]:
    log = MemoryRecordLog()
    return UserActivity(log, WindowPolicy(allowed_lateness_us=lateness_us, **kwargs)), log


# ------------------------------------------------------------------------------------ users


def test_user_windows_are_computed_as_of_the_latest_event_time() -> None:
    activity, _ = users()
    activity.apply(txn("a", T0 - 8 * DAY_US, 1000.0, merchant="m0", country="FR"), 0, 0)
    activity.apply(txn("b", T0 - 2 * DAY_US, 30.0, merchant="m1", country="FR"), 1, 0)
    activity.apply(txn("c", T0 - DAY_US, 40.0, merchant="m1", country="DE"), 2, 0)  # edge: out
    activity.apply(txn("d", T0 - 2 * HOUR_US, 20.0, merchant="m2", country="DE"), 3, 0)
    activity.apply(txn("e", T0 - HOUR_US + 1, 5.0, merchant="m3", country="DE"), 4, 0)
    update = activity.apply(txn("f", T0, 7.0, merchant="m2", country="US"), 5, 0)

    assert update.outcome is Outcome.APPLIED
    row = update.row
    assert row is not None
    assert row.view == "user_activity" and row.entity_id == "u1"
    assert row.event_time_us == T0
    assert row.features == {
        "user_txn_count_1h": 2,  # e (1 µs inside the hour) and f
        "user_txn_count_24h": 3,  # c sits exactly 24 h back: windows exclude their lower edge
        "user_amount_sum_24h": 32.0,
        "user_amount_mean_7d": (30.0 + 40.0 + 20.0 + 5.0 + 7.0) / 5,  # a is 8 days back
        "user_distinct_merchants_24h": 2,  # m2, m3
        "user_last_txn_epoch": T0 / 1e6,
        "user_home_country": "DE",  # DE x3 beats FR x1 (a fell out of the 7 days)
    }
    assert row.trigger_event_us == T0 and row.trigger_ingested_us == T0 + 1000


def test_home_country_ties_go_to_the_most_recently_seen() -> None:
    activity, _ = users()
    activity.apply(txn("a", T0, country="FR"), 0, 0)
    activity.apply(txn("b", T0 + 1, country="DE"), 1, 0)
    row = activity.apply(txn("c", T0 - 5, country="FR"), 2, 0).row  # late but within lateness
    assert row is not None
    # FR x2 beats DE x1; then a DE makes it 2:2 and DE was seen last
    assert row.features["user_home_country"] == "FR"
    row = activity.apply(txn("d", T0 + 2, country="DE"), 3, 0).row
    assert row is not None and row.features["user_home_country"] == "DE"


def test_out_of_order_event_within_lateness_keeps_the_clock() -> None:
    activity, _ = users()
    activity.apply(txn("a", T0), 0, 0)
    update = activity.apply(txn("b", T0 - 30 * MINUTE_US, 5.0), 1, 0)
    assert update.outcome is Outcome.APPLIED
    assert update.row is not None
    assert update.row.event_time_us == T0  # recomputed as of the unchanged latest event time
    assert update.row.features["user_txn_count_1h"] == 2
    assert update.row.features["user_last_txn_epoch"] == T0 / 1e6
    assert update.row.trigger_event_us == T0 - 30 * MINUTE_US


def test_lateness_boundary_is_inclusive_and_late_events_change_nothing() -> None:
    activity, log = users(lateness_us=HOUR_US)
    activity.apply(txn("a", T0), 0, 0)
    on_edge = activity.apply(txn("b", T0 - HOUR_US), 1, 0)
    assert on_edge.outcome is Outcome.APPLIED
    late = activity.apply(txn("c", T0 - HOUR_US - 1), 2, 0)
    assert late.outcome is Outcome.LATE and late.row is None
    assert len(log.records) == 2
    current = activity.features("u1")
    assert current is not None and current.features["user_txn_count_24h"] == 2


def test_a_redelivered_transaction_counts_once_and_re_emits_its_own_row() -> None:
    activity, log = users()
    first = [activity.apply(txn(f"t{i}", T0 + i * MINUTE_US, 10.0 + i), i, 0).row for i in range(4)]
    late = activity.apply(txn("late", T0 + 30 * 1_000_000, 100.0), 4, 0).row

    # redelivery after a crash replays the same offsets: same rows, nothing counted twice
    for i in range(4):
        update = activity.apply(txn(f"t{i}", T0 + i * MINUTE_US, 10.0 + i), i, 0)
        assert update.outcome is Outcome.DUPLICATE
        assert update.row == first[i]
    again = activity.apply(txn("late", T0 + 30 * 1_000_000, 100.0), 4, 0)
    assert again.outcome is Outcome.DUPLICATE and again.row == late
    assert activity.fact_count == 5 and len(log.records) == 5

    # an upstream duplicate at a later offset re-emits the current state
    dup = activity.apply(txn("t0", T0, 10.0), 9, 0)
    assert dup.outcome is Outcome.DUPLICATE
    assert dup.row is not None and late is not None
    assert dup.row.features == late.features


def test_history_is_pruned_after_seven_days_plus_lateness() -> None:
    activity, log = users(lateness_us=HOUR_US)
    activity.apply(txn("old", T0), 0, 0)
    activity.apply(txn("mid", T0 + 3 * DAY_US), 1, 0)
    activity.apply(txn("new", T0 + WEEK_US + HOUR_US), 2, 0)  # "old" is exactly at the cutoff
    assert ("u1", "old") not in log.records
    assert ("u1", "mid") in log.records
    assert activity.fact_count == 2


def test_history_cap_evicts_the_oldest() -> None:
    activity, log = users(max_user_facts=3)
    for i in range(3):
        assert activity.apply(txn(f"t{i}", T0 + i), i, 0).evicted == 0
    update = activity.apply(txn("t3", T0 + 3), 3, 0)
    assert update.evicted == 1
    assert ("u1", "t0") not in log.records
    assert update.row is not None and update.row.features["user_txn_count_1h"] == 3


def test_idle_users_expire_relative_to_their_partition_clock() -> None:
    activity, log = users()
    activity.apply(txn("a", T0, user="idle"), 0, 0)
    activity.apply(txn("b", T0, user="other-partition"), 0, 1)
    activity.apply(txn("c", T0 + WEEK_US + 2 * HOUR_US, user="busy"), 1, 0)
    assert activity.expire_idle({0}) == 1
    assert activity.features("idle") is None
    assert activity.features("other-partition") is not None
    assert set(log.records) == {("other-partition", "b"), ("busy", "c")}


def _reference_user_rows(
    events: list[tuple[TransactionEvent, int]], lateness_us: int
) -> list[tuple[str, dict[str, Any] | None]]:
    """Brute force: per user, the accepted transactions, and the features after each event."""
    accepted: dict[str, dict[str, TransactionEvent]] = {}
    rows: list[tuple[str, dict[str, Any] | None]] = []
    for event, _ in events:
        mine = accepted.setdefault(event.user_id, {})
        clock = max((e.event_time_us for e in mine.values()), default=None)
        if event.transaction_id in mine:
            rows.append(("duplicate", _brute_features(list(mine.values()))))
            continue
        if clock is not None and event.event_time_us < clock - lateness_us:
            rows.append(("late", None))
            continue
        mine[event.transaction_id] = event
        rows.append(("applied", _brute_features(list(mine.values()))))
    return rows


def _brute_features(events: list[TransactionEvent]) -> dict[str, Any]:
    clock = max(e.event_time_us for e in events)

    def within(width: int) -> list[TransactionEvent]:
        return [e for e in events if clock - width < e.event_time_us <= clock]

    day, week = within(DAY_US), within(WEEK_US)
    counts = Counter(e.country for e in week)
    last = {c: max(e.event_time_us for e in week if e.country == c) for c in counts}
    return {
        "user_txn_count_1h": len(within(HOUR_US)),
        "user_txn_count_24h": len(day),
        "user_amount_sum_24h": math.fsum(e.amount for e in day),
        "user_amount_mean_7d": math.fsum(e.amount for e in week) / len(week),
        "user_distinct_merchants_24h": len({e.merchant_id for e in day}),
        "user_last_txn_epoch": clock / 1e6,
        "user_home_country": max(counts, key=lambda c: (counts[c], last[c], c)),
    }


@pytest.mark.parametrize("seed", range(5))
def test_user_features_match_a_brute_force_reference(seed: int) -> None:
    rng = random.Random(seed)
    lateness = 2 * HOUR_US
    activity, log = users(lateness_us=lateness)
    events: list[tuple[TransactionEvent, int]] = []
    clock = T0
    for seq in range(600):
        clock += rng.randint(0, 3 * HOUR_US)
        if events and rng.random() < 0.1:  # redelivery / upstream duplicate
            events.append((rng.choice(events[-20:])[0], seq))  # recent, as redelivery is
            continue
        t = clock - rng.choice([0, 0, 0, rng.randint(0, 3 * HOUR_US)])  # some out of order
        event = txn(
            f"t{seq}",
            t,
            round(rng.uniform(1, 500), 2),
            user=f"u{rng.randint(0, 4)}",
            merchant=f"m{rng.randint(0, 6)}",
            country=rng.choice(["DE", "FR", "US"]),
        )
        events.append((event, seq))

    expected = _reference_user_rows(events, lateness)
    # the retention only forgets what no window can need: compare all rows
    for (event, seq), (outcome, features) in zip(events, expected, strict=True):
        update = activity.apply(event, seq, 0)
        if outcome == "duplicate":
            assert update.outcome is Outcome.DUPLICATE
            continue  # as-of rows are checked in the redelivery test
        assert update.outcome.value == outcome
        assert (update.row.features if update.row else None) == features

    rebuilt = UserActivity(MemoryRecordLog(), WindowPolicy(allowed_lateness_us=lateness))
    rebuilt.rebuild(log.items(), {0})
    for user in {e.user_id for e, _ in events}:
        assert rebuilt.features(user) == activity.features(user)
    assert rebuilt.fact_count == activity.fact_count == len(log.records)


def test_after_the_topic_started_over_a_redelivered_event_re_emits_its_own_row() -> None:
    """A restart of the in-memory local broker: offsets begin again at 0 under a history
    built from the old topic. New facts go on after the old positions, and a redelivered
    event's row still counts what came before the restart."""
    activity, log = users()
    for i in range(3):
        activity.apply(txn(f"old{i}", T0 + i * MINUTE_US), 1000 + i, 0)
    first = activity.apply(txn("new0", T0 + 3 * MINUTE_US), 0, 0)  # offset 0 of the new topic
    assert first.row is not None and first.row.features["user_txn_count_1h"] == 4
    assert log.records[("u1", "new0")][0][1] == 1003  # its position goes on from the history's
    activity.apply(txn("new1", T0 + 4 * MINUTE_US), 1, 0)

    again = activity.apply(txn("new0", T0 + 3 * MINUTE_US), 0, 0)  # redelivered
    assert again.outcome is Outcome.DUPLICATE and again.row == first.row


# --------------------------------------------------------------------------------- merchants


def mtxn(txn_id: str, t: int, merchant: str = "m1") -> MerchantFact:
    return MerchantFact("txn", merchant, txn_id, t, trigger_event_us=t, trigger_ingested_us=t)


def mlabel(txn_id: str, t: int, fraud: bool, merchant: str = "m1") -> MerchantFact:
    return MerchantFact("label", merchant, txn_id, t, fraud, t + DAY_US, t + DAY_US)


def merchants(**kwargs: Any) -> tuple[MerchantActivity, MemoryRecordLog]:
    log = MemoryRecordLog()
    return MerchantActivity(log, WindowPolicy(**kwargs)), log


def test_merchant_counts_and_fraud_rate_by_transaction_time() -> None:
    activity, _ = merchants()
    activity.apply(mtxn("a", T0 - DAY_US), 0, 0)  # exactly 24 h back: out of the 24 h count
    activity.apply(mtxn("b", T0 - HOUR_US), 1, 0)
    activity.apply(mtxn("c", T0), 2, 0)
    activity.apply(mlabel("old", T0 - WEEK_US + 1, True), 3, 0)  # 1 µs inside the 7 days
    activity.apply(mlabel("a", T0 - DAY_US, False), 4, 0)
    update = activity.apply(mlabel("b", T0 - HOUR_US, True), 5, 0)
    assert update.row is not None
    assert update.row.event_time_us == T0  # labels are placed at their transaction's time
    assert update.row.features == {
        "merchant_txn_count_24h": 2,
        "merchant_fraud_rate_7d": 2 / 3,
        "merchant_labels_7d": 3,
    }
    assert update.row.trigger_event_us == T0 - HOUR_US + DAY_US  # the label's own time

    outside = activity.apply(mlabel("ancient", T0 - WEEK_US, True), 6, 0)
    assert outside.outcome is Outcome.OUTSIDE_WINDOW and outside.row is None


def test_a_label_before_its_transaction_advances_the_clock_and_both_count() -> None:
    activity, _ = merchants()
    activity.apply(mtxn("a", T0), 0, 0)
    early = activity.apply(mlabel("b", T0 + MINUTE_US, True), 1, 0)
    assert early.row is not None and early.row.event_time_us == T0 + MINUTE_US
    assert early.row.features["merchant_txn_count_24h"] == 1
    update = activity.apply(mtxn("b", T0 + MINUTE_US), 2, 0)
    assert update.outcome is Outcome.APPLIED
    assert update.row is not None
    assert update.row.features == {
        "merchant_txn_count_24h": 2,
        "merchant_fraud_rate_7d": 1.0,
        "merchant_labels_7d": 1,
    }


def test_merchant_duplicates_late_transactions_and_label_corrections() -> None:
    activity, log = merchants(allowed_lateness_us=HOUR_US)
    rows = [activity.apply(mtxn(f"t{i}", T0 + i), i, 0).row for i in range(3)]
    labelled = activity.apply(mlabel("t1", T0 + 1, True), 3, 0).row
    assert activity.apply(mtxn("t1", T0 + 1), 1, 0).row == rows[1]  # redelivered: as of it
    assert activity.apply(mlabel("t1", T0 + 1, True), 3, 0).outcome is Outcome.DUPLICATE
    assert activity.apply(mlabel("t1", T0 + 1, True), 3, 0).row == labelled
    late = activity.apply(mtxn("late", T0 - HOUR_US - 1), 4, 0)
    assert late.outcome is Outcome.LATE

    corrected = activity.apply(mlabel("t1", T0 + 1, False), 5, 0)
    assert corrected.outcome is Outcome.APPLIED
    assert corrected.row is not None
    assert corrected.row.features["merchant_labels_7d"] == 1
    assert corrected.row.features["merchant_fraud_rate_7d"] == 0.0
    assert log.records[("m1", "label", "t1")][0] == [T0 + 1, 0, 5, 0]


def test_merchant_facts_after_the_topic_started_over_keep_their_order() -> None:
    activity, _ = merchants()
    for i in range(3):
        activity.apply(mtxn(f"old{i}", T0 + i), 500 + i, 0)
    first = activity.apply(mtxn("new0", T0 + 3), 0, 0)  # offset 0 of the re-created topic
    labelled = activity.apply(mlabel("new0", T0 + 3, True), 1, 0).row
    assert first.row is not None and first.row.features["merchant_txn_count_24h"] == 4
    again = activity.apply(mtxn("new0", T0 + 3), 0, 0)
    assert again.outcome is Outcome.DUPLICATE and again.row == first.row
    assert activity.apply(mlabel("new0", T0 + 3, True), 1, 0).row == labelled


def test_merchant_retention_and_rebuild() -> None:
    activity, log = merchants(allowed_lateness_us=HOUR_US)
    activity.apply(mtxn("a", T0), 0, 1)
    activity.apply(mlabel("a", T0, True), 1, 1)
    activity.apply(mtxn("b", T0 + DAY_US + HOUR_US), 2, 1)  # "a" txn leaves, its label stays
    assert ("m1", "txn", "a") not in log.records
    assert ("m1", "label", "a") in log.records
    row = activity.features("m1")
    assert row is not None
    assert row.features == {
        "merchant_txn_count_24h": 1,
        "merchant_fraud_rate_7d": 1.0,
        "merchant_labels_7d": 1,
    }
    rebuilt = MerchantActivity(MemoryRecordLog(), WindowPolicy(allowed_lateness_us=HOUR_US))
    rebuilt.rebuild(log.items(), {1})
    assert rebuilt.features("m1") == row
    empty = MerchantActivity(MemoryRecordLog(), WindowPolicy())
    empty.rebuild(log.items(), {0})  # partition 1 is not ours any more
    assert empty.features("m1") is None

    activity.apply(mtxn("c", T0 + DAY_US + WEEK_US + 2 * HOUR_US, merchant="m2"), 3, 1)
    assert activity.expire_idle({1}) == 1
    assert activity.features("m1") is None
    assert not any(key[0] == "m1" for key in log.records)


def test_window_policy_rejects_nonsense() -> None:
    with pytest.raises(ValueError, match="lateness"):
        WindowPolicy(allowed_lateness_us=WEEK_US + 1)
    with pytest.raises(ValueError, match="caps"):
        WindowPolicy(max_user_facts=0)


def test_a_redelivered_row_from_before_later_facts_is_not_current() -> None:
    # the later-dated payment is applied first, an earlier-dated one after it (another
    # partition's): a redelivery of the first re-emits its row as of its own position, whose
    # clock equals the current one but which leaves the second payment out
    activity, _ = users()
    newest = activity.apply(txn("new", T0, 100.0), 0, 0)
    older = activity.apply(txn("old", T0 - 10 * MINUTE_US, 50.0), 1, 1)
    assert newest.row is not None and older.row is not None and older.row.current
    assert older.row.features["user_amount_mean_7d"] == 75.0

    again = activity.apply(txn("new", T0, 100.0), 0, 0)
    assert again.outcome is Outcome.DUPLICATE and again.row == newest.row
    assert again.row is not None and not again.row.current  # for the offline log only
    assert again.row.event_time_us == older.row.event_time_us
    assert again.row.features["user_amount_mean_7d"] == 100.0
    last = activity.apply(txn("old", T0 - 10 * MINUTE_US, 50.0), 1, 1)
    assert last.row is not None and last.row.current and last.row == older.row
