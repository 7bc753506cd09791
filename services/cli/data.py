"""`mlops data`: the platform's data, for operators.

mlops data snapshot          freeze the offline store as a dataset snapshot (a data version)
mlops data snapshots         list the snapshots
mlops data show ID           a snapshot's files and rows; --verify checks every file's sha256
mlops data dlq               what the ingestion dead-lettered, and why
"""

from __future__ import annotations

import asyncio
from collections import Counter
from datetime import UTC
from typing import Annotated

import typer
from aiokafka import TopicPartition
from rich.console import Console
from rich.markup import escape
from rich.table import Column, Table

from services.shared.datasets import create_snapshot, list_snapshots, load_snapshot
from services.shared.errors import IntegrityError, NotFound
from services.shared.kafka import create_consumer
from services.shared.proto.mlops.v1 import events_pb2
from services.shared.settings import KafkaSettings, StorageSettings
from services.shared.topics import Topics

app = typer.Typer(
    help="Dataset snapshots of the offline store, and the dead-letter queue.",
    no_args_is_help=True,
)
console = Console()


def _summary(snapshot_id: str, storage: StorageSettings) -> tuple[str, str, str]:
    snapshot = load_snapshot(storage, snapshot_id, verify=False)
    rows = ", ".join(f"{name} {snapshot.rows(name):,}" for name in sorted(snapshot.files))
    return snapshot.created_at, rows or "empty", snapshot.sha256[:16]


@app.command()
def snapshot() -> None:
    """Snapshot every Parquet file now in the offline store (MLOPS_STORAGE_DATA_DIR)."""
    storage = StorageSettings()
    with console.status("hashing the offline store"):
        created = create_snapshot(storage)
    console.print(f"[green]✓[/] {created.id}")
    for name in sorted(created.files):
        files = created.files[name]
        console.print(f"  {name}: {len(files):,} files, {created.rows(name):,} rows")


@app.command()
def snapshots() -> None:
    """List the dataset snapshots, oldest first."""
    storage = StorageSettings()
    table = Table(Column("id", no_wrap=True), "created", "rows", "sha256")
    for snapshot_id in list_snapshots(storage):
        table.add_row(snapshot_id, *_summary(snapshot_id, storage))
    console.print(table)


@app.command()
def show(
    snapshot_id: Annotated[str, typer.Argument(help="The snapshot id (mlops data snapshots).")],
    verify: Annotated[
        bool, typer.Option(help="Check every file against its recorded sha256.")
    ] = False,
) -> None:
    """A snapshot's datasets and files."""
    storage = StorageSettings()
    try:
        snapshot = load_snapshot(storage, snapshot_id, verify=verify)
    except (NotFound, IntegrityError) as exc:
        console.print(f"[red]✗[/] {exc}")
        raise typer.Exit(1) from None
    console.print(f"{snapshot.id}  created {snapshot.created_at}  sha256 {snapshot.sha256}")
    for name in sorted(snapshot.files):
        console.print(f"[bold]{name}[/]: {snapshot.rows(name):,} rows")
        for f in snapshot.files[name]:
            console.print(f"  {f.path}  {f.rows:,} rows  {f.sha256[:12]}")
    if verify:
        console.print("[green]✓[/] every file matches its sha256")


async def _dead_letters(kafka: KafkaSettings) -> list[events_pb2.DeadLetter]:
    topic = Topics.from_settings(kafka).dlq
    consumer = create_consumer(kafka, group_id=None, client_id="mlops-cli")
    await consumer.start()
    letters: list[events_pb2.DeadLetter] = []
    try:
        await consumer.topics()
        partitions = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic) or ()]
        if not partitions:
            return letters
        ends = await consumer.end_offsets(partitions)
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        remaining = {tp: end for tp, end in ends.items() if end > 0}
        while remaining:
            batch = await consumer.getmany(*remaining, timeout_ms=1000)
            for tp, records in batch.items():
                letters.extend(events_pb2.DeadLetter.FromString(r.value) for r in records)
                if records and records[-1].offset + 1 >= remaining[tp]:
                    remaining.pop(tp)
            for tp in list(remaining):
                if await consumer.position(tp) >= remaining[tp]:
                    remaining.pop(tp)
    finally:
        await consumer.stop()
    return letters


@app.command()
def dlq(
    last: Annotated[int, typer.Option(help="Show the last N dead letters in full.")] = 10,
) -> None:
    """Count the dead letters by reason and show the latest ones (MLOPS_KAFKA_BOOTSTRAP)."""
    kafka = KafkaSettings()
    with console.status(f"reading {Topics.from_settings(kafka).dlq}"):
        letters = asyncio.run(_dead_letters(kafka))
    reasons = Counter((letter.reason_code, letter.field) for letter in letters)
    table = Table("reason_code", "field", "records", title=f"{len(letters):,} dead letters")
    for (code, field), n in reasons.most_common():
        table.add_row(code, field or "-", f"{n:,}")
    console.print(table)
    letters.sort(key=lambda letter: letter.rejected_at.ToNanoseconds())
    for letter in letters[-last:] if last > 0 else []:
        source = letter.source
        when = letter.rejected_at.ToDatetime(tzinfo=UTC).isoformat(timespec="seconds")
        value = letter.original_value[:120].decode("utf-8", "backslashreplace")
        console.print(
            f"[bold]{source.topic}/{source.partition}/{source.offset}[/] {when} "
            f"[yellow]{escape(letter.reason_code)}[/] {escape(letter.reason)}\n  {escape(value)}",
            markup=True,
            highlight=False,
        )
