"""Kafka transport of the monitoring service: predictions.log -> ``PredictionLogMetrics``.

Reads in the monitoring consumer group, decodes each record and hands it to the metrics;
a record that cannot be read is counted and logged with its position (it stays in the log,
nothing is lost) and never stops the reader. Offsets are committed after each handled batch.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from datetime import UTC, datetime

from aiokafka import AIOKafkaConsumer, ConsumerRecord
from aiokafka.errors import KafkaError
from google.protobuf.message import DecodeError

from services.monitoring.prediction_metrics import PredictionLogMetrics
from services.shared.codecs import decode_protobuf
from services.shared.errors import InvalidArgument
from services.shared.logging import get_logger
from services.shared.proto.mlops.v1 import monitoring_pb2

log = get_logger("monitoring")


class PredictionLogReader:
    def __init__(
        self,
        consumer: AIOKafkaConsumer,
        metrics: PredictionLogMetrics,
        *,
        group: str,
        topic: str,
        poll_timeout_ms: int,
        max_records: int,
        lag_interval_s: float,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self._consumer = consumer
        self._metrics = metrics
        self._group = group
        self._topic = topic
        self._poll_timeout_ms = poll_timeout_ms
        self._max_records = max_records
        self._lag_interval_s = lag_interval_s
        self._clock = clock

    async def run(self, stop: asyncio.Event) -> None:
        """Read until ``stop`` is set (seen within one poll timeout)."""
        next_lag_report = 0.0
        while not stop.is_set():
            batches = await self._consumer.getmany(
                timeout_ms=self._poll_timeout_ms, max_records=self._max_records
            )
            read_at = self._clock()
            for records in batches.values():
                for record in records:
                    self.handle(record, read_at)
            if batches:
                try:
                    await self._consumer.commit()
                except KafkaError as exc:
                    # a rebalance: the next owner of the partitions re-reads from the last commit
                    log.warning("commit_failed", group=self._group, error=repr(exc))
            if time.monotonic() >= next_lag_report:
                await self._report_lag()
                next_lag_report = time.monotonic() + self._lag_interval_s

    def handle(self, record: ConsumerRecord[bytes, bytes], read_at: datetime) -> None:
        position = {"topic": record.topic, "partition": record.partition, "offset": record.offset}
        if not record.value:
            self._metrics.reject("empty_record")
            log.warning("record_rejected", reason_code="empty_record", **position)
            return
        try:
            prediction = decode_protobuf(record.value, monitoring_pb2.PredictionRecord)
            self._metrics.observe(prediction, read_at=read_at)
        except DecodeError as exc:
            self._metrics.reject("malformed_protobuf")
            log.warning(
                "record_rejected", reason_code="malformed_protobuf", error=str(exc), **position
            )
        except InvalidArgument as exc:
            self._metrics.reject(exc.code)
            log.warning(
                "record_rejected",
                reason_code=exc.code,
                field=exc.field,
                reason=exc.reason,
                **position,
            )

    async def _report_lag(self) -> None:
        lags: dict[int, int] = {}
        for partition in self._consumer.assignment():
            high_watermark = self._consumer.highwater(partition)
            if high_watermark is None:  # nothing fetched from it yet
                continue
            lags[partition.partition] = high_watermark - await self._consumer.position(partition)
        self._metrics.report_lag(self._group, self._topic, lags)
