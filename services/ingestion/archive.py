"""The archive of validated events in the offline store: exactly-once Parquet files.

Layout (``StorageSettings.offline_dir``)::

    transactions/event_date=YYYY-MM-DD/part-p0003-0000000000000001200-0000000000000001699.parquet
    labels/event_date=YYYY-MM-DD/part-p0001-...-....parquet

A file holds the rows read from one partition of ``events.validated`` (or
``events.validated.labels``) over one offset range, all of one event date (UTC); its name says
the partition and the first and last offsets of its rows, and after the partition started over
(its topic re-created: a restart of the in-memory local broker, a topic deleted by hand) the
partition's generation (``part-p0003-g0001-...``; none for the first): offsets of a later
generation repeat those of an earlier one, and without it a new file could take an old one's
name and its rows would be lost. Files are written atomically (a
dot-prefixed temporary in the same directory, fsync, rename, fsync of the directory) and never
modified afterwards, so dataset snapshots can hard-link them.

Exactly once: files of a partition are written in offset order by the one consumer that owns
the partition, so "the highest last offset on disk + 1" (of its latest generation) is where the
archive resumes after a restart (it seeks there on assignment). What was buffered but not
written is read again; what was written is never read again. Rows whose transaction id was
already archived from another record of the validated stream (a same-source re-delivery by the
validator after a crash) are skipped by a claim on the id, like the validator's duplicate
check, so every id is archived once.

Columns: see ``SCHEMAS``. ``source_*`` is where the event was read from the product topic
(``events.transactions``/``events.labels``), the event's lineage.
"""

from __future__ import annotations

import contextlib
import os
import re
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any, NamedTuple

import pyarrow as pa
import pyarrow.parquet as pq
from google.protobuf.message import DecodeError

from services.ingestion.routing import ClaimStore, Verdict, claim_position, topic_tag, verdict
from services.shared.datasets import LABELS, TRANSACTIONS
from services.shared.proto.mlops.v1 import events_pb2
from services.shared.topics import Topics

_TS = pa.timestamp("us", tz="UTC")
_SOURCE = [
    pa.field("source_topic", pa.string(), nullable=False),
    pa.field("source_partition", pa.int32(), nullable=False),
    pa.field("source_offset", pa.int64(), nullable=False),
]
SCHEMAS: dict[str, pa.Schema] = {
    TRANSACTIONS: pa.schema(
        [
            pa.field("transaction_id", pa.string(), nullable=False),
            pa.field("user_id", pa.string(), nullable=False),
            pa.field("merchant_id", pa.string(), nullable=False),
            pa.field("amount", pa.float64(), nullable=False),
            pa.field("currency", pa.string(), nullable=False),
            pa.field("channel", pa.string(), nullable=False),
            pa.field("country", pa.string(), nullable=False),
            pa.field("event_time", _TS, nullable=False),
            pa.field("ingested_at", _TS, nullable=False),
            *_SOURCE,
        ]
    ),
    LABELS: pa.schema(
        [
            pa.field("transaction_id", pa.string(), nullable=False),
            pa.field("is_fraud", pa.bool_(), nullable=False),
            pa.field("event_time", _TS, nullable=False),
            pa.field("ingested_at", _TS, nullable=False),
            *_SOURCE,
        ]
    ),
}
_EPOCH = date(1970, 1, 1)
_FILE_NAME = re.compile(r"^part-p(\d+)(?:-g(\d+))?-(\d+)-(\d+)\.parquet$")


def _micros(ts: Any) -> int:
    return int(ts.seconds) * 1_000_000 + int(ts.nanos) // 1000


class ArchiveRow(NamedTuple):
    """One validated event as a row of its dataset (a NamedTuple: one per archived event)."""

    dataset: str
    event_id: str
    event_day: int  # days since 1970-01-01 (UTC) of the event time: the file's partition
    values: tuple[Any, ...]  # in SCHEMAS[dataset] column order; times as epoch microseconds


def transaction_row(value: bytes) -> ArchiveRow:
    """The archive row of an ``events.validated`` record (raises DecodeError if garbled)."""
    m = events_pb2.ValidatedTransaction.FromString(value)
    event_us = _micros(m.event_time)
    return ArchiveRow(
        TRANSACTIONS,
        m.transaction_id,
        event_us // 86_400_000_000,
        (
            m.transaction_id,
            m.user_id,
            m.merchant_id,
            m.amount,
            m.currency,
            m.channel,
            m.country,
            event_us,
            _micros(m.ingested_at),
            m.source.topic,
            m.source.partition,
            m.source.offset,
        ),
    )


def label_row(value: bytes) -> ArchiveRow:
    """The archive row of an ``events.validated.labels`` record."""
    m = events_pb2.ValidatedLabel.FromString(value)
    event_us = _micros(m.event_time)
    return ArchiveRow(
        LABELS,
        m.transaction_id,
        event_us // 86_400_000_000,
        (
            m.transaction_id,
            m.is_fraud,
            event_us,
            _micros(m.ingested_at),
            m.source.topic,
            m.source.partition,
            m.source.offset,
        ),
    )


@dataclass(frozen=True)
class ArchiveFile:
    """A file due to be written: rows of one dataset, partition, offset range and event date."""

    dataset: str
    partition: int
    event_day: int
    first_offset: int
    last_offset: int
    rows: list[tuple[Any, ...]]
    generation: int = 0  # how often the partition started over before these rows

    @property
    def event_date(self) -> date:
        return _EPOCH + timedelta(days=self.event_day)

    @property
    def name(self) -> str:
        return file_name(self.partition, self.first_offset, self.last_offset, self.generation)

    @property
    def relative_path(self) -> Path:
        return Path(self.dataset) / f"event_date={self.event_date.isoformat()}" / self.name

    def table(self) -> pa.Table:
        schema = SCHEMAS[self.dataset]
        columns = list(zip(*self.rows, strict=True)) if self.rows else [()] * len(schema)
        return pa.Table.from_arrays(
            [
                pa.array(column, type=_TS if f.type == _TS else f.type)
                for column, f in zip(columns, schema, strict=True)
            ],
            schema=schema,
        )


class FileName(NamedTuple):
    """What an archive file's name says."""

    partition: int
    first_offset: int
    last_offset: int
    generation: int = 0


def file_name(partition: int, first_offset: int, last_offset: int, generation: int = 0) -> str:
    offsets = f"{first_offset:019d}-{last_offset:019d}"
    if generation:
        return f"part-p{partition:04d}-g{generation:04d}-{offsets}.parquet"
    return f"part-p{partition:04d}-{offsets}.parquet"


def parse_file_name(name: str) -> FileName | None:
    """What an archive file name says, else None."""
    match = _FILE_NAME.match(name)
    if match is None:
        return None
    return FileName(int(match[1]), int(match[3]), int(match[4]), int(match[2] or 0))


@dataclass
class _Buffer:
    event_day: int
    first_offset: int
    started_at: float  # monotonic seconds
    generation: int
    last_offset: int = -1
    rows: list[tuple[Any, ...]] = field(default_factory=list)


class ArchiveBatcher:
    """Collects rows per (dataset, partition) and says when a file is due.

    A file is due when it has ``max_rows`` rows, when its first row waited ``max_age_s``, or
    when a row of another event date arrives (a file holds one date and one contiguous offset
    range, which keeps "resume after the highest offset on disk" exact).
    """

    def __init__(self, *, max_rows: int, max_age_s: float) -> None:
        self.max_rows = max_rows
        self.max_age_s = max_age_s
        self._buffers: dict[tuple[str, int], _Buffer] = {}

    def add(
        self, partition: int, offset: int, row: ArchiveRow, *, now: float, generation: int = 0
    ) -> list[ArchiveFile]:
        """Buffer a row (offsets of a partition's generation must increase); returns files now
        due (what was buffered of an earlier generation is due at once)."""
        key = (row.dataset, partition)
        due: list[ArchiveFile] = []
        buffer = self._buffers.get(key)
        if buffer is not None and (
            buffer.event_day != row.event_day or buffer.generation != generation
        ):
            due.append(self._take(key))
            buffer = None
        if buffer is None:
            buffer = self._buffers[key] = _Buffer(row.event_day, offset, now, generation)
        if offset <= buffer.last_offset:
            raise ValueError(f"offset {offset} after {buffer.last_offset} in {key}")
        buffer.rows.append(row.values)
        buffer.last_offset = offset
        if len(buffer.rows) >= self.max_rows:
            due.append(self._take(key))
        return due

    def due(self, *, now: float) -> list[ArchiveFile]:
        """Files whose first row has waited long enough."""
        old = [k for k, b in self._buffers.items() if now - b.started_at >= self.max_age_s]
        return [self._take(k) for k in old]

    def take(self, dataset: str, partition: int) -> ArchiveFile | None:
        key = (dataset, partition)
        return self._take(key) if key in self._buffers else None

    def take_all(self) -> list[ArchiveFile]:
        return [self._take(k) for k in list(self._buffers)]

    def first_buffered_offset(self, dataset: str, partition: int) -> int | None:
        buffer = self._buffers.get((dataset, partition))
        return buffer.first_offset if buffer is not None else None

    def buffered_rows(self) -> int:
        return sum(len(b.rows) for b in self._buffers.values())

    def _take(self, key: tuple[str, int]) -> ArchiveFile:
        buffer = self._buffers.pop(key)
        return ArchiveFile(
            key[0],
            key[1],
            buffer.event_day,
            buffer.first_offset,
            buffer.last_offset,
            buffer.rows,
            buffer.generation,
        )


class ValidatedRecord(NamedTuple):
    """A record read from a validated stream."""

    topic: str
    partition: int
    offset: int
    value: bytes


@dataclass
class ArchiveStep:
    """What a batch of validated records changed: files due, records left out."""

    files: list[ArchiveFile] = field(default_factory=list)
    duplicates: list[ValidatedRecord] = field(default_factory=list)  # id archived already
    unreadable: list[ValidatedRecord] = field(default_factory=list)


class Archiver:
    """The archive's domain: validated records in, files to write out.

    Each record's id is claimed (``<namespace>:archive:<topic tag>:<id>`` -> its partition/offset
    in the validated stream): a second record with an archived id is left out, the same record read
    again (its file was not written before a crash) is kept.
    """

    def __init__(
        self, topics: Topics, claims: ClaimStore, batcher: ArchiveBatcher, *, namespace: str
    ) -> None:
        self.claims = claims
        self.batcher = batcher
        self.namespace = namespace
        self.datasets = {topics.validated: TRANSACTIONS, topics.validated_labels: LABELS}
        self._claim_prefix = {t: f"{namespace}:archive:{topic_tag(t)}:" for t in self.datasets}
        self._row_of: dict[str, Any] = {
            topics.validated: transaction_row,
            topics.validated_labels: label_row,
        }
        # (topic, partition) -> the partition's generation (0 unless it started over)
        self.generations: dict[tuple[str, int], int] = {}

    def dataset(self, topic: str) -> str:
        return self.datasets[topic]

    async def add(self, records: list[ValidatedRecord], *, now: float) -> ArchiveStep:
        """Buffer ``records`` (in offset order per partition); ``now`` is monotonic seconds."""
        step = ArchiveStep()
        rows: list[tuple[ValidatedRecord, ArchiveRow]] = []
        for record in records:
            try:
                rows.append((record, self._row_of[record.topic](record.value)))
            except DecodeError:
                step.unreadable.append(record)
        prefixes = self._claim_prefix
        claims = [
            (prefixes[r.topic] + row.event_id, claim_position(r.partition, r.offset))
            for r, row in rows
        ]
        stored = await self.claims.claim(claims)
        for (record, row), (_, position), before in zip(rows, claims, stored, strict=True):
            if verdict(before, position) is Verdict.DUPLICATE:
                step.duplicates.append(record)
                continue
            generation = self.generations.get((record.topic, record.partition), 0)
            step.files.extend(
                self.batcher.add(
                    record.partition, record.offset, row, now=now, generation=generation
                )
            )
        step.files.extend(self.batcher.due(now=now))
        return step


class OfflineArchive:
    """The archive's files on disk: atomic writes and where to resume."""

    def __init__(self, offline_dir: Path) -> None:
        self.offline_dir = offline_dir

    def write(self, archive_file: ArchiveFile) -> Path:
        """Write a file atomically; an existing file of that name is kept (same rows)."""
        target = self.offline_dir / archive_file.relative_path
        if target.exists():
            return target  # written before a crash that came before the offset commit
        target.parent.mkdir(parents=True, exist_ok=True)
        temporary = target.with_name(f".{target.name}.tmp")
        with temporary.open("wb") as handle:
            pq.write_table(archive_file.table(), handle, compression="zstd")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, target)
        _fsync_directory(target.parent)
        return target

    def files(self, dataset: str) -> list[tuple[Path, FileName]]:
        """Every archive file of ``dataset`` with what its name says."""
        found = []
        for path in (self.offline_dir / dataset).glob("event_date=*/part-p*.parquet"):
            parsed = parse_file_name(path.name)
            if parsed is not None:
                found.append((path, parsed))
        return found

    def resume_offsets(self, dataset: str) -> dict[int, tuple[int, int]]:
        """Per partition: its latest generation on disk and the offset after the highest one
        archived in it."""
        resume: dict[int, tuple[int, int]] = {}
        for _path, name in self.files(dataset):
            latest = resume.get(name.partition, (-1, 0))
            resume[name.partition] = max(latest, (name.generation, name.last_offset + 1))
        return resume

    def remove_temporaries(self, dataset: str, partitions: set[int]) -> int:
        """Delete half-written files of ``partitions`` (left by a crash); returns how many."""
        removed = 0
        for path in (self.offline_dir / dataset).glob("event_date=*/.part-p*.parquet.tmp"):
            parsed = parse_file_name(path.name[1 : -len(".tmp")])
            if parsed is not None and parsed.partition in partitions:
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
                    removed += 1
        return removed


def _fsync_directory(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def utc_day(moment: datetime) -> int:
    """Days since 1970-01-01 of ``moment`` in UTC (the event_date partition)."""
    return (moment.astimezone(UTC).date() - _EPOCH).days
