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
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError
from aiokafka.partitioner import DefaultPartitioner
from aiokafka.producer.message_accumulator import BatchBuilder
from google.protobuf.timestamp_pb2 import Timestamp

from services.serving import metrics
from services.shared.codecs import protobuf_headers
from services.shared.logging import get_logger
from services.shared.proto.mlops.v1 import events_pb2, monitoring_pb2
from services.shared.protowire import DOUBLE, length_delimited, varint
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
        seconds = int(self.predicted_at)
        return monitoring_pb2.PredictionRecord(
            request_id=self.request_id,
            transaction=self.transaction,
            features=dict(zip(MODEL_INPUTS, self.features.tolist(), strict=True)),
            fraud_probability=self.fraud_probability,
            flagged=self.flagged,
            model_name=self.model_name,
            model_version=self.model_version,
            route=self.route,  # type: ignore[arg-type]
            degraded=self.degraded,
            latency_ms=self.latency_ms,
            predicted_at=Timestamp(seconds=seconds, nanos=int((self.predicted_at - seconds) * 1e9)),
        )


class RecordEncoder:
    """``PredictionRecord`` wire bytes for many entries, without building the messages.

    Building each record as a message (a copy of the transaction, a 16-entry map) and
    serialising it cost more of serving's CPU than scoring the row. The encoding is the
    protobuf wire format of monitoring.proto's field numbers; the map entries of every row
    of a batch come out of one numpy array whose per-feature key prefixes are constant.
    Parsing the bytes gives exactly ``PredictionEntry.to_record()`` (unit-tested).
    """

    def __init__(self) -> None:
        fields: list[tuple[str, str]] = []
        self._prefixes: list[bytes] = []
        for i, name in enumerate(MODEL_INPUTS):
            key = length_delimited(0x0A, name.encode())  # map entry field 1: the name
            entry_size = len(key) + 1 + 8  # field 2: the value, a fixed64 double
            prefix = bytes((0x1A,)) + varint(entry_size) + key + bytes((0x11,))
            self._prefixes.append(prefix)
            fields += [(f"key{i}", f"V{len(prefix)}"), (f"value{i}", "<f8")]
        self._rows = np.dtype(fields)  # packed: one row's map entries, back to back
        self._middles: dict[tuple[bool, str, int, int, bool], bytes] = {}

    def _features(self, entries: list[PredictionEntry]) -> list[bytes]:
        matrix = np.stack([entry.features for entry in entries]).astype(np.float64)
        rows = np.empty(len(entries), self._rows)
        for i, prefix in enumerate(self._prefixes):
            rows[f"key{i}"] = np.void(prefix)
            rows[f"value{i}"] = matrix[:, i]
        raw, size = rows.tobytes(), self._rows.itemsize
        return [raw[k * size : (k + 1) * size] for k in range(len(entries))]

    def _middle(self, entry: PredictionEntry) -> bytes:
        """Fields 5 to 9 but the probability: few distinct values, encoded once each."""
        key = (entry.flagged, entry.model_name, entry.model_version, entry.route, entry.degraded)
        encoded = self._middles.get(key)
        if encoded is None:
            if len(self._middles) > 256:
                self._middles.clear()
            encoded = self._middles[key] = b"".join(
                (
                    b"\x28\x01" if entry.flagged else b"",
                    length_delimited(0x32, entry.model_name.encode()),
                    b"\x38" + varint(entry.model_version),
                    b"\x40" + varint(entry.route),
                    b"\x48\x01" if entry.degraded else b"",
                )
            )
        return encoded

    def encode(self, entries: list[PredictionEntry]) -> list[bytes]:
        """The serialised record of each entry, in order."""
        if not entries:
            return []
        out = []
        pack = DOUBLE.pack
        seconds_of: dict[int, bytes] = {}
        for entry, features in zip(entries, self._features(entries), strict=True):
            seconds = int(entry.predicted_at)
            nanos = int((entry.predicted_at - seconds) * 1e9)
            encoded_seconds = seconds_of.get(seconds)
            if encoded_seconds is None:
                encoded_seconds = seconds_of[seconds] = (
                    b"\x08" + varint(seconds) if seconds else b""
                )
            timestamp = encoded_seconds + (b"\x10" + varint(nanos) if nanos else b"")
            request_id = entry.request_id.encode()
            transaction = entry.transaction.SerializeToString()
            out.append(
                b"".join(
                    (
                        b"\x0a",
                        varint(len(request_id)),
                        request_id,
                        b"\x12",
                        varint(len(transaction)),
                        transaction,
                        features,
                        b"\x21",
                        pack(entry.fraud_probability),
                        self._middle(entry),
                        b"\x51",
                        pack(entry.latency_ms),
                        b"\x5a",
                        bytes((len(timestamp),)),  # at most 17 bytes: one length byte
                        timestamp,
                    )
                )
            )
        return out


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
        self._last_warning = 0.0
        self._encoder = RecordEncoder()

    def record(self, entry: PredictionEntry) -> None:
        """Buffer ``entry`` for predictions.log; drop (and count) it when the buffer is full."""
        try:
            self._queue.put_nowait(entry)
        except asyncio.QueueFull:
            self.dropped += 1
            metrics.PREDICTION_LOG_DROPPED.inc()

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
        partitioner = DefaultPartitioner()
        while True:
            entries = [await self._queue.get()]
            while len(entries) < _DRAIN_BATCH and not self._queue.empty():
                entries.append(self._queue.get_nowait())
            try:
                await self._send(producer, partitioner, entries)
            except KafkaError as exc:
                self._failed(exc, len(entries))
            finally:
                for _ in entries:
                    self._queue.task_done()

    async def _send(
        self,
        producer: AIOKafkaProducer,
        partitioner: DefaultPartitioner,
        entries: list[PredictionEntry],
    ) -> None:
        """Hand records to the producer as one batch per partition (per-record ``send`` costs
        several times more Python per record); keyed by transaction id, partitioned as
        ``send`` would (Kafka's murmur2 of the key)."""
        partitions = sorted(await producer.partitions_for(self.topic))
        by_partition: dict[int, list[tuple[bytes, bytes]]] = {}
        for entry, value in zip(entries, self._encoder.encode(entries), strict=True):
            key = entry.transaction.transaction_id.encode()
            partition = partitioner(key, partitions, partitions)
            by_partition.setdefault(partition, []).append((key, value))
        for partition, records in by_partition.items():
            batch = producer.create_batch()
            count = 0
            for key, value in records:
                if batch.append(key=key, value=value, timestamp=None, headers=_HEADERS) is None:
                    # full: send it and start the next one with this record
                    await self._submit(producer, batch, partition, count)
                    batch, count = producer.create_batch(), 0
                    batch.append(key=key, value=value, timestamp=None, headers=_HEADERS)
                count += 1
            await self._submit(producer, batch, partition, count)

    async def _submit(
        self, producer: AIOKafkaProducer, batch: BatchBuilder, partition: int, count: int
    ) -> None:
        if count == 0:
            return
        delivery = await producer.send_batch(batch, self.topic, partition=partition)
        delivery.add_done_callback(lambda done: self._delivered(done, count))

    def _delivered(self, delivery: asyncio.Future[object], count: int) -> None:
        if delivery.cancelled():
            self._failed(asyncio.CancelledError(), count)
        elif delivery.exception() is not None:
            self._failed(delivery.exception(), count)
        else:
            self.sent += count

    def _failed(self, exc: BaseException | None, count: int) -> None:
        self.failed += count
        metrics.PREDICTION_LOG_FAILED.inc(count)
        now = time.monotonic()
        if now - self._last_warning >= 1.0:  # one line a second while the broker is away
            self._last_warning = now
            log.warning(
                "prediction_log_send_failed", records=count, failed=self.failed, error=repr(exc)
            )

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
