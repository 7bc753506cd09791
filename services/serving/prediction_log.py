"""predictions.log: every answer (and every shadow score) as a ``PredictionRecord``.

The answer never waits for Kafka. ``record`` puts one scored batch's answers (a
``PredictionBatch``: columns, not an object per row) into a bounded buffer and returns; a
background task wakes at most every ``drain_interval_s``, turns what is buffered into protobuf
wire bytes and hands it to the shared ``RecordSender`` (one record batch per partition; a
record over the broker's limit is dead-lettered and counted there, as by every service). When
the buffer is full (Kafka slow or down) new records are dropped and counted
(``mlops_serving_prediction_log_dropped_total``, by design: an answer never waits for the
log); a failed delivery is counted (``mlops_serving_prediction_log_failed_total``); when
Kafka is unreachable at start the task keeps retrying while serving answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import numpy as np
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError

from services.serving import metrics
from services.shared.codecs import protobuf_headers
from services.shared.logging import get_logger
from services.shared.proto.mlops.v1 import events_pb2, monitoring_pb2
from services.shared.protowire import DOUBLE, length_delimited, varint
from services.shared.retry import Backoff, retry
from services.shared.sender import OutboundRecord, RecordSender, RecordTooLarge
from services.shared.topics import Topics
from services.shared.usecase.features import MODEL_INPUTS

log = get_logger("serving.prediction_log")

_HEADERS = protobuf_headers(monitoring_pb2.PredictionRecord())
_DRAIN_RECORDS = 2048  # most records encoded and handed to the producer in one go


@dataclass(slots=True)
class PredictionBatch:
    """The answers of one version to some rows of a scored batch, as columns: the predictor
    records a batch as it scored it, no object per row; ``RecordEncoder`` turns each row into
    a ``PredictionRecord`` when the log is sent."""

    request_ids: list[str]
    transactions: list[events_pb2.Transaction]
    features: np.ndarray  # rows x MODEL_INPUTS
    fraud_probabilities: list[float]
    flagged: list[bool]
    latencies_ms: list[float]
    model_name: str
    model_version: int
    route: int
    degraded: bool
    predicted_at: float  # epoch seconds
    replayed: bool = False  # shadow scores of earlier answers (PredictionRecord.replayed)

    def __len__(self) -> int:
        return len(self.request_ids)

    def head(self, rows: int) -> PredictionBatch:
        """The first ``rows`` rows."""
        return PredictionBatch(
            self.request_ids[:rows],
            self.transactions[:rows],
            self.features[:rows],
            self.fraud_probabilities[:rows],
            self.flagged[:rows],
            self.latencies_ms[:rows],
            self.model_name,
            self.model_version,
            self.route,
            self.degraded,
            self.predicted_at,
            self.replayed,
        )


class RecordEncoder:
    """``PredictionRecord`` wire bytes for many entries, without building the messages.

    Building each record as a message (a copy of the transaction, a 16-entry map) and
    serialising it cost more of serving's CPU than scoring the row. The encoding is the
    protobuf wire format of monitoring.proto's field numbers; the map entries of every row
    of a batch come out of one numpy array whose per-feature key prefixes are constant.
    Parsing the bytes gives exactly the message built field by field with the protobuf API
    (unit-tested against such a reference).
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

    def _features(self, features: np.ndarray) -> list[bytes]:
        """Each row's feature map entries, from the [rows, MODEL_INPUTS] matrix."""
        matrix = np.asarray(features, dtype=np.float64)
        count = matrix.shape[0]
        rows = np.empty(count, self._rows)
        for i, prefix in enumerate(self._prefixes):
            rows[f"key{i}"] = np.void(prefix)
            rows[f"value{i}"] = matrix[:, i]
        raw, size = rows.tobytes(), self._rows.itemsize
        return [raw[k * size : (k + 1) * size] for k in range(count)]

    def _middle(
        self, flagged: bool, model_name: str, model_version: int, route: int, degraded: bool
    ) -> bytes:
        """Fields 5 to 9 but the probability: few distinct values, encoded once each."""
        key = (flagged, model_name, model_version, route, degraded)
        encoded = self._middles.get(key)
        if encoded is None:
            if len(self._middles) > 256:
                self._middles.clear()
            encoded = self._middles[key] = b"".join(
                (
                    b"\x28\x01" if flagged else b"",
                    length_delimited(0x32, model_name.encode()),
                    b"\x38" + varint(model_version),
                    b"\x40" + varint(route),
                    b"\x48\x01" if degraded else b"",
                )
            )
        return encoded

    @staticmethod
    def _timestamp(predicted_at: float) -> bytes:
        """Field 11 (a Timestamp), tag and length included."""
        seconds = int(predicted_at)
        nanos = int((predicted_at - seconds) * 1e9)
        timestamp = (b"\x08" + varint(seconds) if seconds else b"") + (
            b"\x10" + varint(nanos) if nanos else b""
        )
        return b"\x5a" + bytes((len(timestamp),)) + timestamp  # at most 17 bytes: one byte

    def encode_batch(self, batch: PredictionBatch) -> list[bytes]:
        """The serialised ``PredictionRecord`` of each row of ``batch``, in order."""
        if not len(batch):
            return []
        pack = DOUBLE.pack
        middles = {
            flagged: self._middle(
                flagged, batch.model_name, batch.model_version, batch.route, batch.degraded
            )
            for flagged in (False, True)
        }
        timestamp = self._timestamp(batch.predicted_at)
        if batch.replayed:
            timestamp += b"\x60\x01"  # field 12, replayed = true
        out = []
        for request_id, transaction, features, probability, flagged, latency_ms in zip(
            batch.request_ids,
            batch.transactions,
            self._features(batch.features),
            batch.fraud_probabilities,
            batch.flagged,
            batch.latencies_ms,
            strict=True,
        ):
            encoded_id = request_id.encode()
            encoded_txn = transaction.SerializeToString()
            out.append(
                b"".join(
                    (
                        b"\x0a",
                        varint(len(encoded_id)),
                        encoded_id,
                        b"\x12",
                        varint(len(encoded_txn)),
                        encoded_txn,
                        features,
                        b"\x21",
                        pack(probability),
                        middles[flagged],
                        b"\x51",
                        pack(latency_ms),
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
        dlq_topic: str = Topics.dlq,
        max_record_bytes: int = 1_000_000,
        retry_interval_s: float = 1.0,
        drain_interval_s: float = 0.02,
    ) -> None:
        self.topic = topic
        self._dlq_topic = dlq_topic
        self._max_record_bytes = max_record_bytes
        self._producer_factory = producer_factory
        self._capacity = capacity
        self._batches: deque[PredictionBatch] = deque()
        self._buffered = 0  # records in _batches
        self._unsent = 0  # records buffered or being handed to the producer
        self._wake = asyncio.Event()  # set when something was buffered
        self._drained = asyncio.Event()  # set while _unsent == 0
        self._drained.set()
        self._retry_interval_s = retry_interval_s
        self._drain_interval_s = drain_interval_s
        self._task: asyncio.Task[None] | None = None
        self._producer: AIOKafkaProducer | None = None
        self.dropped = 0
        self.dead_lettered = 0
        self.sent = 0
        self.failed = 0
        self._last_warning = 0.0
        self._encoder = RecordEncoder()

    @property
    def buffered(self) -> int:
        """Records waiting to be handed to the producer."""
        return self._buffered

    def record(self, batch: PredictionBatch) -> None:
        """Buffer ``batch`` for predictions.log; the records beyond the buffer's capacity are
        dropped (and counted)."""
        count = len(batch)
        room = self._capacity - self._buffered
        if count > room:
            dropped = count - max(room, 0)
            self.dropped += dropped
            metrics.PREDICTION_LOG_DROPPED.inc(dropped)
            if room <= 0:
                return
            batch, count = batch.head(room), room
        self._batches.append(batch)
        self._buffered += count
        self._unsent += count
        self._drained.clear()
        self._wake.set()

    def take(self, records: int = _DRAIN_RECORDS) -> list[PredictionBatch]:
        """Buffered batches, oldest first, up to about ``records`` records (at least one)."""
        taken: list[PredictionBatch] = []
        count = 0
        batches = self._batches
        while batches and count < records:
            batch = batches.popleft()
            taken.append(batch)
            count += len(batch)
        self._buffered -= count
        return taken

    def _handed_over(self, count: int) -> None:
        self._unsent -= count
        if self._unsent <= 0:
            self._drained.set()

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def _connect(self) -> AIOKafkaProducer:
        async def start() -> AIOKafkaProducer:
            producer = self._producer_factory()
            try:
                await producer.start()
            except (KafkaError, OSError):
                await producer.stop()
                raise
            return producer

        producer = await retry(
            start,
            retryable=(KafkaError, OSError),
            backoff=Backoff(self._retry_interval_s),
            on_retry=lambda exc, _: log.warning(
                "prediction_log_unreachable", topic=self.topic, error=repr(exc)
            ),
        )
        log.info("prediction_log_connected", topic=self.topic)
        return producer

    async def _run(self) -> None:
        self._producer = producer = await self._connect()
        sender = RecordSender(
            producer, dlq_topic=self._dlq_topic, max_record_bytes=self._max_record_bytes
        )
        loop = asyncio.get_running_loop()
        while True:
            await self._wake.wait()
            self._wake.clear()
            started = loop.time()
            while self._batches:
                batches = self.take()
                count = sum(len(b) for b in batches)
                try:
                    await self._send(sender, batches)
                except (KafkaError, RecordTooLarge) as exc:
                    self._failed(exc, count)
                finally:
                    self._handed_over(count)
            # what comes in meanwhile waits for the next round: fewer, fuller record batches
            # (each costs the producer Python of its own); the answers never wait for this
            pause = self._drain_interval_s - (loop.time() - started)
            if pause > 0:
                await asyncio.sleep(pause)

    async def _send(self, sender: RecordSender, batches: list[PredictionBatch]) -> None:
        """Hand the records to the sender, keyed by transaction id (one record batch per
        partition; per-record ``send`` costs several times more Python per record)."""
        records = [
            OutboundRecord(self.topic, transaction.transaction_id.encode(), value, _HEADERS)
            for batch in batches
            for transaction, value in zip(
                batch.transactions, self._encoder.encode_batch(batch), strict=True
            )
        ]
        for delivery in await sender.submit(records):
            count = len(delivery.records)
            if delivery.topic != self.topic:
                # over the broker's limit: dead-lettered (counted and logged by the sender)
                self.dead_lettered += count
                continue
            delivery.future.add_done_callback(partial(self._delivered, count=count))

    def _delivered(self, delivery: asyncio.Future[object], *, count: int) -> None:
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
                await asyncio.wait_for(self._drained.wait(), timeout_s)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._producer is not None:
            with contextlib.suppress(KafkaError, asyncio.TimeoutError):
                await asyncio.wait_for(self._producer.flush(), max(0.1, deadline - loop.time()))
            await self._producer.stop()
        if self._unsent > 0:
            log.warning("prediction_log_unsent", records=self._unsent)
