"""Kafka transport of the monitoring service's join, quality and drift.

Reads predictions.log and events.validated.labels in one consumer group (the range assignor
keeps partition N of both topics with the same member: both are keyed by transaction_id and
co-partitioned), decodes each record and hands it to ``LiveMonitor`` (join, quality, drift).
(The counts of predictions.log are ``PredictionLogReader``'s, in a group of their own that
commits as it goes: this group re-reads what was waiting after a restart, and counting it
again would double the counts.) A record that cannot be read is counted and logged with
its position and never stops the reader (it stays in the log). Drift events are published to
monitoring.drift (keyed by model name) and acknowledged before any offset is committed.

Offsets: every ``commit_interval_s``, each partition is committed up to the oldest record the
join still needs (``OutcomeJoin.low_watermarks``): a prediction still waiting for its label, and
the labels that may still meet one. After a restart exactly those are read again; what was
already joined before them is not (no double count), what is re-read is counted once.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition
from aiokafka.errors import KafkaError
from google.protobuf.message import DecodeError, Message

from services.monitoring.monitor import BuildJob, LiveMonitor
from services.monitoring.prediction_metrics import PredictionLogMetrics, validate
from services.shared.codecs import decode_protobuf, protobuf_headers
from services.shared.drift_reference import DriftReference
from services.shared.errors import InvalidArgument
from services.shared.logging import get_logger
from services.shared.proto.mlops.v1 import events_pb2, monitoring_pb2

log = get_logger("monitoring")

_DRIFT_HEADERS = protobuf_headers(monitoring_pb2.DriftEvent())

M = TypeVar("M", bound=Message)
ReferenceLoader = Callable[[str, int], DriftReference | None]


class MonitoringReader:
    def __init__(
        self,
        consumer: AIOKafkaConsumer,
        producer: AIOKafkaProducer,
        metrics: PredictionLogMetrics,
        monitor: LiveMonitor,
        references: ReferenceLoader,
        *,
        group: str,
        predictions_topic: str,
        labels_topic: str,
        drift_topic: str,
        poll_timeout_ms: int,
        max_records: int,
        commit_interval_s: float,
        tick_interval_s: float,
        use_training_reference: bool,
    ) -> None:
        self._consumer = consumer
        self._producer = producer
        self._metrics = metrics
        self.monitor = monitor
        self._references = references
        self._group = group
        self._predictions = predictions_topic
        self._labels = labels_topic
        self._drift = drift_topic
        self._poll_timeout_ms = poll_timeout_ms
        self._max_records = max_records
        self._commit_interval_s = commit_interval_s
        self._tick_interval_s = tick_interval_s
        self._use_training_reference = use_training_reference
        self._tasks: set[asyncio.Task[None]] = set()

    async def run(self, stop: asyncio.Event) -> None:
        """Read until ``stop`` is set (seen within one poll timeout)."""
        next_commit = next_tick = 0.0
        try:
            while not stop.is_set():
                batches = await self._consumer.getmany(
                    timeout_ms=self._poll_timeout_ms, max_records=self._max_records
                )
                events: list[monitoring_pb2.DriftEvent] = []
                for tp, records in batches.items():
                    if tp.topic == self._predictions:
                        events += self.monitor.add_predictions(self._predictions_of(records))
                    else:
                        events += self.monitor.add_labels(self._labels_of(records))
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
        finally:
            for task in self._tasks:
                task.cancel()

    # ------------------------------------------------------------------ decoding

    def _predictions_of(
        self, records: list[ConsumerRecord[bytes, bytes]]
    ) -> list[tuple[monitoring_pb2.PredictionRecord, int, int]]:
        out = []
        for record in records:
            # unreadable predictions are counted and logged by PredictionLogReader
            prediction = self._decode(record, monitoring_pb2.PredictionRecord, count=False)
            if prediction is None:
                continue
            try:
                validate(prediction)
            except InvalidArgument:
                continue
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
        self._metrics.reject(f"label_{code}")
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
        offsets: dict[TopicPartition, int] = {}
        for tp in assignment:
            prediction_mark, label_mark = marks.get(tp.partition, (None, None))
            mark = prediction_mark if tp.topic == self._predictions else label_mark
            try:
                offsets[tp] = mark if mark is not None else await self._consumer.position(tp)
            except KafkaError:  # the partition was revoked meanwhile
                continue
        if not offsets:
            return
        try:
            await self._consumer.commit(offsets)
        except KafkaError as exc:
            # a rebalance: the next owner of the partitions re-reads from the last commit
            log.warning("commit_failed", group=self._group, error=repr(exc))
