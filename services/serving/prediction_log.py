"""predictions.log: every answer (and every shadow score) as a ``PredictionRecord``.

The answer never waits for Kafka. ``record`` puts a cheap entry into a bounded buffer and
returns; a background task turns entries into protobuf and hands them to the aiokafka
producer. When the buffer is full (Kafka slow or down) new entries are dropped and counted
(``mlops_serving_prediction_log_dropped_total``); when Kafka is unreachable at start the task
keeps retrying while serving answers.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError
from google.protobuf.timestamp_pb2 import Timestamp

from services.serving import metrics
from services.shared.codecs import protobuf_headers
from services.shared.logging import get_logger
from services.shared.proto.mlops.v1 import events_pb2, monitoring_pb2
from services.shared.usecase.features import MODEL_INPUTS

log = get_logger("serving.prediction_log")

_HEADERS = protobuf_headers(monitoring_pb2.PredictionRecord())
_DRAIN_BATCH = 512


@dataclass(slots=True)
class PredictionEntry:
    """What the hot path hands over; the protobuf is built later, off the answer's path."""

    request_id: str
    transaction: events_pb2.Transaction
    features: np.ndarray  # the model inputs of this row, in MODEL_INPUTS order
    fraud_probability: float
    flagged: bool
    model_name: str
    model_version: int
    route: int
    degraded: bool
    latency_ms: float
    predicted_at: float  # epoch seconds

    def to_record(self) -> monitoring_pb2.PredictionRecord:
        record = monitoring_pb2.PredictionRecord(
            request_id=self.request_id,
            fraud_probability=self.fraud_probability,
            flagged=self.flagged,
            model_name=self.model_name,
            model_version=self.model_version,
            route=self.route,  # type: ignore[arg-type]
            degraded=self.degraded,
            latency_ms=self.latency_ms,
        )
        record.transaction.CopyFrom(self.transaction)
        record.features.update(zip(MODEL_INPUTS, self.features.tolist(), strict=True))
        stamp = Timestamp()
        stamp.FromNanoseconds(int(self.predicted_at * 1e9))
        record.predicted_at.CopyFrom(stamp)
        return record


class PredictionLog:
    """A bounded, never-blocking buffer in front of a Kafka producer."""

    def __init__(
        self,
        producer_factory: Callable[[], AIOKafkaProducer],
        topic: str,
        *,
        capacity: int,
        retry_interval_s: float = 1.0,
    ) -> None:
        self.topic = topic
        self._producer_factory = producer_factory
        self._queue: asyncio.Queue[PredictionEntry] = asyncio.Queue(maxsize=capacity)
        self._retry_interval_s = retry_interval_s
        self._task: asyncio.Task[None] | None = None
        self._producer: AIOKafkaProducer | None = None
        self.dropped = 0
        self.sent = 0
        self.failed = 0

    def record(self, entry: PredictionEntry) -> None:
        """Buffer ``entry`` for predictions.log; drop (and count) it when the buffer is full."""
        try:
            self._queue.put_nowait(entry)
        except asyncio.QueueFull:
            self.dropped += 1
            metrics.PREDICTION_LOG_DROPPED.inc()

    @property
    def buffered(self) -> int:
        return self._queue.qsize()

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def _connect(self) -> AIOKafkaProducer:
        while True:
            producer = self._producer_factory()
            try:
                await producer.start()
                log.info("prediction_log_connected", topic=self.topic)
                return producer
            except (KafkaError, OSError) as exc:
                log.warning("prediction_log_unreachable", topic=self.topic, error=repr(exc))
                await producer.stop()
                await asyncio.sleep(self._retry_interval_s)

    async def _run(self) -> None:
        self._producer = producer = await self._connect()
        while True:
            entries = [await self._queue.get()]
            while len(entries) < _DRAIN_BATCH and not self._queue.empty():
                entries.append(self._queue.get_nowait())
            for entry in entries:
                record = entry.to_record()
                try:
                    # returns once the record is in the producer's buffer; delivery is
                    # confirmed by the future, checked without waiting here
                    delivery = await producer.send(
                        self.topic,
                        record.SerializeToString(),
                        key=record.transaction.transaction_id.encode(),
                        headers=_HEADERS,
                    )
                except KafkaError as exc:
                    self._failed(exc)
                    continue
                finally:
                    self._queue.task_done()
                delivery.add_done_callback(self._delivered)

    def _delivered(self, delivery: asyncio.Future[object]) -> None:
        if delivery.cancelled():
            self._failed(asyncio.CancelledError())
        elif delivery.exception() is not None:
            self._failed(delivery.exception())
        else:
            self.sent += 1

    def _failed(self, exc: BaseException | None) -> None:
        self.failed += 1
        metrics.PREDICTION_LOG_FAILED.inc()
        if self.failed == 1 or self.failed % 1000 == 0:
            log.warning("prediction_log_send_failed", failed=self.failed, error=repr(exc))

    async def close(self, timeout_s: float = 5.0) -> None:
        """Send what is buffered (for up to ``timeout_s``), then stop the producer."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        if self._producer is not None:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._queue.join(), timeout_s)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._producer is not None:
            with contextlib.suppress(KafkaError, asyncio.TimeoutError):
                await asyncio.wait_for(self._producer.flush(), max(0.1, deadline - loop.time()))
            await self._producer.stop()
        if not self._queue.empty():
            log.warning("prediction_log_unsent", records=self._queue.qsize())
