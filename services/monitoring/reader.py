"""Kafka transport of the monitoring service: the one reader of predictions.log.

Reads predictions.log and events.validated.labels in one consumer group (the range assignor
keeps partition N of both topics with the same member: both are keyed by transaction_id and
co-partitioned) and decodes each record once. Each prediction feeds the counts
(``PredictionLogMetrics``), the sampled training-serving skew (``SkewSampler``) and, with the
labels, ``LiveMonitor`` (join, quality, drift). A record that cannot be read is counted and
logged with its position and never stops the reader (it stays in the log). Drift events are
published to monitoring.drift (keyed by model name) and acknowledged before any offset is
committed.

Offsets: every ``commit_interval_s``, each partition is committed up to the oldest record the
join still needs (``OutcomeJoin.low_watermarks``): a prediction still waiting for its label, and
the labels that may still meet one. After a restart exactly those are read again; what was
already joined before them is not. Counting reads further than the join commits, so each
predictions.log partition's commit carries in its metadata where counting stopped
(``counted=<offset>``): a record re-read below that mark goes to the join again but is not
counted, sampled or rejected a second time. (Before one reader did all this, predictions.log
was fetched and decoded by three consumer groups: counting, join, skew.)
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from datetime import UTC, datetime
from typing import Any, TypeVar

from aiokafka import (
    AIOKafkaConsumer,
    AIOKafkaProducer,
    ConsumerRebalanceListener,
    ConsumerRecord,
    TopicPartition,
)
from aiokafka.errors import KafkaError
from google.protobuf.message import DecodeError, Message

from services.monitoring.monitor import BuildJob, LiveMonitor
from services.monitoring.prediction_metrics import PredictionLogMetrics, validate
from services.monitoring.skew import SkewSampler
from services.shared.codecs import decode_protobuf, protobuf_headers
from services.shared.drift_reference import DriftReference
from services.shared.errors import InvalidArgument
from services.shared.feature_recompute import Recomputed
from services.shared.logging import get_logger
from services.shared.proto.mlops.v1 import events_pb2, monitoring_pb2

log = get_logger("monitoring")

_DRIFT_HEADERS = protobuf_headers(monitoring_pb2.DriftEvent())
_COUNTED = "counted="

M = TypeVar("M", bound=Message)
ReferenceLoader = Callable[[str, int], DriftReference | None]
# the group's committed (offset, metadata) per partition; a partition never committed is absent
CommittedLoader = Callable[[list[TopicPartition]], Awaitable[dict[TopicPartition, tuple[int, str]]]]


def counted_from(offset: int, metadata: str) -> int:
    """The first offset not yet counted, from a commit (``offset``, ``metadata``): the counted
    mark in the metadata, never below the committed offset (a commit whose metadata this
    reader did not write: the offset itself)."""
    mark = 0
    if metadata.startswith(_COUNTED):
        with contextlib.suppress(ValueError):
            mark = int(metadata[len(_COUNTED) :])
    return max(offset, mark)


def counted_metadata(counted: int, offset: int) -> str:
    """The metadata of a commit at ``offset`` when counting stopped before ``counted``."""
    return f"{_COUNTED}{max(counted, offset)}"


class MonitoringReader(ConsumerRebalanceListener):
    def __init__(
        self,
        consumer: AIOKafkaConsumer,
        producer: AIOKafkaProducer,
        metrics: PredictionLogMetrics,
        monitor: LiveMonitor,
        references: ReferenceLoader,
        committed: CommittedLoader,
        *,
        group: str,
        predictions_topic: str,
        labels_topic: str,
        drift_topic: str,
        poll_timeout_ms: int,
        max_records: int,
        commit_interval_s: float,
        tick_interval_s: float,
        lag_interval_s: float,
        use_training_reference: bool,
        skew: SkewSampler | None = None,
        skew_interval_s: float = 120.0,
    ) -> None:
        self._consumer = consumer
        self._producer = producer
        self._metrics = metrics
        self.monitor = monitor
        self._references = references
        self._committed = committed
        self._group = group
        self._predictions = predictions_topic
        self._labels = labels_topic
        self._drift = drift_topic
        self._poll_timeout_ms = poll_timeout_ms
        self._max_records = max_records
        self._commit_interval_s = commit_interval_s
        self._tick_interval_s = tick_interval_s
        self._lag_interval_s = lag_interval_s
        self._use_training_reference = use_training_reference
        self._skew = skew
        self._skew_interval_s = skew_interval_s
        self._comparing: asyncio.Task[list[Recomputed]] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        # per predictions.log partition of this member: the first offset not yet counted
        self._counted: dict[int, int] = {}

    async def run(self, stop: asyncio.Event) -> None:
        """Read until ``stop`` is set (seen within one poll timeout)."""
        next_commit = next_tick = next_lag = 0.0
        next_skew = time.monotonic() + self._skew_interval_s
        try:
            while not stop.is_set():
                batches = await self._consumer.getmany(
                    timeout_ms=self._poll_timeout_ms, max_records=self._max_records
                )
                read_at = datetime.now(UTC)
                # one call per poll, not per partition: the drift detectors' array work has a
                # fixed cost per call, which per partition was most of monitoring's CPU under
                # load (predictions first, so a label read in the same poll finds its own)
                predictions: list[tuple[monitoring_pb2.PredictionRecord, int, int]] = []
                labels: list[tuple[str, bool, float, int, int]] = []
                for tp, records in batches.items():
                    if tp.topic == self._predictions:
                        predictions += self._predictions_of(records, read_at)
                    else:
                        labels += self._labels_of(records)
                events: list[monitoring_pb2.DriftEvent] = []
                if predictions:
                    events += self.monitor.add_predictions(predictions)
                if labels:
                    events += self.monitor.add_labels(labels)
                self._start_background_work()
                now = time.monotonic()
                if now >= next_tick:
                    self.monitor.tick()
                    next_tick = now + self._tick_interval_s
                if events:
                    await self._publish(events)
                if now >= next_commit:
                    await self._commit()
                    next_commit = now + self._commit_interval_s
                if now >= next_lag:
                    await self._report_lag()
                    next_lag = now + self._lag_interval_s
                if now >= next_skew and self._compare_skew():
                    next_skew = now + self._skew_interval_s
        finally:
            for task in self._tasks:
                task.cancel()
            if self._comparing is not None and not self._comparing.done():
                with contextlib.suppress(asyncio.CancelledError):
                    await self._comparing

    # ------------------------------------------------------------------ the group's partitions

    async def on_partitions_revoked(self, revoked: Iterable[TopicPartition]) -> None:
        # the next owner reads the join's watermarks and where counting stopped
        await self._commit()
        for tp in revoked:
            if tp.topic == self._predictions:
                self._counted.pop(tp.partition, None)

    async def on_partitions_assigned(self, assigned: Iterable[TopicPartition]) -> None:
        partitions = [tp for tp in assigned if tp.topic == self._predictions]
        try:
            committed = await self._committed(partitions)
        except (KafkaError, OSError) as exc:
            # counted from the committed offset on: a restart's re-read may count twice
            log.warning("counted_marks_unavailable", group=self._group, error=repr(exc))
            committed = {}
        for tp in partitions:
            self._counted[tp.partition] = counted_from(*committed.get(tp, (0, "")))

    # ------------------------------------------------------------------ decoding

    def _predictions_of(
        self, records: list[ConsumerRecord[bytes, bytes]], read_at: datetime
    ) -> list[tuple[monitoring_pb2.PredictionRecord, int, int]]:
        out = []
        for record in records:
            # a record re-read after a restart (still needed by the join) was counted before
            first_read = record.offset >= self._counted.get(record.partition, 0)
            if first_read:
                self._counted[record.partition] = record.offset + 1
            prediction = self._decode(record, monitoring_pb2.PredictionRecord, count=first_read)
            if prediction is None:
                continue
            try:
                if first_read:
                    self._metrics.observe(prediction, read_at=read_at)  # validates first
                else:
                    validate(prediction)
            except InvalidArgument as exc:
                if first_read:
                    self._reject(record, exc.code, field=exc.field, reason=exc.reason)
                continue
            if first_read and self._skew is not None and self._skew.wants(record.key):
                self._skew.offer(prediction)
            out.append((prediction, record.partition, record.offset))
        return out

    def _labels_of(
        self, records: list[ConsumerRecord[bytes, bytes]]
    ) -> list[tuple[str, bool, float, int, int]]:
        out = []
        for record in records:
            label = self._decode(record, events_pb2.ValidatedLabel)
            if label is None:
                continue
            if not label.transaction_id:
                self._reject(record, "invalid_field", field="transaction_id", reason="is empty")
                continue
            if label.HasField("ingested_at"):
                at = label.ingested_at.seconds + label.ingested_at.nanos / 1e9
            else:
                at = record.timestamp / 1000.0
            out.append((label.transaction_id, label.is_fraud, at, record.partition, record.offset))
        return out

    def _decode(
        self, record: ConsumerRecord[bytes, bytes], schema: type[M], *, count: bool = True
    ) -> M | None:
        if not record.value:
            if count:
                self._reject(record, "empty_record")
            return None
        try:
            return decode_protobuf(record.value, schema)
        except DecodeError as exc:
            if count:
                self._reject(record, "malformed_protobuf", reason=str(exc))
            return None

    def _reject(
        self, record: ConsumerRecord[bytes, bytes], code: str, *, field: str = "", reason: str = ""
    ) -> None:
        # predictions.log's reasons as they are, the labels' prefixed
        self._metrics.reject(code if record.topic == self._predictions else f"label_{code}")
        log.warning(
            "record_rejected",
            reason_code=code,
            field=field,
            reason=reason,
            topic=record.topic,
            partition=record.partition,
            offset=record.offset,
        )

    # ------------------------------------------------------------------ references, detectors

    def _start_background_work(self) -> None:
        for model_name, version in self.monitor.reference_requests():
            self._spawn(self._load_reference(model_name, version))
        for job in self.monitor.build_jobs():
            self._spawn(self._build(job))

    def _spawn(self, coroutine: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _load_reference(self, model_name: str, version: int) -> None:
        reference = None
        if self._use_training_reference:
            reference = await asyncio.to_thread(self._references, model_name, version)
        self.monitor.reference_loaded(model_name, version, reference)
        self._start_background_work()

    async def _build(self, job: BuildJob) -> None:
        started = time.monotonic()
        try:
            detectors = await asyncio.to_thread(job.build)
        except Exception as exc:  # a degenerate reference must not go unnoticed or kill us
            log.exception("drift_calibration_failed", model=job.model_name, version=job.version)
            self.monitor.detectors_failed(job.model_name, job.version, repr(exc))
            return
        self.monitor.install_data_detectors(job.model_name, job.version, detectors)
        log.info("drift_calibrated", model=job.model_name, version=job.version,
                 seconds=f"{time.monotonic() - started:.1f}")  # fmt: skip

    # ------------------------------------------------------------------ output

    async def _publish(self, events: list[monitoring_pb2.DriftEvent]) -> None:
        futures = [
            await self._producer.send(
                self._drift,
                event.SerializeToString(),
                key=event.model_name.encode(),
                headers=_DRIFT_HEADERS,
            )
            for event in events
        ]
        await asyncio.gather(*futures)

    async def _commit(self) -> None:
        assignment = self._consumer.assignment()
        if not assignment:
            return
        partitions = sorted({tp.partition for tp in assignment})
        marks = self.monitor.join.low_watermarks(partitions)
        offsets: dict[TopicPartition, tuple[int, str]] = {}
        for tp in assignment:
            prediction_mark, label_mark = marks.get(tp.partition, (None, None))
            mark = prediction_mark if tp.topic == self._predictions else label_mark
            try:
                offset = mark if mark is not None else await self._consumer.position(tp)
            except KafkaError:  # the partition was revoked meanwhile
                continue
            metadata = ""
            if tp.topic == self._predictions and tp.partition in self._counted:
                metadata = counted_metadata(self._counted[tp.partition], offset)
            offsets[tp] = (offset, metadata)
        if not offsets:
            return
        try:
            await self._consumer.commit(offsets)
        except KafkaError as exc:
            # a rebalance: the next owner of the partitions re-reads from the last commit
            log.warning("commit_failed", group=self._group, error=repr(exc))

    async def _report_lag(self) -> None:
        lags: dict[int, int] = {}
        for tp in self._consumer.assignment():
            if tp.topic != self._predictions:
                continue
            high_watermark = self._consumer.highwater(tp)
            if high_watermark is None:  # nothing fetched from it yet
                continue
            try:
                lags[tp.partition] = high_watermark - await self._consumer.position(tp)
            except KafkaError:  # revoked meanwhile
                continue
        self._metrics.report_lag(self._group, self._predictions, lags)

    def _compare_skew(self) -> bool:
        """Starts a round of the skew comparison unless one is running (True: started or
        nothing due)."""
        if self._skew is None:
            return True
        if self._comparing is not None and not self._comparing.done():
            return False
        rows = self._skew.due()
        if rows:
            self._comparing = asyncio.ensure_future(asyncio.to_thread(self._skew.compare, rows))
        return True
