"""The archive (services/ingestion/archive.py): batching, file naming, atomic Parquet files,
resuming past what is on disk, and exactly-once rows across simulated crashes."""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from aiokafka import TopicPartition
from doubles import InMemoryClaims

from services.ingestion.archive import (
    SCHEMAS,
    ArchiveBatcher,
    Archiver,
    ArchiveRow,
    OfflineArchive,
    ValidatedRecord,
    file_name,
    label_row,
    parse_file_name,
    transaction_row,
    utc_day,
)
from services.ingestion.consumers import ArchiveLoop, Retry
from services.shared.datasets import LABELS, TRANSACTIONS, create_snapshot, load_snapshot
from services.shared.proto.mlops.v1 import events_pb2
from services.shared.settings import KafkaSettings, StorageSettings
from services.shared.topics import Topics
from services.shared.usecase.schemas import to_timestamp

TOPICS = Topics.from_settings(KafkaSettings(topic_prefix="a."))
DAY = datetime(2025, 3, 9, 23, 0, tzinfo=UTC)


def _transaction(tx_id: str, when: datetime, offset: int = 0) -> bytes:
    return events_pb2.ValidatedTransaction(
        transaction_id=tx_id,
        user_id="user-1",
        merchant_id="merchant-1",
        amount=10.25,
        currency="EUR",
        channel="app",
        country="FR",
        event_time=to_timestamp(when),
        ingested_at=to_timestamp(when + timedelta(seconds=1)),
        source=events_pb2.SourcePosition(topic="a.events.transactions", partition=2, offset=offset),
    ).SerializeToString()


def _label(tx_id: str, when: datetime, is_fraud: bool = True) -> bytes:
    return events_pb2.ValidatedLabel(
        transaction_id=tx_id,
        is_fraud=is_fraud,
        event_time=to_timestamp(when),
        ingested_at=to_timestamp(when),
        source=events_pb2.SourcePosition(topic="a.events.labels", partition=0, offset=4),
    ).SerializeToString()


def _row(day: int, tx_id: str = "t") -> ArchiveRow:
    return ArchiveRow(TRANSACTIONS, tx_id, day, (tx_id,))


# ------------------------------------------------------------------------------ rows


def test_rows_carry_every_column_in_schema_order() -> None:
    when = datetime(2025, 3, 9, 23, 59, 59, 999999, tzinfo=UTC)
    row = transaction_row(_transaction("tx-1", when, offset=77))
    assert row.dataset == TRANSACTIONS and row.event_id == "tx-1"
    assert row.event_day == utc_day(when)
    assert len(row.values) == len(SCHEMAS[TRANSACTIONS])
    assert row.values[-3:] == ("a.events.transactions", 2, 77)
    label = label_row(_label("tx-1", when))
    assert label.dataset == LABELS and label.values[1] is True
    assert len(label.values) == len(SCHEMAS[LABELS])


def test_event_day_is_the_utc_date() -> None:
    late_evening_in_new_york = datetime(2025, 3, 9, 22, 0, tzinfo=UTC) + timedelta(hours=3)
    assert transaction_row(_transaction("t", late_evening_in_new_york)).event_day == utc_day(
        datetime(2025, 3, 10, tzinfo=UTC)
    )


# --------------------------------------------------------------------------- batching


def test_a_file_is_due_at_max_rows() -> None:
    batcher = ArchiveBatcher(max_rows=3, max_age_s=60)
    assert batcher.add(0, 10, _row(1), now=0) == []
    assert batcher.add(0, 11, _row(1), now=0) == []
    (due,) = batcher.add(0, 13, _row(1), now=0)
    assert (due.partition, due.first_offset, due.last_offset, len(due.rows)) == (0, 10, 13, 3)
    assert batcher.buffered_rows() == 0


def test_a_file_is_due_when_its_first_row_waited_max_age() -> None:
    batcher = ArchiveBatcher(max_rows=100, max_age_s=5)
    batcher.add(0, 0, _row(1), now=100.0)
    batcher.add(1, 0, _row(1), now=103.0)
    assert batcher.due(now=104.9) == []
    (due,) = batcher.due(now=105.0)
    assert due.partition == 0
    assert [f.partition for f in batcher.due(now=108.0)] == [1]


def test_a_new_event_date_closes_the_file_of_the_previous_one() -> None:
    batcher = ArchiveBatcher(max_rows=100, max_age_s=60)
    batcher.add(0, 0, _row(1), now=0)
    batcher.add(0, 1, _row(1), now=0)
    (due,) = batcher.add(0, 2, _row(2), now=0)
    assert (due.event_day, due.first_offset, due.last_offset) == (1, 0, 1)
    assert batcher.first_buffered_offset(TRANSACTIONS, 0) == 2


def test_partitions_and_datasets_are_batched_apart() -> None:
    batcher = ArchiveBatcher(max_rows=100, max_age_s=60)
    batcher.add(0, 5, _row(1), now=0)
    batcher.add(1, 5, _row(1), now=0)
    batcher.add(0, 5, ArchiveRow(LABELS, "t", 1, ("t",)), now=0)
    files = batcher.take_all()
    assert sorted((f.dataset, f.partition) for f in files) == [
        (LABELS, 0),
        (TRANSACTIONS, 0),
        (TRANSACTIONS, 1),
    ]
    assert batcher.take(TRANSACTIONS, 0) is None


def test_offsets_must_increase_within_a_partition() -> None:
    batcher = ArchiveBatcher(max_rows=100, max_age_s=60)
    batcher.add(0, 5, _row(1), now=0)
    with pytest.raises(ValueError, match="offset"):
        batcher.add(0, 5, _row(1), now=0)


# --------------------------------------------------------------------------- naming


def test_file_names_say_partition_and_offset_range_and_sort_by_offset() -> None:
    name = file_name(3, 1200, 1699)
    assert name == "part-p0003-0000000000000001200-0000000000000001699.parquet"
    assert parse_file_name(name) == (3, 1200, 1699, 0)
    assert file_name(0, 9, 10) < file_name(0, 10, 11) < file_name(0, 100, 200)
    # a partition that started over: its offsets repeat, its generation tells the files apart
    again = file_name(3, 1200, 1699, generation=2)
    assert again == "part-p0003-g0002-0000000000000001200-0000000000000001699.parquet"
    assert parse_file_name(again) == (3, 1200, 1699, 2)
    assert parse_file_name(".part-p0003-1-2.parquet.tmp") is None
    assert parse_file_name("part-0.parquet") is None


# ------------------------------------------------------------------------------ disk


def _archive(tmp_path: Path) -> OfflineArchive:
    return OfflineArchive(tmp_path / "offline")


def _file(partition: int, first: int, last: int, day: datetime = DAY, generation: int = 0):
    batcher = ArchiveBatcher(max_rows=10_000, max_age_s=60)
    for offset in range(first, last + 1):
        tx_id = f"tx-g{generation}-{offset}" if generation else f"tx-{offset}"
        row = transaction_row(_transaction(tx_id, day, offset))
        batcher.add(partition, offset, row, now=0, generation=generation)
    (archive_file,) = batcher.take_all()
    return archive_file


def test_files_are_written_atomically_with_the_contract_schema(tmp_path: Path) -> None:
    archive = _archive(tmp_path)
    path = archive.write(_file(2, 40, 44))
    assert path == tmp_path / "offline/transactions/event_date=2025-03-09" / file_name(2, 40, 44)
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary left
    table = pq.read_table(path, partitioning=None)
    assert table.schema == SCHEMAS[TRANSACTIONS]
    assert table.schema.field("event_time").type == pa.timestamp("us", tz="UTC")
    assert table.schema.field("source_partition").type == pa.int32()
    rows = table.to_pylist()
    assert [r["transaction_id"] for r in rows] == [f"tx-{o}" for o in range(40, 45)]
    assert rows[0]["event_time"] == DAY
    assert rows[0]["ingested_at"] == DAY + timedelta(seconds=1)
    assert rows[0]["amount"] == 10.25
    assert (rows[0]["source_topic"], rows[0]["source_partition"], rows[0]["source_offset"]) == (
        "a.events.transactions",
        2,
        40,
    )


def test_label_files_have_the_label_schema(tmp_path: Path) -> None:
    batcher = ArchiveBatcher(max_rows=10, max_age_s=60)
    batcher.add(1, 0, label_row(_label("tx-1", DAY)), now=0)
    batcher.add(1, 1, label_row(_label("tx-2", DAY, is_fraud=False)), now=0)
    path = _archive(tmp_path).write(batcher.take_all()[0])
    table = pq.read_table(path, partitioning=None)
    assert table.schema == SCHEMAS[LABELS]
    assert table.column("is_fraud").to_pylist() == [True, False]
    assert path.parent.name == "event_date=2025-03-09" and path.parent.parent.name == "labels"


def test_an_existing_file_is_never_rewritten(tmp_path: Path) -> None:
    archive = _archive(tmp_path)
    path = archive.write(_file(0, 0, 3))
    before = path.stat()
    assert archive.write(_file(0, 0, 3)) == path
    assert path.stat().st_ino == before.st_ino and path.stat().st_mtime_ns == before.st_mtime_ns


def test_resume_offsets_are_after_the_highest_archived_offset_per_partition(
    tmp_path: Path,
) -> None:
    archive = _archive(tmp_path)
    assert archive.resume_offsets(TRANSACTIONS) == {}
    archive.write(_file(0, 0, 9))
    archive.write(_file(0, 10, 14, DAY + timedelta(days=1)))
    archive.write(_file(1, 3, 4))
    assert archive.resume_offsets(TRANSACTIONS) == {0: (0, 15), 1: (0, 5)}
    assert archive.resume_offsets(LABELS) == {}
    # partition 0 started over: its latest generation counts, though its offsets are lower
    archive.write(_file(0, 0, 2, generation=1))
    assert archive.resume_offsets(TRANSACTIONS) == {0: (1, 3), 1: (0, 5)}


def test_half_written_files_of_my_partitions_are_removed(tmp_path: Path) -> None:
    archive = _archive(tmp_path)
    folder = tmp_path / "offline/transactions/event_date=2025-03-09"
    folder.mkdir(parents=True)
    mine = folder / f".{file_name(0, 0, 5)}.tmp"
    theirs = folder / f".{file_name(1, 0, 5)}.tmp"
    mine.write_bytes(b"PAR1 half")
    theirs.write_bytes(b"PAR1 half")
    assert archive.resume_offsets(TRANSACTIONS) == {}  # temporaries never count
    assert archive.remove_temporaries(TRANSACTIONS, {0}) == 1
    assert not mine.exists() and theirs.exists()


def test_archive_files_make_a_verifiable_snapshot(tmp_path: Path) -> None:
    storage = StorageSettings(data_dir=tmp_path)
    archive = OfflineArchive(storage.offline_dir)
    archive.write(_file(0, 0, 9))
    archive.write(_file(1, 0, 4))
    snapshot = create_snapshot(storage)
    assert snapshot.rows(TRANSACTIONS) == 15
    assert load_snapshot(storage, snapshot.id).rows(TRANSACTIONS) == 15


# ------------------------------------------------------------------- archiver (domain)


async def test_the_archiver_leaves_out_a_second_record_with_an_archived_id() -> None:
    archiver = Archiver(
        TOPICS, InMemoryClaims(), ArchiveBatcher(max_rows=100, max_age_s=60), namespace="ns"
    )
    records = [
        ValidatedRecord(TOPICS.validated, 0, 0, _transaction("tx-1", DAY)),
        ValidatedRecord(TOPICS.validated, 0, 1, _transaction("tx-2", DAY)),
        ValidatedRecord(TOPICS.validated, 0, 2, _transaction("tx-1", DAY)),  # re-forwarded
        ValidatedRecord(TOPICS.validated_labels, 0, 0, _label("tx-1", DAY)),  # other dataset
        ValidatedRecord(TOPICS.validated, 1, 0, b"\xff\xff not protobuf"),
    ]
    step = await archiver.add(records, now=0)
    assert [(r.partition, r.offset) for r in step.duplicates] == [(0, 2)]
    assert [(r.partition, r.offset) for r in step.unreadable] == [(1, 0)]
    files = {f.dataset: f for f in archiver.batcher.take_all()}
    assert [r[0] for r in files[TRANSACTIONS].rows] == ["tx-1", "tx-2"]
    assert [r[0] for r in files[LABELS].rows] == ["tx-1"]


async def test_the_same_record_read_again_is_archived_again() -> None:
    claims = InMemoryClaims()
    record = ValidatedRecord(TOPICS.validated, 0, 7, _transaction("tx-1", DAY))
    first = Archiver(TOPICS, claims, ArchiveBatcher(max_rows=10, max_age_s=60), namespace="ns")
    await first.add([record], now=0)
    # crash: the buffer is lost, the claim (Redis) is not
    second = Archiver(TOPICS, claims, ArchiveBatcher(max_rows=10, max_age_s=60), namespace="ns")
    step = await second.add([record], now=0)
    assert step.duplicates == []
    assert second.batcher.buffered_rows() == 1


async def test_crashes_at_random_points_neither_lose_nor_duplicate_rows(tmp_path: Path) -> None:
    """The archive loop's protocol without Kafka: read from the resume offsets, write due
    files, crash (lose the buffer, keep files and claims), restart, until the log is done."""
    rng = random.Random(5)
    log: dict[int, list[bytes]] = {0: [], 1: []}
    expected: set[str] = set()
    start = datetime(2025, 3, 9, 20, 0, tzinfo=UTC)
    for n in range(3000):
        tx_id = f"tx-{n:05d}"
        partition = n % 2
        when = start + timedelta(seconds=n * 6)  # crosses midnight: two event dates
        log[partition].append(_transaction(tx_id, when, n))
        expected.add(tx_id)
        if rng.random() < 0.05:  # the validator forwarded it twice (crash before its commit)
            log[partition].append(_transaction(tx_id, when, n))
    archive = OfflineArchive(tmp_path / "offline")
    claims = InMemoryClaims()
    crashes = 0
    while True:
        archiver = Archiver(
            TOPICS,
            claims,
            ArchiveBatcher(max_rows=rng.randint(20, 300), max_age_s=3),
            namespace="ns",
        )
        resume = archive.resume_offsets(TRANSACTIONS)
        # worst case: no committed offsets
        position = {p: resume[p][1] if p in resume else 0 for p in log}
        clock = 0.0
        crashed = False
        while any(position[p] < len(log[p]) for p in log):
            batch = []
            for p, records in log.items():
                end = min(position[p] + rng.randint(0, 40), len(records))
                for offset in range(position[p], end):
                    batch.append(ValidatedRecord(TOPICS.validated, p, offset, records[offset]))
                position[p] = end
            clock += 1.0
            step = await archiver.add(batch, now=clock)
            for archive_file in step.files:
                if rng.random() < 0.04:  # killed while writing: a temporary is left behind
                    half = tmp_path / "offline" / archive_file.relative_path
                    half.parent.mkdir(parents=True, exist_ok=True)
                    half.with_name(f".{half.name}.tmp").write_bytes(b"PAR1")
                    crashed = True
                    break
                archive.write(archive_file)
            if crashed or rng.random() < 0.06:
                crashed = True
                break
        if crashed:
            crashes += 1
            archive.remove_temporaries(TRANSACTIONS, set(log))
            continue
        for archive_file in archiver.batcher.take_all():  # a clean stop
            archive.write(archive_file)
        break
    assert crashes >= 3
    files = archive.files(TRANSACTIONS)
    ids = _archived_ids(archive)
    assert len(ids) == len(set(ids)), "a row was archived twice"
    assert set(ids) == expected, "a row is missing"
    dates = {path.parent.name for path, *_ in files}
    assert dates == {"event_date=2025-03-09", "event_date=2025-03-10"}
    assert not list((tmp_path / "offline").rglob(".*.tmp"))


# ------------------------------------------------------------- the loop around a rebalance


class _Consumer:
    """Just what ArchiveLoop asks of its consumer outside polling (no broker involved)."""

    def __init__(self) -> None:
        self.assigned: set[TopicPartition] = set()
        self.positions: dict[TopicPartition, int] = {}
        self.commits: list[dict[TopicPartition, int]] = []
        self.ends: dict[TopicPartition, int] = {}  # log end offsets (default: far away)

    def assignment(self) -> set[TopicPartition]:
        return self.assigned

    def seek(self, tp: TopicPartition, offset: int) -> None:
        self.positions[tp] = offset

    async def end_offsets(self, tps: list[TopicPartition]) -> dict[TopicPartition, int]:
        return {tp: self.ends.get(tp, 10**9) for tp in tps}

    def highwater(self, tp: TopicPartition) -> int | None:
        return self.ends.get(tp)

    async def commit(self, offsets: dict[TopicPartition, int]) -> None:
        self.commits.append(dict(offsets))


@dataclass
class _Record:
    offset: int
    value: bytes


def _archived_ids(archive: OfflineArchive) -> list[str]:
    """Every transaction id in the archive's files, as often as it is there."""
    return [
        tx_id
        for path, _ in archive.files(TRANSACTIONS)
        for tx_id in pq.read_table(path, partitioning=None).column("transaction_id").to_pylist()
    ]


def _archive_loop(tmp_path: Path) -> tuple[_Consumer, OfflineArchive, ArchiveLoop]:
    """An archive loop on a stand-in consumer, writing under ``tmp_path``."""
    consumer = _Consumer()
    archive = OfflineArchive(tmp_path / "offline")
    archiver = Archiver(
        TOPICS, InMemoryClaims(), ArchiveBatcher(max_rows=10_000, max_age_s=600), namespace="ns"
    )
    loop = ArchiveLoop(
        consumer,  # type: ignore[arg-type]
        archiver,
        archive,
        Retry(asyncio.Event(), initial_s=0.01, max_s=0.01),
        group="g",
        poll_timeout_ms=10,
        lag_interval_s=60,
    )
    return consumer, archive, loop


async def test_a_batch_fetched_before_a_rebalance_is_not_archived_twice(tmp_path: Path) -> None:
    """A batch polled before a rebalance can be handled after the new assignment's seek; the
    same offsets then come again from the seek position."""
    consumer, archive, loop = _archive_loop(tmp_path)
    tp = TopicPartition(TOPICS.validated, 0)
    log = [_Record(o, _transaction(f"tx-{o}", DAY, o)) for o in range(30)]
    archive.write(_file(0, 0, 9))  # offsets 0-9 are on disk already
    consumer.assigned = {tp}
    await loop.on_partitions_assigned([tp])
    assert consumer.positions[tp] == 10
    await loop.handle({tp: log[10:20]})  # polled before the rebalance below
    await loop.on_partitions_revoked([tp])  # writes 10-19
    await loop.on_partitions_assigned([tp])  # seeks to 20
    await loop.handle({tp: log[15:25]})  # a stale batch handled after the seek
    await loop.handle({tp: log[20:30]})  # what the seek fetches
    for archive_file in loop.batcher.take_all():
        archive.write(archive_file)
    ids = _archived_ids(archive)
    assert sorted(ids) == sorted(f"tx-{o}" for o in range(30))
    assert consumer.commits[-1] == {tp: 20}


async def test_a_re_created_topic_is_archived_from_its_new_beginning(tmp_path: Path) -> None:
    """After the in-memory local broker restarts, every topic starts again at offset 0, below
    what the archive holds: its records are new and must be archived, not skipped as if
    they were on disk already (found by loadtests/chaos.py)."""
    consumer, archive, loop = _archive_loop(tmp_path)
    tp = TopicPartition(TOPICS.validated, 0)
    archive.write(_file(0, 0, 99))  # the old topic's offsets 0-99, on disk
    consumer.assigned = {tp}
    await loop.on_partitions_assigned([tp])  # before the restart: resumes at 100
    assert consumer.positions[tp] == 100
    # the broker restarts; the topic holds 5 new events at offsets 0-4
    consumer.ends[tp] = 5
    new = [_Record(o, _transaction(f"new-{o}", DAY, o)) for o in range(5)]
    await loop.handle({tp: new[:2]})  # still assigned: the position was reset to 0
    await loop.on_partitions_revoked([tp])
    consumer.positions.clear()
    await loop.on_partitions_assigned([tp])  # reassigned after the restart
    # no seek past the end: after the new generation's files (offsets 0-1, written at the
    # revocation), not the old one's
    assert consumer.positions[tp] == 2
    await loop.handle({tp: new[2:]})
    for archive_file in loop.batcher.take_all():
        archive.write(archive_file)
    ids = _archived_ids(archive)
    assert sorted(i for i in ids if i.startswith("new-")) == [f"new-{o}" for o in range(5)]


async def test_a_second_restart_of_the_broker_loses_no_file_of_the_first(tmp_path: Path) -> None:
    """Each restart of the in-memory broker starts the topic again at offset 0: the files of
    each generation repeat the offsets of the one before, and none may take another's place
    (nor may rows still buffered from before a restart be lost)."""
    consumer, archive, loop = _archive_loop(tmp_path)
    tp = TopicPartition(TOPICS.validated, 0)
    consumer.assigned = {tp}
    await loop.on_partitions_assigned([tp])
    first = [_Record(o, _transaction(f"first-{o}", DAY, o)) for o in range(5)]
    await loop.handle({tp: first})  # buffered, not yet written
    # the broker restarts twice: 3 new events at offsets 0-2, then 2 at offsets 0-1 (a
    # restart shows as a partition that ends below the position)
    for restart, count in ((1, 3), (2, 2)):
        consumer.ends[tp] = count
        new = [_Record(o, _transaction(f"r{restart}-{o}", DAY, o)) for o in range(count)]
        await loop.handle({tp: new})
        assert loop.archiver.generations[(tp.topic, 0)] == restart
    for archive_file in loop.batcher.take_all():
        archive.write(archive_file)
    names = sorted(path.name for path, _ in archive.files(TRANSACTIONS))
    assert names == [file_name(0, 0, 4), file_name(0, 0, 2, 1), file_name(0, 0, 1, 2)]
    ids = _archived_ids(archive)
    expected = [f"first-{o}" for o in range(5)] + [f"r1-{o}" for o in range(3)] + ["r2-0", "r2-1"]
    assert sorted(ids) == sorted(expected)
    # a restart of ingestion itself resumes in the latest generation, after its offsets
    consumer.ends[tp] = 10
    await loop.on_partitions_revoked([tp])
    await loop.on_partitions_assigned([tp])
    assert consumer.positions[tp] == 2 and loop.archiver.generations[(tp.topic, 0)] == 2
