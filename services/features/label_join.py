"""The label join: which merchant (and transaction time) a label belongs to. Pure logic.

Labels carry only transaction_id, is_fraud and their own event time; the merchant's fraud
rate needs the transaction's merchant and event time. Transactions are re-keyed by
transaction_id (``TransactionRef``) onto a topic co-partitioned with the labels, and this
join keeps, per transaction_id, what it has seen of both sides:

- a transaction whose label is known emits a ``MerchantFact`` of kind ``label``;
- a label whose transaction is not known yet is held (bounded: ``max_pending`` labels, each
  for at most ``label_hold_us`` of event time) and emitted when the transaction arrives;
- everything is idempotent: a repeated transaction or label re-emits the same fact, which the
  merchant state recognises (so a crash between persisting the join and sending the fact
  loses nothing).

Entries expire once their transaction is older than ``retention_us`` relative to the
partition's clock (the latest event time seen on it): by then a label can only fall outside
the merchant's 7-day window.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Hashable, Iterable
from dataclasses import dataclass
from typing import Any, cast

from services.features.events import LabelEvent, MerchantFact, TransactionRef
from services.features.windows import RecordLog


@dataclass(slots=True)
class _Entry:
    partition: int
    merchant_id: str | None = None
    event_time_us: int | None = None  # the transaction's
    is_fraud: bool | None = None
    label_event_us: int | None = None
    label_ingested_us: int | None = None

    def stored(self) -> list[Any]:
        return [
            self.merchant_id,
            self.event_time_us,
            None if self.is_fraud is None else int(self.is_fraud),
            self.label_event_us,
            self.label_ingested_us,
            self.partition,
        ]

    def fact(self, transaction_id: str) -> MerchantFact | None:
        if self.merchant_id is None or self.event_time_us is None or self.is_fraud is None:
            return None
        return MerchantFact(
            kind="label",
            merchant_id=self.merchant_id,
            transaction_id=transaction_id,
            event_time_us=self.event_time_us,
            is_fraud=self.is_fraud,
            trigger_event_us=self.label_event_us or 0,
            trigger_ingested_us=self.label_ingested_us or 0,
        )


@dataclass(frozen=True, slots=True)
class JoinResult:
    fact: MerchantFact | None  # the joined label to send to the merchant, if complete
    held: bool = False  # a label now waits for its transaction
    evicted: int = 0  # held labels dropped because too many were waiting


@dataclass(frozen=True, slots=True)
class Expired:
    transactions: int
    unmatched_labels: int


class TransactionLabelJoin:
    def __init__(
        self, log: RecordLog, *, retention_us: int, label_hold_us: int, max_pending: int
    ) -> None:
        if max_pending < 1:
            raise ValueError("max_pending must be at least 1")
        self._log = log
        self._retention_us = retention_us
        self._label_hold_us = label_hold_us
        self._max_pending = max_pending
        self._entries: dict[str, _Entry] = {}
        self._pending: OrderedDict[str, None] = OrderedDict()  # held labels, arrival order
        self._refs: dict[int, deque[tuple[int, str]]] = {}  # per partition, arrival order
        self._clock: dict[int, int] = {}

    @property
    def entry_count(self) -> int:
        return len(self._entries)

    @property
    def pending_count(self) -> int:
        return len(self._pending)

    def _advance(self, partition: int, event_time_us: int) -> None:
        if event_time_us > self._clock.get(partition, -1):
            self._clock[partition] = event_time_us

    def on_transaction(self, ref: TransactionRef, partition: int) -> JoinResult:
        entry = self._entries.get(ref.transaction_id)
        if entry is None:
            entry = self._entries[ref.transaction_id] = _Entry(partition)
        first_sighting = entry.event_time_us is None
        entry.partition = partition
        entry.merchant_id = ref.merchant_id
        entry.event_time_us = ref.event_time_us
        if first_sighting:
            self._refs.setdefault(partition, deque()).append(
                (ref.event_time_us, ref.transaction_id)
            )
        self._pending.pop(ref.transaction_id, None)
        self._advance(partition, ref.event_time_us)
        self._log.put((ref.transaction_id,), entry.stored(), partition)
        return JoinResult(entry.fact(ref.transaction_id))

    def on_label(self, label: LabelEvent, partition: int) -> JoinResult:
        entry = self._entries.get(label.transaction_id)
        if entry is None:
            entry = self._entries[label.transaction_id] = _Entry(partition)
        entry.is_fraud = label.is_fraud
        entry.label_event_us = label.event_time_us
        entry.label_ingested_us = label.ingested_us
        self._advance(partition, label.event_time_us)
        self._log.put((label.transaction_id,), entry.stored(), partition)
        if entry.merchant_id is not None:
            return JoinResult(entry.fact(label.transaction_id))
        self._pending[label.transaction_id] = None
        evicted = 0
        while len(self._pending) > self._max_pending:
            oldest, _ = self._pending.popitem(last=False)
            self._forget(oldest)
            evicted += 1
        return JoinResult(None, held=True, evicted=evicted)

    def _forget(self, transaction_id: str) -> None:
        entry = self._entries.pop(transaction_id, None)
        if entry is not None:
            self._log.remove((transaction_id,), entry.partition)

    def expire(self, partitions: Iterable[int]) -> Expired:
        """Drop transactions past the retention and labels held past the hold time."""
        wanted = set(partitions)
        transactions = 0
        for partition in wanted:
            refs = self._refs.get(partition)
            if not refs:
                continue
            cutoff = self._clock[partition] - self._retention_us
            while refs and refs[0][0] < cutoff:
                _, transaction_id = refs.popleft()
                entry = self._entries.get(transaction_id)
                if (
                    entry is not None
                    and entry.event_time_us is not None
                    and entry.event_time_us < cutoff
                ):
                    self._forget(transaction_id)
                    transactions += 1
        unmatched = 0
        for transaction_id in list(self._pending):
            entry = self._entries[transaction_id]
            if entry.partition not in wanted or entry.label_event_us is None:
                continue
            if entry.label_event_us < self._clock[entry.partition] - self._label_hold_us:
                del self._pending[transaction_id]
                self._forget(transaction_id)
                unmatched += 1
        return Expired(transactions, unmatched)

    def rebuild(self, records: Iterable[tuple[Hashable, Any]], partitions: set[int]) -> None:
        """Replace the in-memory state with the persisted entries of ``partitions``."""
        self._entries.clear()
        self._pending.clear()
        self._refs.clear()
        self._clock.clear()
        held: list[tuple[int, str]] = []
        for key, value in records:
            if value is None or int(value[5]) not in partitions:
                continue
            (transaction_id,) = cast(tuple[str], key)
            merchant_id, t, is_fraud, label_t, label_ingested, partition = value
            entry = _Entry(
                int(partition),
                merchant_id,
                None if t is None else int(t),
                None if is_fraud is None else bool(is_fraud),
                None if label_t is None else int(label_t),
                None if label_ingested is None else int(label_ingested),
            )
            self._entries[transaction_id] = entry
            if entry.event_time_us is not None:
                self._refs.setdefault(entry.partition, deque()).append(
                    (entry.event_time_us, transaction_id)
                )
                self._advance(entry.partition, entry.event_time_us)
            if entry.label_event_us is not None:
                self._advance(entry.partition, entry.label_event_us)
                if entry.merchant_id is None:
                    held.append((entry.label_event_us, transaction_id))
        for partition, refs in self._refs.items():
            self._refs[partition] = deque(sorted(refs))
        for _, transaction_id in sorted(held):
            self._pending[transaction_id] = None
