"""``python -m services.features``: the streaming features worker, wired from its settings."""

from __future__ import annotations

import asyncio
import contextlib
import time
from functools import partial
from pathlib import Path

from aiokafka import AIOKafkaProducer, TopicPartition

from services.features.app import FeaturePipeline, writer_id
from services.features.offline_log import FeatureLogWriter
from services.features.outbound import OutboundRecords
from services.features.settings import FeaturesSettings
from services.features.sink import FeastOnlineStore, FeatureSink
from services.shared import broker_compat
from services.shared.errors import Unavailable
from services.shared.featurestore import load_definitions_module, open_store
from services.shared.heap import freeze_periodically
from services.shared.kafka import create_producer, ensure_topics, keep_topics
from services.shared.logging import get_logger
from services.shared.retry import pause
from services.shared.runtime import run_service, set_ready
from services.shared.sender import RecordSender
from services.shared.topics import Topics
from services.shared.usecase.features import (
    MERCHANT_FEATURES,
    MERCHANT_VIEW,
    USER_FEATURES,
    USER_VIEW,
)

SERVICE = "features"
log = get_logger(SERVICE)


def feature_log_writers(settings: FeaturesSettings) -> dict[str, FeatureLogWriter]:
    feature_log_dir = load_definitions_module(settings.feast).feature_log_dir
    offline_dir: Path = settings.storage.offline_dir
    wid = writer_id()
    return {
        USER_VIEW: FeatureLogWriter(
            feature_log_dir(offline_dir, USER_VIEW), "user_id", USER_FEATURES, wid
        ),
        MERCHANT_VIEW: FeatureLogWriter(
            feature_log_dir(offline_dir, MERCHANT_VIEW), "merchant_id", MERCHANT_FEATURES, wid
        ),
    }


async def wait_for_registry(online: FeastOnlineStore, timeout_s: float) -> None:
    """The stack applies the Feast registry (one writer); wait until it has our push sources."""
    deadline = time.monotonic() + timeout_s
    while not await asyncio.to_thread(online.push_sources_registered):
        if time.monotonic() > deadline:
            raise Unavailable(f"Feast registry has no push sources after {timeout_s:.0f}s")
        log.info("waiting_for_feast_registry")
        await asyncio.sleep(2.0)


async def serve(settings: FeaturesSettings, stop: asyncio.Event) -> None:
    # before any consumer exists: faust's table recovery must see Tansu's true end offsets
    broker_compat.activate(settings.kafka)
    writers = feature_log_writers(settings)
    for writer in writers.values():
        writer.remove_stale_temporaries()
    store = await asyncio.to_thread(open_store, settings.feast, settings.redis, settings.storage)
    online = FeastOnlineStore(store, writers)
    await wait_for_registry(online, settings.registry_wait_s)
    producer = create_producer(settings.kafka, client_id=f"{settings.group_id}-outbound")
    await producer.start()
    try:
        await run_pipeline(settings, stop, online, writers, producer)
    finally:
        await producer.stop()


def _log_failed_rewrite(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error(
            "changelogs_not_rewritten",
            error=repr(task.exception()),
            note="a later restart of the service recovers only what came after the loss",
        )


async def run_pipeline(
    settings: FeaturesSettings,
    stop: asyncio.Event,
    online: FeastOnlineStore,
    writers: dict[str, FeatureLogWriter],
    producer: AIOKafkaProducer,
) -> None:
    topics = Topics.from_settings(settings.kafka)
    sender = RecordSender(
        producer,
        dlq_topic=Topics.from_settings(settings.kafka).dlq,
        max_record_bytes=settings.kafka.max_record_bytes,
    )
    outbound = OutboundRecords(sender, settings.kafka.partitions)
    sink = FeatureSink(
        online,
        writers,
        flush_interval_s=settings.offline_flush_interval_s,
        flush_max_rows=settings.offline_flush_max_rows,
        before_ack=outbound.flush,
    )
    pipeline = FeaturePipeline(settings, sink, outbound)
    # the inputs and internal topics exist with the same partition count (co-partitioning),
    # the changelogs too: only a broker that lost them makes the topic check re-create them
    await ensure_topics(
        settings.kafka,
        [topics.validated, topics.validated_labels, topics.dlq, *pipeline.internal_topics],
        compacted=pipeline.changelog_topics,
    )
    app = pipeline.app
    loop = asyncio.get_running_loop()
    rewrites: set[asyncio.Task[None]] = set()

    def rewrite(why: str) -> None:
        task = loop.create_task(pipeline.partition_started_over(why))
        rewrites.add(task)
        task.add_done_callback(rewrites.discard)
        task.add_done_callback(_log_failed_rewrite)

    def topic_started_over(partition: TopicPartition) -> None:
        """On the local broker, a position past a re-created partition's end was reset (the
        broker restarted; broker_compat): in faust's consumer thread."""
        pipeline.consumer.forget_partition(partition)
        why = f"{partition.topic}:{partition.partition} started over"
        loop.call_soon_threadsafe(rewrite, why)

    broker_compat.on_position_reset(topic_started_over)
    # and put them back (with the tables' changelogs, and the tables' facts in them) if the
    # broker loses them (runtime.py does the same for the contract's topics)
    keeper = asyncio.create_task(
        keep_topics(
            settings.kafka,
            stop,
            pipeline.internal_topics,
            compacted=pipeline.changelog_topics,
            on_recreated=lambda topics: pipeline.topics_lost(f"re-created {','.join(topics)}"),
        ),
        name="keep-internal",
    )

    async def ready() -> None:
        pipeline.drop_faust_monitor()
        set_ready(SERVICE, True)
        log.info("features_ready", group=settings.group_id, partitions=settings.kafka.partitions)

    app.on_startup_finished = ready
    sink.start()
    # the heap (modules, the Feast registry, then the recovered state) out of full collections
    heap = asyncio.create_task(freeze_periodically(settings, stop), name="heap")
    try:
        await app.start()
        while not app.should_stop:
            if await pause(stop, 1.0):
                break
    finally:
        set_ready(SERVICE, False)
        try:
            # graceful stop: push and log what is queued, so its offsets get committed
            await asyncio.wait_for(sink.close(drain=not app.crashed), timeout=30)
        except TimeoutError:
            log.warning("sink_not_drained", note="unacknowledged events will be redelivered")
        await app.stop()
        await outbound.close()
        keeper.cancel()
        heap.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await heap
    if app.crashed:
        raise RuntimeError(f"faust app crashed: {app.crash_reason!r}")


def main() -> int:
    settings = FeaturesSettings()
    return run_service(SERVICE, settings, partial(serve, settings))
