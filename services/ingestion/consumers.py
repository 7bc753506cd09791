"""The ingestion service's two Kafka consumers: thin transports around the domain classes.

``ValidationLoop`` (group ``ingestion``): product topics -> ``Ingestor`` -> validated streams
and DLQ. Per batch: poll, route, produce every output, wait for every acknowledgement, then
commit exactly the offsets of that batch. A crash anywhere before the commit means the batch
is read again (at-least-once); the duplicate check makes that harmless.

``ArchiveLoop`` (group ``ingestion-archive``): validated streams -> ``ArchiveBatcher`` ->
Parquet files (``OfflineArchive``). It seeks past what is already on disk when it is given
a partition, and writes the files of a partition it is losing before letting it go.

Kafka or Redis failing never makes either loop skip anything: the step is retried with
exponential back-off until it succeeds or the service is asked to stop (then nothing is
committed for the unfinished batch).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from functools import partial
from typing import TypeVar

from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener
from aiokafka.errors import CommitFailedError, IllegalStateError, KafkaError
from aiokafka.structs import ConsumerRecord, TopicPartition
from redis.exceptions import RedisError

from services.ingestion import metrics
from services.ingestion.archive import ArchiveFile, Archiver, OfflineArchive, ValidatedRecord
from services.ingestion.routing import BatchOutcome, EventKind, Ingestor
from services.shared.logging import get_logger
from services.shared.retry import Backoff, Stopping, retry
from services.shared.runtime import set_ready
from services.shared.sender import OutboundRecord, RecordSender

log = get_logger("ingestion")
T = TypeVar("T")
RETRYABLE = (KafkaError, RedisError, OSError, asyncio.TimeoutError)


class Retry:
    """Ingestion's steps tried again until they succeed or ``stop`` is set (then
    ``Stopping``): back-off from the settings, every retry counted and logged."""

    def __init__(self, stop: asyncio.Event, *, initial_s: float, max_s: float) -> None:
        self.stop = stop
        self.backoff = Backoff(initial_s, max_s)

    async def run(self, operation: Callable[[], Awaitable[T]], what: str) -> T:
        def note(exc: BaseException, delay: float) -> None:
            metrics.RETRIES.labels(what).inc()
            log.warning(
                "retrying", operation=what, error=f"{type(exc).__name__}: {exc}", backoff_s=delay
            )

        return await retry(
            operation, retryable=RETRYABLE, backoff=self.backoff, stop=self.stop, on_retry=note
        )


class OutputProducer:
    """Produces a batch of outputs and waits until every record is acknowledged.

    Through the shared ``RecordSender`` (per-partition record batches, keys partitioned as
    the Java client does, a record over the broker's limit dead-lettered). A batch whose
    delivery fails is sent again after a back-off (at-least-once; consumers are idempotent).
    """

    def __init__(self, sender: RecordSender, retries: Retry) -> None:
        self.sender = sender
        self.retries = retries

    async def produce(self, outputs: Sequence[OutboundRecord]) -> None:
        pending = list(outputs)
        delays = self.retries.backoff.delays()
        while pending:
            report = await self.sender.deliver(pending)
            for delivery in report.delivered:
                metrics.EVENTS_OUT.labels(delivery.topic).inc(len(delivery.records))
            if report.failed:
                metrics.RETRIES.labels("produce").inc()
                delay = next(delays)
                log.warning(
                    "produce_failed",
                    records=len(report.failed),
                    error=f"{type(report.error).__name__}: {report.error}",
                    backoff_s=delay,
                )
                await self.retries.backoff.wait(self.retries.stop, delay)
            pending = report.failed


async def commit(
    consumer: AIOKafkaConsumer, offsets: dict[TopicPartition, int], group: str
) -> bool:
    """Commit ``offsets``; False if the group took the partitions away meanwhile (the new
    owner reads those records again, which is the at-least-once contract)."""
    if not offsets:
        return True
    try:
        await consumer.commit(offsets)
    except (CommitFailedError, IllegalStateError) as exc:
        log.warning("commit_refused", group=group, error=f"{type(exc).__name__}: {exc}")
        return False
    return True


class ConsumerLag:
    """Refreshes the lag gauges (high watermark from fetches minus position) now and then."""

    def __init__(self, consumer: AIOKafkaConsumer, group: str, interval_s: float) -> None:
        self.consumer = consumer
        self.group = group
        self.interval_s = interval_s
        self._next = 0.0

    async def refresh(self) -> None:
        now = time.monotonic()
        if now < self._next:
            return
        self._next = now + self.interval_s
        for tp in self.consumer.assignment():
            highwater = self.consumer.highwater(tp)
            if highwater is None:
                continue
            position = await self.consumer.position(tp)
            metrics.CONSUMER_LAG.labels(self.group, tp.topic, str(tp.partition)).set(
                max(highwater - position, 0)
            )


class ValidationLoop:
    """Product topics -> validated streams and DLQ, at-least-once."""

    def __init__(
        self,
        consumer: AIOKafkaConsumer,
        sender: RecordSender,
        ingestor: Ingestor,
        retries: Retry,
        *,
        group: str,
        batch_max_records: int,
        poll_timeout_ms: int,
        lag_interval_s: float,
    ) -> None:
        self.consumer = consumer
        self.outputs = OutputProducer(sender, retries)
        self.ingestor = ingestor
        self.retries = retries
        self.group = group
        self.batch_max_records = batch_max_records
        self.poll_timeout_ms = poll_timeout_ms
        self.lag = ConsumerLag(consumer, group, lag_interval_s)
        self.totals: dict[str, int] = {"in": 0, "forwarded": 0, "rejected": 0, "duplicates": 0}

    async def run(self, stop: asyncio.Event) -> None:
        """Poll and route batch N+1 while batch N is being produced, acknowledged and
        committed (its outputs are sent only after N is committed: order and commits stay
        sequential; only the waiting overlaps)."""
        ready = False
        finishing: asyncio.Task[None] | None = None
        try:
            while not stop.is_set():
                batch = await self.retries.run(
                    lambda: self.consumer.getmany(
                        timeout_ms=self.poll_timeout_ms, max_records=self.batch_max_records
                    ),
                    "poll",
                )
                if not ready and self.consumer.assignment():
                    ready = True
                    set_ready("ingestion", True)
                    log.info(
                        "validator_consuming",
                        group=self.group,
                        partitions=",".join(
                            f"{tp.topic}:{tp.partition}" for tp in self.consumer.assignment()
                        ),
                    )
                if batch:
                    polled = time.monotonic()
                    records = [r for rs in batch.values() for r in rs]
                    for tp, rs in batch.items():
                        metrics.EVENTS_IN.labels(tp.topic).inc(len(rs))
                    outcome = await self.retries.run(
                        lambda r=records: self.ingestor.process(r),  # type: ignore[misc]
                        "dedup",
                    )
                    if finishing is not None:
                        await finishing
                    offsets = {tp: rs[-1].offset + 1 for tp, rs in batch.items() if rs}
                    finishing = asyncio.create_task(self._finish(outcome, offsets, polled))
                elif finishing is not None and finishing.done():
                    await finishing
                    finishing = None
                await self.lag.refresh()
            if finishing is not None:
                await finishing
        finally:
            if finishing is not None and not finishing.done():
                finishing.cancel()
                with contextlib.suppress(asyncio.CancelledError, Stopping):
                    await finishing

    async def _finish(
        self, outcome: BatchOutcome, offsets: dict[TopicPartition, int], polled: float
    ) -> None:
        await self.outputs.produce(outcome.outputs)
        await self.retries.run(lambda: commit(self.consumer, offsets, self.group), "commit")
        self._account(outcome, polled)

    def _account(self, outcome: BatchOutcome, polled: float) -> None:
        acked = datetime.now(UTC)
        metrics.PROCESSING_SECONDS.observe(time.monotonic() - polled)
        lag = {kind: metrics.EVENT_LAG_SECONDS.labels(kind.value) for kind in EventKind}
        # a histogram observation costs more than validating the event: sample 1 in N
        for accepted in outcome.forwarded[:: metrics.EVENT_LAG_SAMPLE]:
            lag[accepted.kind].observe(max((acked - accepted.event_time).total_seconds(), 0.0))
        for accepted in outcome.redelivered:
            metrics.REDELIVERIES.labels(accepted.kind.value).inc()
        for rejected in outcome.rejected:
            metrics.REJECTED.labels(rejected.reason_code).inc()
            log.info(
                "event_rejected",
                topic=rejected.record.topic,
                partition=rejected.record.partition,
                offset=rejected.record.offset,
                reason_code=rejected.reason_code,
                field=rejected.field,
                reason=rejected.reason[:200],
            )
        for duplicate in outcome.duplicates:
            metrics.DUPLICATES.labels(duplicate.kind.value).inc()
            log.info(
                "duplicate_dropped",
                kind=duplicate.kind.value,
                event_id=duplicate.event_id,
                topic=duplicate.record.topic,
                partition=duplicate.record.partition,
                offset=duplicate.record.offset,
            )
        if outcome.redelivered:
            log.info("redelivered_forwarded", records=len(outcome.redelivered))
        self.totals["in"] += (
            len(outcome.forwarded) + len(outcome.rejected) + len(outcome.duplicates)
        )
        self.totals["forwarded"] += len(outcome.forwarded)
        self.totals["rejected"] += len(outcome.rejected)
        self.totals["duplicates"] += len(outcome.duplicates)


class ArchiveLoop(ConsumerRebalanceListener):
    """Validated streams -> Parquet files in the offline store, exactly once."""

    def __init__(
        self,
        consumer: AIOKafkaConsumer,
        archiver: Archiver,
        archive: OfflineArchive,
        retries: Retry,
        *,
        group: str,
        poll_timeout_ms: int,
        lag_interval_s: float,
    ) -> None:
        self.consumer = consumer
        self.archiver = archiver
        self.batcher = archiver.batcher
        self.archive = archive
        self.retries = retries
        self.group = group
        self.poll_timeout_ms = poll_timeout_ms
        self.lag = ConsumerLag(consumer, group, lag_interval_s)
        self._lock = asyncio.Lock()  # rebalance callbacks run beside the poll loop
        # per partition: the offset after the last record taken (or where the disk ends)
        self._next_offset: dict[TopicPartition, int] = {}
        self._committed: dict[TopicPartition, int] = {}
        self.totals: dict[str, int] = {"rows": 0, "files": 0, "skipped": 0}

    @property
    def topics(self) -> list[str]:
        return list(self.archiver.datasets)

    # -- rebalance -----------------------------------------------------------------------

    async def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        async with self._lock:
            due = [
                f
                for tp in revoked
                if (f := self.batcher.take(self.archiver.dataset(tp.topic), tp.partition))
                is not None
            ]
            await self._write(due)
            await self._commit_progress(set(revoked))
            for tp in revoked:
                self._next_offset.pop(tp, None)
                self._committed.pop(tp, None)
        if revoked:
            log.info("archive_partitions_revoked", partitions=_names(revoked), files=len(due))

    async def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        async with self._lock:
            for topic, dataset in self.archiver.datasets.items():
                mine = {tp.partition for tp in assigned if tp.topic == topic}
                if not mine:
                    continue
                resume = await asyncio.to_thread(self.archive.resume_offsets, dataset)
                removed = await asyncio.to_thread(self.archive.remove_temporaries, dataset, mine)
                tps = [TopicPartition(topic, p) for p in sorted(mine)]
                ends = await self.retries.run(
                    partial(self.consumer.end_offsets, tps), "archive_end_offsets"
                )
                for tp in tps:
                    partition = tp.partition
                    generation, offset = resume.get(partition, (0, None))
                    if offset is not None and offset > ends.get(tp, 0):
                        # the partition ends below what is archived: the topic was re-created
                        # (a restart of the in-memory local broker, a topic deleted by hand);
                        # what it holds is new, from the group's committed offset on, and its
                        # files are of the next generation (their offsets repeat old ones)
                        log.warning(
                            "archive_partition_restarted",
                            topic=topic,
                            partition=partition,
                            archived_through=offset - 1,
                            end_offset=ends.get(tp, 0),
                            generation=generation + 1,
                        )
                        generation, offset = generation + 1, None
                    self.archiver.generations[(topic, partition)] = generation
                    if offset is not None:
                        self.consumer.seek(tp, offset)
                        self._next_offset[tp] = offset
                    log.info(
                        "archive_partition_assigned",
                        topic=topic,
                        partition=partition,
                        resume_offset="committed" if offset is None else offset,
                        generation=generation,
                        temporaries_removed=removed,
                    )
        set_ready("ingestion", True)

    # -- loop ------------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            batch = await self.retries.run(
                lambda: self.consumer.getmany(timeout_ms=self.poll_timeout_ms, max_records=5000),
                "archive_poll",
            )
            async with self._lock:
                await self.handle(batch)
            await self.lag.refresh()
        # a clean stop writes what is buffered (after a crash it is read again instead)
        async with self._lock:
            files = self.batcher.take_all()
            await self._write(files)
            await self._commit_progress(None)
        log.info("archive_stopped", files_written_at_stop=len(files), **self.totals)

    async def handle(self, batch: dict[TopicPartition, list[ConsumerRecord[bytes, bytes]]]) -> None:
        records: list[ValidatedRecord] = []
        assignment = self.consumer.assignment()
        for tp, consumed in batch.items():
            if tp not in assignment:
                continue  # revoked while this batch was in flight: the new owner reads it
            # A batch fetched before a rebalance can arrive after the seek of the new
            # assignment, and its records then come again: take each offset once, in order.
            expected = self._next_offset.get(tp)
            high = self.consumer.highwater(tp)
            if expected is not None and high is not None and high < expected:
                # offsets start over below where this partition was: the topic was re-created
                # (see on_partitions_assigned); its records are new, not a stale batch, and
                # of the partition's next generation (what is buffered of the last one is
                # written under its own)
                key = (tp.topic, tp.partition)
                generation = self.archiver.generations.get(key, 0) + 1
                self.archiver.generations[key] = generation
                log.warning(
                    "archive_partition_restarted",
                    topic=tp.topic,
                    partition=tp.partition,
                    generation=generation,
                )
                expected = None
            for r in consumed:
                if expected is not None and r.offset < expected:
                    continue
                records.append(ValidatedRecord(tp.topic, tp.partition, r.offset, r.value or b""))
                expected = r.offset + 1
            if expected is not None:
                self._next_offset[tp] = expected
        step = await self.retries.run(
            lambda: self.archiver.add(records, now=time.monotonic()), "archive_dedup"
        )
        for record in step.unreadable:
            # not ours to judge: the validator wrote it; count it, keep going
            metrics.ARCHIVE_SKIPPED.labels(self.archiver.dataset(record.topic), "unreadable").inc()
            log.error(
                "archive_record_unreadable",
                topic=record.topic,
                partition=record.partition,
                offset=record.offset,
            )
        for record in step.duplicates:
            metrics.ARCHIVE_SKIPPED.labels(self.archiver.dataset(record.topic), "duplicate").inc()
        self.totals["skipped"] += len(step.duplicates) + len(step.unreadable)
        await self._write(step.files)
        await self._commit_progress(None)

    async def _write(self, files: list[ArchiveFile]) -> None:
        for archive_file in files:
            path = await self.retries.run(
                lambda f=archive_file: asyncio.to_thread(self.archive.write, f),  # type: ignore[misc]
                "archive_write",
            )
            metrics.ARCHIVE_FILES.labels(archive_file.dataset).inc()
            metrics.ARCHIVE_ROWS.labels(archive_file.dataset).inc(len(archive_file.rows))
            self.totals["files"] += 1
            self.totals["rows"] += len(archive_file.rows)
            log.info(
                "archive_file_written",
                dataset=archive_file.dataset,
                partition=archive_file.partition,
                first_offset=archive_file.first_offset,
                last_offset=archive_file.last_offset,
                rows=len(archive_file.rows),
                path=str(path.relative_to(self.archive.offline_dir)),
            )

    async def _commit_progress(self, only: set[TopicPartition] | None) -> None:
        """Commit, per partition, the first offset not yet on disk (for lag and for a start
        without files; correctness rests on the files, not on these commits)."""
        offsets: dict[TopicPartition, int] = {}
        for tp, next_offset in self._next_offset.items():
            if only is not None and tp not in only:
                continue
            buffered = self.batcher.first_buffered_offset(
                self.archiver.dataset(tp.topic), tp.partition
            )
            offset = buffered if buffered is not None else next_offset
            if self._committed.get(tp) != offset:
                offsets[tp] = offset
        if not offsets:
            return
        accepted = await self.retries.run(
            lambda: commit(self.consumer, offsets, self.group), "archive_commit"
        )
        if accepted:
            self._committed.update(offsets)


def _names(partitions: Sequence[TopicPartition]) -> str:
    return ",".join(f"{tp.topic}:{tp.partition}" for tp in partitions)
