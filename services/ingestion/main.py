"""Wiring of the ingestion service from its settings (``python -m services.ingestion``)."""

from __future__ import annotations

import asyncio
import contextlib
from functools import partial

from aiokafka import AIOKafkaConsumer

from services.ingestion.archive import ArchiveBatcher, Archiver, OfflineArchive
from services.ingestion.claims import RedisClaims, connect
from services.ingestion.consumers import ArchiveLoop, Backoff, Stopping, ValidationLoop
from services.ingestion.routing import EventRouter, Ingestor
from services.ingestion.settings import IngestionSettings
from services.shared.errors import Unavailable
from services.shared.kafka import create_consumer, create_producer, ensure_topics
from services.shared.logging import get_logger
from services.shared.runtime import SERVICE_READY, run_service
from services.shared.topics import Topics

SERVICE = "ingestion"
log = get_logger(SERVICE)


async def _ensure_topics_until_up(settings: IngestionSettings, backoff: Backoff) -> None:
    async def attempt() -> None:
        try:
            await ensure_topics(settings.kafka, timeout_s=0)
        except Unavailable as exc:
            raise OSError(str(exc)) from exc  # retryable for the back-off

    await backoff.run(attempt, "ensure_topics")


async def serve(settings: IngestionSettings, stop: asyncio.Event) -> None:
    topics = Topics.from_settings(settings.kafka)
    backoff = Backoff(stop, initial_s=settings.retry_initial_s, max_s=settings.retry_max_s)
    redis = connect(settings.redis)
    claims = RedisClaims(redis, ttl_s=settings.dedup_ttl_s)
    producer = create_producer(settings.kafka, client_id=f"{SERVICE}-validator")
    validator_consumer = create_consumer(
        settings.kafka,
        topics.transactions,
        topics.labels,
        group_id=settings.group_id,
        client_id=f"{SERVICE}-validator",
        max_poll_records=settings.batch_max_records,
    )
    validator = ValidationLoop(
        validator_consumer,
        producer,
        Ingestor(EventRouter(topics), claims, namespace=settings.dedup_namespace),
        backoff,
        group=settings.group_id,
        batch_max_records=settings.batch_max_records,
        poll_timeout_ms=settings.poll_timeout_ms,
        lag_interval_s=settings.lag_interval_s,
    )
    archiver: ArchiveLoop | None = None
    archive_consumer: AIOKafkaConsumer | None = None
    if settings.archive_enabled:
        archive_consumer = create_consumer(
            settings.kafka,
            group_id=settings.archive_group_id,
            client_id=f"{SERVICE}-archive",
            max_poll_records=5000,
        )
        archiver = ArchiveLoop(
            archive_consumer,
            Archiver(
                topics,
                claims,
                ArchiveBatcher(
                    max_rows=settings.archive_max_rows, max_age_s=settings.archive_max_age_s
                ),
                namespace=settings.dedup_namespace,
            ),
            OfflineArchive(settings.storage.offline_dir),
            backoff,
            group=settings.archive_group_id,
            poll_timeout_ms=settings.poll_timeout_ms,
            lag_interval_s=settings.lag_interval_s,
        )
        archive_consumer.subscribe(archiver.topics, listener=archiver)

    started: list[object] = []
    try:
        await _ensure_topics_until_up(settings, backoff)
        await backoff.run(redis.ping, "redis_ping")
        for client in (producer, validator_consumer, archive_consumer):
            if client is not None:
                await backoff.run(client.start, "kafka_start")
                started.append(client)
        log.info(
            "ingestion_started",
            bootstrap=settings.kafka.bootstrap,
            sources=f"{topics.transactions},{topics.labels}",
            validated=topics.validated,
            dlq=topics.dlq,
            archive=str(settings.storage.offline_dir) if archiver else "off",
            redis=settings.redis.connection_string,
        )
        tasks = [asyncio.create_task(validator.run(stop), name="validator")]
        if archiver is not None:
            tasks.append(asyncio.create_task(archiver.run(stop), name="archive"))
        stats = asyncio.create_task(_report(validator, archiver, stop), name="stats")
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
            for task in done:
                if task.exception() is not None and not isinstance(task.exception(), Stopping):
                    stop.set()  # one loop died: stop the other cleanly, then fail
                    await asyncio.gather(*tasks, return_exceptions=True)
                    raise task.exception()  # type: ignore[misc]
            await asyncio.gather(*tasks, return_exceptions=True)
        finally:
            stats.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await stats
    except Stopping:
        log.info("stopped_while_retrying")
    finally:
        SERVICE_READY.labels(SERVICE).set(0)
        for client in reversed(started):
            with contextlib.suppress(Exception):
                await client.stop()  # type: ignore[attr-defined]
        await redis.close()
        log.info("ingestion_totals", **validator.totals, **(archiver.totals if archiver else {}))


async def _report(
    validator: ValidationLoop, archiver: ArchiveLoop | None, stop: asyncio.Event
) -> None:
    """A progress line every 30 s (the metrics have the details)."""
    while not stop.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=30)
        log.info("ingestion_progress", **validator.totals, **(archiver.totals if archiver else {}))


def main() -> int:
    settings = IngestionSettings()
    return run_service(SERVICE, settings, partial(serve, settings))
