"""The label join of the features service (services/features/label_join.py)."""

from __future__ import annotations

from doubles import MemoryRecordLog

from services.features.events import LabelEvent, MerchantFact, TransactionRef
from services.features.label_join import TransactionLabelJoin
from services.shared.usecase.features import DAY_US, HOUR_US

T0 = 1_767_225_600_000_000


def join(max_pending: int = 100) -> tuple[TransactionLabelJoin, MemoryRecordLog]:
    log = MemoryRecordLog()
    return (
        TransactionLabelJoin(
            log, retention_us=2 * DAY_US, label_hold_us=HOUR_US, max_pending=max_pending
        ),
        log,
    )


def label(txn_id: str, fraud: bool, t: int) -> LabelEvent:
    return LabelEvent(txn_id, fraud, t, t + 5)


def expected(txn_id: str, fraud: bool, txn_t: int, label_t: int) -> MerchantFact:
    return MerchantFact("label", "m1", txn_id, txn_t, fraud, label_t, label_t + 5)


def test_a_label_after_its_transaction_is_joined_at_once() -> None:
    labels, _ = join()
    assert labels.on_transaction(TransactionRef("x", "m1", T0), 0).fact is None
    result = labels.on_label(label("x", True, T0 + HOUR_US), 0)
    assert result.fact == expected("x", True, T0, T0 + HOUR_US)
    assert not result.held
    assert labels.pending_count == 0


def test_a_label_before_its_transaction_is_held_then_joined() -> None:
    labels, log = join()
    held = labels.on_label(label("x", False, T0), 0)
    assert held.fact is None and held.held
    assert labels.pending_count == 1
    result = labels.on_transaction(TransactionRef("x", "m1", T0 - 10), 0)
    assert result.fact == expected("x", False, T0 - 10, T0)
    assert labels.pending_count == 0
    assert log.records[("x",)] == (["m1", T0 - 10, 0, T0, T0 + 5, 0], 0)


def test_repeats_re_emit_the_same_fact_and_corrections_the_new_one() -> None:
    labels, _ = join()
    labels.on_transaction(TransactionRef("x", "m1", T0), 0)
    first = labels.on_label(label("x", True, T0 + 1), 0).fact
    assert labels.on_transaction(TransactionRef("x", "m1", T0), 0).fact == first
    assert labels.on_label(label("x", True, T0 + 1), 0).fact == first
    corrected = labels.on_label(label("x", False, T0 + 2), 0).fact
    assert corrected == expected("x", False, T0, T0 + 2)
    assert labels.entry_count == 1


def test_old_transactions_and_unmatched_labels_expire() -> None:
    labels, log = join()
    labels.on_transaction(TransactionRef("old", "m1", T0), 0)
    labels.on_label(label("orphan", True, T0 + HOUR_US), 0)
    labels.on_label(label("fresh-orphan", True, T0 + 2 * DAY_US), 0)
    labels.on_transaction(TransactionRef("other-partition", "m1", T0), 1)
    labels.on_transaction(TransactionRef("new", "m1", T0 + 2 * DAY_US + 1), 0)

    expired = labels.expire({0})
    assert (expired.transactions, expired.unmatched_labels) == (1, 1)
    assert set(log.records) == {("fresh-orphan",), ("other-partition",), ("new",)}
    assert labels.pending_count == 1


def test_held_labels_are_bounded() -> None:
    labels, log = join(max_pending=2)
    labels.on_label(label("a", True, T0), 0)
    labels.on_label(label("b", True, T0), 0)
    result = labels.on_label(label("c", True, T0), 0)
    assert result.evicted == 1
    assert ("a",) not in log.records
    assert labels.pending_count == 2


def test_rebuild_restores_entries_and_held_labels() -> None:
    labels, log = join()
    labels.on_transaction(TransactionRef("x", "m1", T0), 0)
    labels.on_label(label("y", True, T0), 1)
    rebuilt = TransactionLabelJoin(
        MemoryRecordLog(), retention_us=2 * DAY_US, label_hold_us=HOUR_US, max_pending=10
    )
    rebuilt.rebuild(log.items(), {0, 1})
    assert rebuilt.entry_count == 2 and rebuilt.pending_count == 1
    assert rebuilt.on_label(label("x", True, T0 + 1), 0).fact == expected("x", True, T0, T0 + 1)
    assert rebuilt.on_transaction(TransactionRef("y", "m1", T0 - 1), 1).fact == expected(
        "y", True, T0 - 1, T0
    )
    only_one = TransactionLabelJoin(
        MemoryRecordLog(), retention_us=DAY_US, label_hold_us=HOUR_US, max_pending=10
    )
    only_one.rebuild(log.items(), {1})
    assert only_one.entry_count == 1
