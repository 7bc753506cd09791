"""The training service's Kafka transport: one RetrainRequest at a time from training.requests.

The request's offset is committed only after its run finished (logged and registered), so a
crash re-runs it; the pipeline recognises a request it already carried out. While a training
runs (minutes, in a worker thread) the partitions are paused and the consumer keeps polling,
so the group does not consider it dead.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

from aiokafka import AIOKafkaConsumer, ConsumerRecord
from aiokafka.structs import OffsetAndMetadata, TopicPartition
from google.protobuf.message import DecodeError
from prometheus_client import Counter, Gauge, Histogram

from services.shared.errors import PlatformError, Unavailable
from services.shared.kafka import create_consumer
from services.shared.logging import get_logger
from services.shared.proto.mlops.v1 import monitoring_pb2
from services.shared.topics import Topics
from services.training.pipeline import (
    LoggedProgress,
    TrainingOutcome,
    TrainingPipeline,
    TrainingRequest,
)
from services.training.settings import TrainingSettings

log = get_logger("training.consumer")

TRAINING_RUNS = Counter(
    "mlops_training_runs_total", "Training requests handled, by outcome", ["outcome"]
)
TRAINING_SECONDS = Histogram(
    "mlops_training_duration_seconds",
    "Wall time of a training run (snapshot to registration)",
    buckets=(10, 30, 60, 120, 300, 600, 1200, 3600),
)
TRAINING_ACTIVE = Gauge("mlops_training_active", "1 while a training runs")
LAST_TEST_PR_AUC = Gauge("mlops_training_last_test_pr_auc", "Test PR-AUC of the latest run")


class TrainingRequestConsumer:
    def __init__(self, settings: TrainingSettings, pipeline: TrainingPipeline) -> None:
        self.settings = settings
        self.pipeline = pipeline
        self.topic = Topics.from_settings(settings.kafka).training_requests
        self.retry_backoff_s = 10.0

    async def run(self, stop: asyncio.Event) -> None:
        consumer = create_consumer(
            self.settings.kafka,
            self.topic,
            group_id=self.settings.consumer_group,
            client_id="training",
            max_poll_records=1,
        )
        await consumer.start()
        log.info("training_consumer_started", topic=self.topic, group=self.settings.consumer_group)
        try:
            while not stop.is_set():
                batches = await consumer.getmany(timeout_ms=500, max_records=1)
                for partition, records in batches.items():
                    for record in records:
                        await self._handle(consumer, partition, record, stop)
        finally:
            await consumer.stop()

    async def _handle(
        self,
        consumer: AIOKafkaConsumer,
        partition: TopicPartition,
        record: ConsumerRecord,
        stop: asyncio.Event,
    ) -> None:
        message = monitoring_pb2.RetrainRequest()
        try:
            message.ParseFromString(record.value or b"")
        except DecodeError as exc:
            log.error("training_request_unreadable", offset=record.offset, error=str(exc))
            TRAINING_RUNS.labels("unreadable").inc()
            await self._commit(consumer, partition, record.offset)
            return
        request = TrainingRequest.from_proto(message)
        if request.model_name and request.model_name != self.settings.registry.model_name:
            log.warning("training_request_other_model", request_id=request.request_id)
            TRAINING_RUNS.labels("skipped").inc()
            await self._commit(consumer, partition, record.offset)
            return
        log.info(
            "training_request_received",
            request_id=request.request_id,
            reason=request.reason,
            requested_by=request.requested_by,
            snapshot_id=request.snapshot_id or "new",
        )
        consumer.pause(partition)
        started = time.monotonic()
        TRAINING_ACTIVE.set(1)
        task = asyncio.create_task(
            asyncio.to_thread(self.pipeline.run, request, LoggedProgress(request.request_id))
        )
        try:
            while not task.done():
                await asyncio.wait({task}, timeout=1.0)
                await consumer.getmany(timeout_ms=0)  # paused: keeps the group membership alive
            outcome: TrainingOutcome = task.result()
        except Unavailable as exc:
            # MLflow, the registry or storage is down: try the same request again later
            log.error("training_retry_later", request_id=request.request_id, error=exc.message)
            TRAINING_RUNS.labels("retry").inc()
            consumer.seek(partition, record.offset)
            await _wait(stop, self.retry_backoff_s)
            return
        except PlatformError as exc:
            log.error(
                "training_failed", request_id=request.request_id, code=exc.code, error=exc.message
            )
            TRAINING_RUNS.labels("failed").inc()
        except Exception as exc:  # a bug must not wedge the queue; the request is logged
            log.exception(
                "training_crashed", request_id=request.request_id, error=type(exc).__name__
            )
            TRAINING_RUNS.labels("failed").inc()
        else:
            TRAINING_RUNS.labels("reused" if outcome.reused else "trained").inc()
            if "test_pr_auc" in outcome.metrics:
                LAST_TEST_PR_AUC.set(outcome.metrics["test_pr_auc"])
        finally:
            TRAINING_ACTIVE.set(0)
            TRAINING_SECONDS.observe(time.monotonic() - started)
            consumer.resume(partition)
        await self._commit(consumer, partition, record.offset)

    @staticmethod
    async def _commit(consumer: AIOKafkaConsumer, partition: TopicPartition, offset: int) -> None:
        await consumer.commit({partition: OffsetAndMetadata(offset + 1, "")})


async def _wait(stop: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)
