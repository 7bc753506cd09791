"""The training service's Kafka transport: one RetrainRequest at a time from training.requests.

The request's offset is committed only after its run finished (logged and registered), so a
crash re-runs it; the pipeline recognises a request it already carried out. While a training
runs (minutes, in a worker thread) the partitions are paused and the consumer keeps polling,
so the group does not consider it dead.

A record that is not a ``RetrainRequest`` (it does not parse, names no model, or its
``message-type`` header names another message) never starts a training: it goes to the
dead-letter topic with the reason (``not_a_retrain_request``), and only then is its offset
committed.

Each run's end is published on ``training.results`` (a ``TrainingResult``: trained, reused or
failed with the error's code), before the request's offset is committed: the autopilot learns
at once that the training it asked for failed (say, too few labelled transactions after a
drift's onset) instead of waiting for a candidate that never comes.
"""

from __future__ import annotations

import asyncio
import time

from aiokafka import AIOKafkaConsumer, ConsumerRecord
from aiokafka.structs import OffsetAndMetadata, TopicPartition
from google.protobuf.message import DecodeError
from prometheus_client import Counter, Gauge, Histogram

from services.shared.codecs import MESSAGE_TYPE, header, protobuf_headers
from services.shared.errors import PlatformError, Unavailable
from services.shared.kafka import create_consumer, create_producer
from services.shared.logging import get_logger
from services.shared.proto.mlops.v1 import monitoring_pb2
from services.shared.retry import pause
from services.shared.sender import OutboundRecord, RecordSender, Source, dead_letter
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
_RESULT_HEADERS = protobuf_headers(monitoring_pb2.TrainingResult())


class TrainingRequestConsumer:
    def __init__(self, settings: TrainingSettings, pipeline: TrainingPipeline) -> None:
        self.settings = settings
        self.pipeline = pipeline
        self.topics = Topics.from_settings(settings.kafka)
        self.topic = self.topics.training_requests
        self.retry_backoff_s = 10.0
        self._sender: RecordSender | None = None

    async def run(self, stop: asyncio.Event) -> None:
        consumer = create_consumer(
            self.settings.kafka,
            self.topic,
            group_id=self.settings.consumer_group,
            client_id="training",
            max_poll_records=1,
        )
        producer = create_producer(self.settings.kafka, client_id="training", linger_ms=0)
        await consumer.start()
        await producer.start()
        self._sender = RecordSender(
            producer,
            dlq_topic=self.topics.dlq,
            max_record_bytes=self.settings.kafka.max_record_bytes,
        )
        log.info("training_consumer_started", topic=self.topic, group=self.settings.consumer_group)
        try:
            while not stop.is_set():
                batches = await consumer.getmany(timeout_ms=500, max_records=1)
                for partition, records in batches.items():
                    for record in records:
                        await self._handle(consumer, partition, record, stop)
        finally:
            await consumer.stop()
            await producer.stop()

    async def _reject(self, record: ConsumerRecord, why: str, stop: asyncio.Event) -> None:
        """Dead-letter a record that is not a request (retried until the broker has it)."""
        letter = dead_letter(
            self.topics.dlq,
            key=record.key,
            value=record.value,
            headers=list(record.headers or ()),
            source=Source(record.topic, record.partition, record.offset, record.timestamp),
            reason_code="not_a_retrain_request",
            reason=f"training service: {why}",
        )
        await self._deliver(letter, stop)
        TRAINING_RUNS.labels("dead_lettered").inc()
        log.error(
            "training_request_dead_lettered",
            partition=record.partition,
            offset=record.offset,
            reason=why,
        )

    async def _handle(
        self,
        consumer: AIOKafkaConsumer,
        partition: TopicPartition,
        record: ConsumerRecord,
        stop: asyncio.Event,
    ) -> None:
        message = monitoring_pb2.RetrainRequest()
        declared = header(list(record.headers or ()), MESSAGE_TYPE)
        why = ""
        if declared and declared != message.DESCRIPTOR.full_name:
            why = f"the record is a {declared[:80]!r}, not a {message.DESCRIPTOR.full_name}"
        else:
            try:
                message.ParseFromString(record.value or b"")
            except DecodeError as exc:
                why = f"not a {message.DESCRIPTOR.full_name}: {exc}"
            else:
                if not message.model_name:
                    why = "the request names no model (model_name is empty)"
        if why:
            await self._reject(record, why, stop)
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
        held = consumer.assignment()
        consumer.pause(*held)
        started = time.monotonic()
        TRAINING_ACTIVE.set(1)
        result = monitoring_pb2.TrainingResult(
            request_id=request.request_id, model_name=self.settings.registry.model_name
        )
        task = asyncio.create_task(
            asyncio.to_thread(self.pipeline.run, request, LoggedProgress(request.request_id))
        )
        try:
            while not task.done():
                await asyncio.wait({task}, timeout=1.0)
                await self._poll_while_paused(consumer)
            outcome: TrainingOutcome = task.result()
        except Unavailable as exc:
            # MLflow, the registry or storage is down: try the same request again later
            log.error("training_retry_later", request_id=request.request_id, error=exc.message)
            TRAINING_RUNS.labels("retry").inc()
            consumer.seek(partition, record.offset)
            await pause(stop, self.retry_backoff_s)
            return
        except PlatformError as exc:
            log.error(
                "training_failed", request_id=request.request_id, code=exc.code, error=exc.message
            )
            TRAINING_RUNS.labels("failed").inc()
            result.status = monitoring_pb2.TRAINING_STATUS_FAILED
            result.error_code, result.error = exc.code, exc.message
        except Exception as exc:  # a bug must not wedge the queue; the request is logged
            log.exception(
                "training_crashed", request_id=request.request_id, error=type(exc).__name__
            )
            TRAINING_RUNS.labels("failed").inc()
            result.status = monitoring_pb2.TRAINING_STATUS_FAILED
            result.error_code = "internal"
            result.error = f"the training crashed ({type(exc).__name__}): see its log"
        else:
            TRAINING_RUNS.labels("reused" if outcome.reused else "trained").inc()
            if "test_pr_auc" in outcome.metrics:
                LAST_TEST_PR_AUC.set(outcome.metrics["test_pr_auc"])
            result.status = (
                monitoring_pb2.TRAINING_STATUS_REUSED
                if outcome.reused
                else monitoring_pb2.TRAINING_STATUS_TRAINED
            )
            result.run_id = outcome.run_id
            result.version = outcome.version.version if outcome.version is not None else 0
        finally:
            TRAINING_ACTIVE.set(0)
            result.seconds = time.monotonic() - started
            TRAINING_SECONDS.observe(result.seconds)
            consumer.resume(*(held | consumer.assignment()))
        result.finished_at.GetCurrentTime()
        await self._report(result, stop)
        await self._commit(consumer, partition, record.offset)

    async def _report(self, result: monitoring_pb2.TrainingResult, stop: asyncio.Event) -> None:
        """Publish what became of a request on training.results (retried until the broker has
        it, before the request's offset is committed: a restart reports it again, never not)."""
        report_record = OutboundRecord(
            self.topics.training_results,
            result.model_name.encode(),
            result.SerializeToString(),
            list(_RESULT_HEADERS),
        )
        if await self._deliver(report_record, stop):
            log.info(
                "training_result_published",
                request_id=result.request_id,
                status=monitoring_pb2.TrainingStatus.Name(result.status),
                version=result.version,
            )

    async def _deliver(self, record: OutboundRecord, stop: asyncio.Event) -> bool:
        """Send ``record``, retried every second until the broker has it (True) or ``stop``."""
        assert self._sender is not None
        while not stop.is_set():
            report = await self._sender.deliver([record])
            if not report.failed:
                return True
            log.warning("delivery_retry", topic=record.topic, error=repr(report.error))
            await pause(stop, 1.0)
        return False

    @staticmethod
    async def _poll_while_paused(consumer: AIOKafkaConsumer) -> None:
        """Poll during a run (a consumer that stops polling leaves its group) without taking
        any request: every partition is paused, and what a rebalance assigned meanwhile (not
        paused) is put back, each partition sought to its first record returned. Requests on
        other partitions wait for the run; before, they were fetched here and thrown away (a
        request or a dead letter lost until the service restarted)."""
        consumer.pause(*consumer.assignment())
        for partition, records in (await consumer.getmany(timeout_ms=0)).items():
            if records:
                consumer.seek(partition, records[0].offset)

    @staticmethod
    async def _commit(consumer: AIOKafkaConsumer, partition: TopicPartition, offset: int) -> None:
        await consumer.commit({partition: OffsetAndMetadata(offset + 1, "")})
