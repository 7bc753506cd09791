"""Event-time windows of the streaming features: pure logic, no Kafka, no faust.

Semantics (what training, serving and the tests rely on):

- Each entity (a user, a merchant) has a clock: the latest event time it has accepted.
  Features are always computed *as of that clock*: a window of width W holds the events with
  ``clock - W < event_time <= clock``. A feature row's ``event_timestamp`` is the clock.
- An event older than ``clock - allowed_lateness`` is *late*: counted and dropped (it changes
  no state and writes no row). A younger out-of-order event is inserted in event-time order
  and the features are recomputed as of the (unchanged) clock, so its row has the same
  event_timestamp as the previous one and a later created_timestamp.
- State is a set of facts keyed by transaction_id: re-applying a fact (redelivery after a
  crash, a duplicate from upstream) never counts twice. A redelivered fact re-emits the row
  *as of its position in the stream* (facts applied at or before it), which is exactly the
  row the first delivery emitted (or should have, had the process not died before writing
  it), so the offline log stays complete after a crash.
- Labels are windowed by the labelled *transaction's* event time (not the label's arrival).
  A label for a transaction older than the label window is dropped (it can never count
  again). Labels usually arrive long after their transaction and are never "late" in the
  lateness sense.

What the features are, and the windows they need, is the use case's
(services/shared/usecase/features.py: ``user_features``, ``merchant_features``); this module
keeps the histories they are computed from.

Why a history of facts rather than faust windowed tables: faust's windowed tables bucket by
fixed (hopping/tumbling) ranges and keep one aggregate per range, so they cannot deduplicate by
transaction_id, recompute "as of the entity's latest event time" exactly, count distinct
merchants or a most frequent country, nor rebuild an earlier row after a crash. A bounded,
event-time-ordered history per entity (as long as the use case's longest window for it, plus
the allowed lateness) does all of that with windows evaluated by
binary search. The history is persisted one fact per key (``RecordLog``; the service backs it
with a faust table whose changelog is compaction-safe: each key's last value is its state),
so an update writes one small record, never the entity's whole history.
"""

from __future__ import annotations

import bisect
import enum
import operator
from collections.abc import Hashable, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol, cast

from services.features.events import MerchantFact, TransactionEvent
from services.shared.usecase.features import (
    HOUR_US,
    MERCHANT_LABEL_WINDOW_US,
    MERCHANT_TXN_WINDOW_US,
    MERCHANT_VIEW,
    USER_VIEW,
    USER_WINDOW_US,
    WEEK_US,
    MerchantEvent,
    UserTransaction,
    merchant_features,
    user_features,
)

RecordKey = tuple[str, ...]
# history entries (UserTransaction, MerchantEvent) start with their event time
_event_time = operator.itemgetter(0)


class Outcome(enum.StrEnum):
    APPLIED = "applied"  # a new fact: state changed, a row is emitted
    DUPLICATE = "duplicate"  # already known: state unchanged, the row as of it is re-emitted
    LATE = "late"  # older than the allowed lateness: dropped
    OUTSIDE_WINDOW = "outside_window"  # a label for a transaction outside 7 days: dropped


@dataclass(frozen=True, slots=True)
class FeatureRow:
    """An entity's features as of its clock (``event_time_us``)."""

    view: str
    entity_id: str
    event_time_us: int
    features: dict[str, Any]
    trigger_event_us: int  # event time of the event that caused the row (freshness)
    trigger_ingested_us: int  # ingestion time of that event
    # False for a redelivered event's row as of its own position when facts were applied
    # after it: that row is for the offline log (the row the first delivery emitted); online,
    # the entity's current row stands. Its clock can equal the current row's (the facts
    # applied after it were older), so the online store's "never older" rule would not keep
    # it from replacing the current row
    current: bool = field(default=True, compare=False)


@dataclass(frozen=True, slots=True)
class Update:
    outcome: Outcome
    row: FeatureRow | None
    evicted: int = 0  # facts dropped because the entity's history hit its size cap


class RecordLog(Protocol):
    """Where facts are persisted, one per key, in the partition of their entity."""

    def put(self, key: RecordKey, value: list[Any], partition: int) -> None: ...

    def remove(self, key: RecordKey, partition: int) -> None: ...


@dataclass(frozen=True)
class WindowPolicy:
    allowed_lateness_us: int = HOUR_US
    max_user_facts: int = 10_000
    max_merchant_facts: int = 1_000_000

    def __post_init__(self) -> None:
        if not 0 <= self.allowed_lateness_us <= WEEK_US:
            raise ValueError("allowed lateness must be between 0 and 7 days")
        if self.max_user_facts < 1 or self.max_merchant_facts < 1:
            raise ValueError("history caps must be at least 1")

    @property
    def user_retention_us(self) -> int:
        # the longest window; the lateness on top keeps what a redelivered event's as-of row
        # may still need after the clock moved on
        return USER_WINDOW_US + self.allowed_lateness_us

    @property
    def merchant_txn_retention_us(self) -> int:
        return MERCHANT_TXN_WINDOW_US + self.allowed_lateness_us

    @property
    def merchant_label_retention_us(self) -> int:
        return MERCHANT_LABEL_WINDOW_US + self.allowed_lateness_us


# --------------------------------------------------------------------------------------- users


@dataclass(slots=True)
class _UserHistory:
    partition: int
    facts: list[UserTransaction] = field(default_factory=list)  # sorted
    ids: set[str] = field(default_factory=set)
    max_seq: int = -1

    @property
    def clock(self) -> int:
        return self.facts[-1].event_time_us


def _stored_seq(facts: list[UserTransaction], transaction_id: str) -> int:
    return next(fact.seq for fact in facts if fact.transaction_id == transaction_id)


class UserActivity:
    """Per-user transaction history and the ``user_activity`` features computed from it."""

    def __init__(self, log: RecordLog, policy: WindowPolicy) -> None:
        self._log = log
        self._policy = policy
        self._users: dict[str, _UserHistory] = {}
        self._partition_clock: dict[int, int] = {}
        self.fact_count = 0

    @property
    def entity_count(self) -> int:
        return len(self._users)

    def apply(self, txn: TransactionEvent, seq: int, partition: int) -> Update:
        """Apply a transaction read at offset ``seq`` of ``partition``.

        A fact's position is never below the ones before it in the user's history: after the
        topic started over (a restart of the in-memory local broker) offsets begin again at
        0, and a redelivered event re-emits its row as of its own stored position (not as of
        the new, lower offset, which would leave out everything before the restart)."""
        history = self._users.get(txn.user_id)
        if history is not None and txn.transaction_id in history.ids:
            as_of = max(seq, _stored_seq(history.facts, txn.transaction_id))
            row = self._row(txn.user_id, history, as_of, txn.event_time_us, txn.ingested_us)
            return Update(Outcome.DUPLICATE, row)
        if history is not None and (
            txn.event_time_us < history.clock - self._policy.allowed_lateness_us
        ):
            return Update(Outcome.LATE, None)
        if history is None:
            history = self._users[txn.user_id] = _UserHistory(partition)
        history.partition = partition
        seq = max(seq, history.max_seq + 1)
        fact = UserTransaction(
            txn.event_time_us, seq, txn.transaction_id, txn.amount, txn.merchant_id, txn.country
        )
        self._insert(txn.user_id, history, fact)
        self._log.put(
            (txn.user_id, txn.transaction_id),
            [txn.event_time_us, seq, txn.amount, txn.merchant_id, txn.country, partition],
            partition,
        )
        evicted = self._prune(txn.user_id, history)
        row = self._row(txn.user_id, history, None, txn.event_time_us, txn.ingested_us)
        return Update(Outcome.APPLIED, row, evicted)

    def features(self, user_id: str) -> FeatureRow | None:
        """The user's current row (None for a user without state)."""
        history = self._users.get(user_id)
        if history is None or not history.facts:
            return None
        return self._row(user_id, history, None, history.clock, history.clock)

    def _insert(self, user_id: str, history: _UserHistory, fact: UserTransaction) -> None:
        bisect.insort(history.facts, fact)
        history.ids.add(fact.transaction_id)
        history.max_seq = max(history.max_seq, fact.seq)
        self.fact_count += 1
        clock = history.clock
        if clock > self._partition_clock.get(history.partition, -1):
            self._partition_clock[history.partition] = clock

    def _prune(self, user_id: str, history: _UserHistory) -> int:
        cutoff = bisect.bisect_right(
            history.facts, history.clock - self._policy.user_retention_us, key=_event_time
        )
        over = len(history.facts) - cutoff - self._policy.max_user_facts
        evicted = max(over, 0)
        self._drop_oldest(user_id, history, cutoff + evicted)
        return evicted

    def _drop_oldest(self, user_id: str, history: _UserHistory, n: int) -> None:
        if n <= 0:
            return
        for fact in history.facts[:n]:
            history.ids.discard(fact.transaction_id)
            self._log.remove((user_id, fact.transaction_id), history.partition)
        del history.facts[:n]
        self.fact_count -= n

    def _row(
        self,
        user_id: str,
        history: _UserHistory,
        as_of_seq: int | None,
        trigger_event_us: int,
        trigger_ingested_us: int,
    ) -> FeatureRow | None:
        facts = history.facts
        if as_of_seq is not None and as_of_seq < history.max_seq:
            facts = [fact for fact in facts if fact.seq <= as_of_seq]
        if not facts:
            return None
        return FeatureRow(
            USER_VIEW,
            user_id,
            facts[-1].event_time_us,
            user_features(facts),
            trigger_event_us,
            trigger_ingested_us,
            current=as_of_seq is None or as_of_seq >= history.max_seq,
        )

    def expire_idle(self, partitions: Iterable[int]) -> int:
        """Forget users idle longer than the retention (relative to their partition's clock).

        Their facts can no longer fall in any window of a later event that is not late.
        Returns the number of users forgotten.
        """
        wanted = set(partitions)
        idle = [
            user_id
            for user_id, history in self._users.items()
            if history.partition in wanted
            and history.clock
            <= self._partition_clock[history.partition] - self._policy.user_retention_us
        ]
        for user_id in idle:
            history = self._users.pop(user_id)
            self._drop_oldest(user_id, history, len(history.facts))
        return len(idle)

    def rebuild(self, records: Iterable[tuple[Hashable, Any]], partitions: set[int]) -> None:
        """Replace the in-memory state with the persisted facts of ``partitions``."""
        self._users.clear()
        self._partition_clock.clear()
        self.fact_count = 0
        for key, value in records:
            if value is None:
                continue
            event_time_us, seq, amount, merchant_id, country, partition = value
            if int(partition) not in partitions:
                continue
            user_id, txn_id = cast(tuple[str, str], key)
            history = self._users.get(user_id)
            if history is None:
                history = self._users[user_id] = _UserHistory(int(partition))
            history.facts.append(
                UserTransaction(
                    int(event_time_us), int(seq), txn_id, float(amount), merchant_id, country
                )
            )
        for history in self._users.values():
            history.facts.sort()
            history.ids = {fact.transaction_id for fact in history.facts}
            history.max_seq = max(fact.seq for fact in history.facts)
            self.fact_count += len(history.facts)
            clock = history.clock
            if clock > self._partition_clock.get(history.partition, -1):
                self._partition_clock[history.partition] = clock


# ----------------------------------------------------------------------------------- merchants

_TXN = "txn"
_LABEL = "label"


@dataclass(slots=True)
class _MerchantHistory:
    partition: int
    txns: dict[str, tuple[int, int]] = field(default_factory=dict)  # id -> (event time, seq)
    txn_order: list[MerchantEvent] = field(default_factory=list)
    # id -> (event time, positive, seq); positive: the label says is_fraud
    labels: dict[str, tuple[int, bool, int]] = field(default_factory=dict)
    label_order: list[MerchantEvent] = field(default_factory=list)
    positive_order: list[MerchantEvent] = field(default_factory=list)  # the positive labels
    max_seq: int = -1

    @property
    def empty(self) -> bool:
        return not self.txn_order and not self.label_order

    @property
    def clock(self) -> int:
        txn = self.txn_order[-1].event_time_us if self.txn_order else -1
        label = self.label_order[-1].event_time_us if self.label_order else -1
        return max(txn, label)


class MerchantActivity:
    """Per-merchant transactions (24 h) and labels (7 days): ``merchant_activity``."""

    def __init__(self, log: RecordLog, policy: WindowPolicy) -> None:
        self._log = log
        self._policy = policy
        self._merchants: dict[str, _MerchantHistory] = {}
        self._partition_clock: dict[int, int] = {}
        self.fact_count = 0

    @property
    def entity_count(self) -> int:
        return len(self._merchants)

    def apply(self, fact: MerchantFact, seq: int, partition: int) -> Update:
        """Apply a merchant fact read at offset ``seq`` of ``partition`` (positions never go
        back within a history: ``UserActivity.apply``)."""
        history = self._merchants.get(fact.merchant_id)
        if history is not None and self._known(history, fact):
            stored = (
                history.txns[fact.transaction_id][1]
                if fact.kind == _TXN
                else history.labels[fact.transaction_id][2]
            )
            return Update(Outcome.DUPLICATE, self._row(fact, history, max(seq, stored)))
        if history is not None and not history.empty:
            if fact.kind == _TXN and (
                fact.event_time_us < history.clock - self._policy.allowed_lateness_us
            ):
                return Update(Outcome.LATE, None)
            if fact.kind == _LABEL and (
                fact.event_time_us <= history.clock - MERCHANT_LABEL_WINDOW_US
            ):
                return Update(Outcome.OUTSIDE_WINDOW, None)
        if history is None:
            history = self._merchants[fact.merchant_id] = _MerchantHistory(partition)
        history.partition = partition
        seq = max(seq, history.max_seq + 1)
        if fact.kind == _TXN:
            self._insert_txn(history, fact.transaction_id, fact.event_time_us, seq)
            self._log.put(
                (fact.merchant_id, _TXN, fact.transaction_id),
                [fact.event_time_us, seq, partition],
                partition,
            )
        else:
            self._insert_label(history, fact.transaction_id, fact.event_time_us, fact.is_fraud, seq)
            self._log.put(
                (fact.merchant_id, _LABEL, fact.transaction_id),
                [fact.event_time_us, int(fact.is_fraud), seq, partition],
                partition,
            )
        history.max_seq = max(history.max_seq, seq)
        clock = history.clock
        if clock > self._partition_clock.get(partition, -1):
            self._partition_clock[partition] = clock
        evicted = self._prune(fact.merchant_id, history)
        return Update(Outcome.APPLIED, self._row(fact, history, None), evicted)

    def features(self, merchant_id: str) -> FeatureRow | None:
        history = self._merchants.get(merchant_id)
        if history is None or history.empty:
            return None
        clock, features = merchant_features(
            history.txn_order, history.label_order, history.positive_order
        )
        return FeatureRow(MERCHANT_VIEW, merchant_id, clock, features, clock, clock)

    @staticmethod
    def _known(history: _MerchantHistory, fact: MerchantFact) -> bool:
        if fact.kind == _TXN:
            return fact.transaction_id in history.txns
        label = history.labels.get(fact.transaction_id)
        if label is None:
            return False
        _, positive, _ = label
        return positive == fact.is_fraud

    def _insert_txn(self, history: _MerchantHistory, txn_id: str, t: int, seq: int) -> None:
        history.txns[txn_id] = (t, seq)
        bisect.insort(history.txn_order, MerchantEvent(t, seq, txn_id))
        self.fact_count += 1

    def _insert_label(
        self, history: _MerchantHistory, txn_id: str, t: int, positive: bool, seq: int
    ) -> None:
        previous = history.labels.get(txn_id)
        if previous is not None:  # a corrected label replaces the earlier one
            self._remove_label(history, txn_id, previous)
        history.labels[txn_id] = (t, positive, seq)
        event = MerchantEvent(t, seq, txn_id)
        bisect.insort(history.label_order, event)
        if positive:
            bisect.insort(history.positive_order, event)
        self.fact_count += 1

    def _remove_label(
        self, history: _MerchantHistory, txn_id: str, label: tuple[int, bool, int]
    ) -> None:
        t, positive, seq = label
        event = MerchantEvent(t, seq, txn_id)
        orders = (
            [history.label_order, history.positive_order] if positive else [history.label_order]
        )
        for order in orders:
            index = bisect.bisect_left(order, event)
            if index < len(order) and order[index] == event:
                del order[index]
        del history.labels[txn_id]
        self.fact_count -= 1

    def _prune(self, merchant_id: str, history: _MerchantHistory) -> int:
        clock = history.clock
        cap = self._policy.max_merchant_facts
        txn_cut = bisect.bisect_right(
            history.txn_order, clock - self._policy.merchant_txn_retention_us, key=_event_time
        )
        txn_over = max(len(history.txn_order) - txn_cut - cap, 0)
        for _, _, txn_id in history.txn_order[: txn_cut + txn_over]:
            del history.txns[txn_id]
            self._log.remove((merchant_id, _TXN, txn_id), history.partition)
        del history.txn_order[: txn_cut + txn_over]
        self.fact_count -= txn_cut + txn_over

        label_cut = bisect.bisect_right(
            history.label_order, clock - self._policy.merchant_label_retention_us, key=_event_time
        )
        label_over = max(len(history.label_order) - label_cut - cap, 0)
        for _, _, txn_id in list(history.label_order[: label_cut + label_over]):
            self._remove_label(history, txn_id, history.labels[txn_id])
            self._log.remove((merchant_id, _LABEL, txn_id), history.partition)
        return txn_over + label_over

    def _row(
        self, fact: MerchantFact, history: _MerchantHistory, as_of_seq: int | None
    ) -> FeatureRow | None:
        txns, labels, positives = history.txn_order, history.label_order, history.positive_order
        if as_of_seq is not None and as_of_seq < history.max_seq:
            txns = [event for event in txns if event.seq <= as_of_seq]
            labels = [event for event in labels if event.seq <= as_of_seq]
            positives = [event for event in positives if event.seq <= as_of_seq]
        if not txns and not labels:
            return None
        clock, features = merchant_features(txns, labels, positives)
        return FeatureRow(
            MERCHANT_VIEW,
            fact.merchant_id,
            clock,
            features,
            fact.trigger_event_us,
            fact.trigger_ingested_us,
            current=as_of_seq is None or as_of_seq >= history.max_seq,
        )

    def expire_idle(self, partitions: Iterable[int]) -> int:
        """Forget merchants idle longer than the label retention (see UserActivity)."""
        wanted = set(partitions)
        idle = [
            merchant_id
            for merchant_id, history in self._merchants.items()
            if history.partition in wanted
            and history.clock
            <= self._partition_clock[history.partition] - self._policy.merchant_label_retention_us
        ]
        for merchant_id in idle:
            history = self._merchants.pop(merchant_id)
            for _, _, txn_id in history.txn_order:
                self._log.remove((merchant_id, _TXN, txn_id), history.partition)
            for _, _, txn_id in history.label_order:
                self._log.remove((merchant_id, _LABEL, txn_id), history.partition)
            self.fact_count -= len(history.txn_order) + len(history.label_order)
        return len(idle)

    def rebuild(self, records: Iterable[tuple[Hashable, Any]], partitions: set[int]) -> None:
        """Replace the in-memory state with the persisted facts of ``partitions``."""
        self._merchants.clear()
        self._partition_clock.clear()
        self.fact_count = 0
        for key, value in records:
            if value is None or int(value[-1]) not in partitions:  # the partition is last
                continue
            merchant_id, kind, txn_id = cast(tuple[str, str, str], key)
            partition = int(value[-1])
            history = self._merchants.get(merchant_id)
            if history is None:
                history = self._merchants[merchant_id] = _MerchantHistory(partition)
            if kind == _TXN:
                t, seq, _ = (int(v) for v in value)
                history.txns[txn_id] = (t, seq)
                history.txn_order.append(MerchantEvent(t, seq, txn_id))
            else:
                t, positive, seq, _ = (int(v) for v in value)
                history.labels[txn_id] = (t, bool(positive), seq)
                history.label_order.append(MerchantEvent(t, seq, txn_id))
                if positive:
                    history.positive_order.append(MerchantEvent(t, seq, txn_id))
            history.max_seq = max(history.max_seq, seq)
        for history in self._merchants.values():
            history.txn_order.sort()
            history.label_order.sort()
            history.positive_order.sort()
            self.fact_count += len(history.txn_order) + len(history.label_order)
            clock = history.clock
            if clock > self._partition_clock.get(history.partition, -1):
                self._partition_clock[history.partition] = clock
