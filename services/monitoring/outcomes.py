"""Predictions joined with their labels: the outcomes live model quality is measured on.

``OutcomeJoin`` pairs each prediction (predictions.log, one per version that scored the
transaction: production or canary, and shadow) with the transaction's validated label
(events.validated.labels), by ``transaction_id``; both topics are keyed by it and
co-partitioned, so one consumer sees both sides of a transaction.

State is bounded by time and count: a prediction waits at most ``max_wait_s`` (stream time)
for its label, at most ``max_pending`` predictions wait at once (the oldest go first), and what
leaves unmatched is counted by reason (``expired``: no label in time; ``evicted``: the state
was full). A label that finds no prediction waits ``label_linger_s`` (a prediction logged late,
or a shadow score after the answer) and is then counted as ``label_unmatched``. A *replayed*
shadow score (serving scored an earlier answer's inputs when the shadow was set) joins only
if that answer still waits for its label, and only a label that comes after it (by record
time, so a re-read gives the same answer): an earlier label may have been in the candidate's
training data. The others are counted as ``replayed_unused`` and hold no state.

Stream time is the largest record timestamp seen, so replays behave as the live run did.
``low_watermark(partition)`` is the oldest record still needed: the transport commits no offset
past it, so a restart re-reads every prediction that was still waiting (and every label that
came after it) and nothing it had already finished with.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Prediction:
    transaction_id: str
    model_name: str
    model_version: int
    route: str  # production | canary | shadow | unspecified
    score: float
    flagged: bool
    at: float  # predicted_at (epoch seconds)
    partition: int
    offset: int
    replayed: bool = False  # a shadow score of an earlier answer (PredictionRecord.replayed)


@dataclass(frozen=True, slots=True)
class Outcome:
    """A prediction and the truth about its transaction."""

    prediction: Prediction
    is_fraud: bool
    labelled_at: float


@dataclass(slots=True)
class _Label:
    is_fraud: bool
    at: float
    partition: int
    offset: int
    matched: bool = False


@dataclass
class JoinCounts:
    joined: int = 0
    expired: int = 0  # predictions whose label did not come within max_wait_s
    evicted: int = 0  # predictions dropped because max_pending were waiting
    label_unmatched: int = 0  # labels no prediction came for within label_linger_s
    label_duplicates: int = 0  # a second label for a transaction (the first one counts)
    replayed_unused: int = 0  # replayed scores of answers no longer waiting: never joined


class OutcomeJoin:
    def __init__(self, *, max_wait_s: float, max_pending: int, label_linger_s: float) -> None:
        self.max_wait_s = max_wait_s
        self.max_pending = max_pending
        self.label_linger_s = label_linger_s
        # transaction_id -> its predictions, in arrival order (oldest transaction first)
        self._pending: OrderedDict[str, list[Prediction]] = OrderedDict()
        self._pending_count = 0
        self._labels: OrderedDict[str, _Label] = OrderedDict()
        # per partition, the transaction ids of ``_pending`` and ``_labels`` in arrival order:
        # the oldest still needed is the first (a commit's low watermark without a scan)
        self._pending_index: dict[int, OrderedDict[str, None]] = {}
        self._label_index: dict[int, OrderedDict[str, None]] = {}
        self.counts = JoinCounts()
        self.stream_time = 0.0
        # per labels partition: (time, offset) about once a second of stream time, so a
        # commit can go back to before the oldest waiting prediction's label could have come
        self._label_marks: dict[int, deque[tuple[float, int]]] = {}

    @property
    def pending(self) -> int:
        return self._pending_count

    @property
    def waiting_labels(self) -> int:
        return len(self._labels)

    def add_prediction(self, prediction: Prediction) -> tuple[list[Outcome], list[Prediction]]:
        """Returns (outcomes joined now, predictions that left unmatched now)."""
        self.stream_time = max(self.stream_time, prediction.at)
        label = self._labels.get(prediction.transaction_id)
        if prediction.replayed and (
            label is not None or prediction.transaction_id not in self._pending
        ):
            # its answer no longer waits for a label: the label came first (it may have been
            # in the candidate's training data), or the answer expired or was evicted
            self.counts.replayed_unused += 1
            return [], []
        if label is not None:
            label.matched = True
            self.counts.joined += 1
            return [Outcome(prediction, label.is_fraud, label.at)], []
        self._pending.setdefault(prediction.transaction_id, []).append(prediction)
        self._pending_index.setdefault(prediction.partition, OrderedDict())[
            prediction.transaction_id
        ] = None
        self._pending_count += 1
        dropped: list[Prediction] = []
        while self._pending_count > self.max_pending:
            transaction_id, oldest = self._pending.popitem(last=False)
            self._unindex_predictions(transaction_id, oldest)
            self._pending_count -= len(oldest)
            self.counts.evicted += len(oldest)
            dropped.extend(oldest)
        return [], dropped

    def add_label(
        self, transaction_id: str, is_fraud: bool, at: float, partition: int, offset: int
    ) -> list[Outcome]:
        self.stream_time = max(self.stream_time, at)
        marks = self._label_marks.setdefault(partition, deque())
        if not marks or at >= marks[-1][0] + 1.0:
            marks.append((at, offset))
        if transaction_id in self._labels:
            self.counts.label_duplicates += 1
            return []
        label = _Label(is_fraud, at, partition, offset)
        self._labels[transaction_id] = label
        self._label_index.setdefault(partition, OrderedDict())[transaction_id] = None
        predictions = self._pending.pop(transaction_id, None)
        if not predictions:
            return []
        self._unindex_predictions(transaction_id, predictions)
        label.matched = True
        self._pending_count -= len(predictions)
        joined = [p for p in predictions if not p.replayed or p.at < at]
        self.counts.replayed_unused += len(predictions) - len(joined)
        self.counts.joined += len(joined)
        return [Outcome(p, is_fraud, at) for p in joined]

    def expire(self, now: float | None = None) -> list[Prediction]:
        """Drop what waited too long (as of ``now``, default the stream time); returns the
        predictions that left without a label."""
        now = self.stream_time if now is None else now
        expired: list[Prediction] = []
        while self._pending:
            transaction_id, predictions = next(iter(self._pending.items()))
            if predictions[0].at > now - self.max_wait_s:
                break
            del self._pending[transaction_id]
            self._unindex_predictions(transaction_id, predictions)
            self._pending_count -= len(predictions)
            self.counts.expired += len(predictions)
            expired.extend(predictions)
        while self._labels:
            transaction_id, label = next(iter(self._labels.items()))
            if label.at > now - self.label_linger_s:
                break
            del self._labels[transaction_id]
            self._unindex(self._label_index, label.partition, transaction_id)
            if not label.matched:
                self.counts.label_unmatched += 1
        return expired

    def low_watermarks(self, partitions: list[int]) -> dict[int, tuple[int | None, int | None]]:
        """Per partition, the offsets (predictions, labels) of the oldest records still needed
        (None: none is). A prediction is needed while it waits; a label while it lingers, and
        every label from (about) the oldest waiting prediction's time on: after a restart the
        re-read predictions must meet their labels again. Each partition's oldest entries are
        the first of its index: no scan."""
        oldest: dict[int, Prediction] = {}
        lingering: dict[int, int] = {}
        for partition in partitions:
            waiting = self._pending_index.get(partition)
            if waiting:
                predictions = self._pending[next(iter(waiting))]
                oldest[partition] = next(p for p in predictions if p.partition == partition)
            labels = self._label_index.get(partition)
            if labels:
                lingering[partition] = self._labels[next(iter(labels))].offset
        out: dict[int, tuple[int | None, int | None]] = {}
        for partition in partitions:
            first = oldest.get(partition)
            offsets = [lingering[partition]] if partition in lingering else []
            marks = self._label_marks.get(partition)
            if marks:
                if first is None:
                    while len(marks) > 1:
                        marks.popleft()
                else:
                    while len(marks) > 1 and marks[1][0] < first.at:
                        marks.popleft()  # older than the mark still needed
                    offsets.append(marks[0][1])
            out[partition] = (first.offset if first else None, min(offsets, default=None))
        return out

    def _unindex_predictions(self, transaction_id: str, predictions: list[Prediction]) -> None:
        for partition in {p.partition for p in predictions}:  # one, when co-partitioned
            self._unindex(self._pending_index, partition, transaction_id)

    @staticmethod
    def _unindex(index: dict[int, OrderedDict[str, None]], partition: int, key: str) -> None:
        entries = index.get(partition)
        if entries is not None:
            entries.pop(key, None)
