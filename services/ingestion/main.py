"""Wiring of the ingestion service from its settings (``python -m services.ingestion``).

One process runs the validator and the archive consumer (``role=all``, the default), or one
of them (``MLOPS_INGESTION_ROLE=validator|archive``) so that each gets a core of its own.
"""

from __future__ import annotations

import asyncio
import contextlib
from functools import partial
from typing import Any

from services.ingestion.archive import ArchiveBatcher, Archiver, OfflineArchive
from services.ingestion.claims import RedisClaims, connect
from services.ingestion.consumers import ArchiveLoop, Retry, ValidationLoop
from services.ingestion.routing import EventRouter, Ingestor
from services.ingestion.settings import IngestionSettings
from services.shared.errors import Unavailable
from services.shared.heap import freeze_periodically
from services.shared.kafka import create_consumer, create_producer, ensure_topics
from services.shared.logging import get_logger
from services.shared.retry import Stopping, ticks
from services.shared.runtime import run_service, set_ready
from services.shared.sender import RecordSender
from services.shared.topics import Topics

SERVICE = "ingestion"
log = get_logger(SERVICE)


async def _ensure_topics_until_up(settings: IngestionSettings, retries: Retry) -> None:
    async def attempt() -> None:
        try:
            await ensure_topics(settings.kafka, timeout_s=0)
        except Unavailable as exc:
            raise OSError(str(exc)) from exc  # retryable for the back-off

    await retries.run(attempt, "ensure_topics")


def _validator(
    settings: IngestionSettings, topics: Topics, claims: RedisClaims, retries: Retry
) -> tuple[ValidationLoop, list[Any]]:
    producer = create_producer(settings.kafka, client_id=f"{SERVICE}-validator")
    consumer = create_consumer(
        settings.kafka,
        topics.transactions,
        topics.labels,
        group_id=settings.group_id,
        client_id=f"{SERVICE}-validator",
        max_poll_records=settings.batch_max_records,
    )
    loop = ValidationLoop(
        consumer,
        RecordSender(
            producer, dlq_topic=topics.dlq, max_record_bytes=settings.kafka.max_record_bytes
        ),
        Ingestor(EventRouter(topics), claims, namespace=settings.dedup_namespace),
        retries,
        group=settings.group_id,
        batch_max_records=settings.batch_max_records,
        poll_timeout_ms=settings.poll_timeout_ms,
        lag_interval_s=settings.lag_interval_s,
    )
    return loop, [producer, consumer]


def _archive(
    settings: IngestionSettings, topics: Topics, claims: RedisClaims, retries: Retry
) -> tuple[ArchiveLoop, list[Any]]:
    consumer = create_consumer(
        settings.kafka,
        group_id=settings.archive_group_id,
        client_id=f"{SERVICE}-archive",
        max_poll_records=5000,
    )
    loop = ArchiveLoop(
        consumer,
        Archiver(
            topics,
            claims,
            ArchiveBatcher(
                max_rows=settings.archive_max_rows, max_age_s=settings.archive_max_age_s
            ),
            namespace=settings.dedup_namespace,
        ),
        OfflineArchive(settings.storage.offline_dir),
        retries,
        group=settings.archive_group_id,
        poll_timeout_ms=settings.poll_timeout_ms,
        lag_interval_s=settings.lag_interval_s,
    )
    consumer.subscribe(loop.topics, listener=loop)
    return loop, [consumer]


async def serve(settings: IngestionSettings, stop: asyncio.Event) -> None:
    topics = Topics.from_settings(settings.kafka)
    retries = Retry(stop, initial_s=settings.retry_initial_s, max_s=settings.retry_max_s)
    redis = connect(settings.redis)
    claims = RedisClaims(redis, ttl_s=settings.dedup_ttl_s, namespace=settings.dedup_namespace)
    validator: ValidationLoop | None = None
    archiver: ArchiveLoop | None = None
    clients: list[Any] = []
    if settings.role in ("all", "validator"):
        validator, more = _validator(settings, topics, claims, retries)
        clients += more
    if settings.role in ("all", "archive"):
        archiver, more = _archive(settings, topics, claims, retries)
        clients += more
    loops: list[ValidationLoop | ArchiveLoop] = [x for x in (validator, archiver) if x]

    started: list[Any] = []
    try:
        await _ensure_topics_until_up(settings, retries)
        await retries.run(redis.ping, "redis_ping")
        for client in clients:
            await retries.run(client.start, "kafka_start")
            started.append(client)
        log.info(
            "ingestion_started",
            role=settings.role,
            bootstrap=settings.kafka.bootstrap,
            sources=f"{topics.transactions},{topics.labels}",
            validated=f"{topics.validated},{topics.validated_labels}",
            dlq=topics.dlq,
            archive=str(settings.storage.offline_dir) if archiver else "off",
            redis=settings.redis.address,
        )
        tasks = [asyncio.create_task(loop.run(stop), name=type(loop).__name__) for loop in loops]
        background = [asyncio.create_task(_report(loops, stop), name="stats")]
        background.append(asyncio.create_task(freeze_periodically(settings, stop), name="heap"))
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
            for task in done:
                error = task.exception()
                if error is not None and not isinstance(error, Stopping):
                    stop.set()  # one loop died: stop the other cleanly, then fail
                    await asyncio.gather(*tasks, return_exceptions=True)
                    raise error
            await asyncio.gather(*tasks, return_exceptions=True)
        finally:
            for task in background:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
    except Stopping:
        log.info("stopped_while_retrying")
    finally:
        set_ready(SERVICE, False)
        for client in reversed(started):
            with contextlib.suppress(Exception):
                await client.stop()
        await redis.close()
        log.info("ingestion_totals", **_totals(loops))


def _totals(loops: list[ValidationLoop | ArchiveLoop]) -> dict[str, int]:
    totals: dict[str, int] = {}
    for loop in loops:
        totals.update(loop.totals)
    return totals


async def _report(loops: list[ValidationLoop | ArchiveLoop], stop: asyncio.Event) -> None:
    """A progress line every 30 s (the metrics have the details)."""
    async for _ in ticks(stop, 30):
        log.info("ingestion_progress", **_totals(loops))


def main() -> int:
    settings = IngestionSettings()
    return run_service(SERVICE, settings, partial(serve, settings))
