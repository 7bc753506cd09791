"""Dataset snapshots (services/shared/datasets.py): manifests, hard links, verification."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from services.shared.datasets import (
    LABELS,
    MANIFEST,
    TRANSACTIONS,
    create_snapshot,
    list_snapshots,
    load_snapshot,
)
from services.shared.errors import IntegrityError, NotFound
from services.shared.settings import StorageSettings

T0 = datetime(2025, 3, 10, 12, 0, tzinfo=UTC)
T1 = datetime(2025, 3, 10, 13, 0, tzinfo=UTC)


def _parquet(storage: StorageSettings, relative: str, rows: int) -> Path:
    path = storage.offline_dir / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"transaction_id": [f"t{i}" for i in range(rows)]}), path)
    return path


@pytest.fixture
def filled(storage: StorageSettings) -> StorageSettings:
    _parquet(storage, "transactions/event_date=2025-03-09/part-p0000-0-9.parquet", 10)
    _parquet(storage, "transactions/event_date=2025-03-10/part-p0001-0-4.parquet", 5)
    _parquet(storage, "labels/event_date=2025-03-10/part-p0000-0-2.parquet", 3)
    _parquet(storage, "features/user_activity/event_date=2025-03-10/part-0.parquet", 7)
    return storage


def test_a_snapshot_lists_every_file_with_rows_and_hash(filled: StorageSettings) -> None:
    snapshot = create_snapshot(filled, now=T0)
    assert snapshot.id.startswith("snap-20250310T120000Z-")
    assert snapshot.rows(TRANSACTIONS) == 15
    assert snapshot.rows(LABELS) == 3
    assert snapshot.rows("features/user_activity") == 7
    assert snapshot.rows("nothing") == 0
    assert all(len(f.sha256) == 64 for fs in snapshot.files.values() for f in fs)
    assert list_snapshots(filled) == [snapshot.id]


def test_a_snapshot_reads_the_same_bytes_whatever_is_added_later(filled: StorageSettings) -> None:
    snapshot = create_snapshot(filled, now=T0)
    _parquet(filled, "transactions/event_date=2025-03-11/part-p0000-10-19.parquet", 10)
    loaded = load_snapshot(filled, snapshot.id)
    assert loaded.rows(TRANSACTIONS) == 15
    paths = loaded.paths(filled, TRANSACTIONS)
    assert all(p.is_relative_to(loaded.offline_dir(filled)) for p in paths)
    assert sum(pq.ParquetFile(p).metadata.num_rows for p in paths) == 15
    # the snapshot's files are hard links: no copy of the data
    original = filled.offline_dir / loaded.files[TRANSACTIONS][0].path
    assert paths[0].stat().st_ino == original.stat().st_ino
    later = create_snapshot(filled, now=T1)
    assert later.rows(TRANSACTIONS) == 25
    assert later.sha256 != snapshot.sha256
    assert list_snapshots(filled) == sorted([snapshot.id, later.id])


def test_the_same_content_gives_the_same_hash(filled: StorageSettings) -> None:
    first = create_snapshot(filled, now=T0)
    assert create_snapshot(filled, now=T0) == first  # same id: returned, not rebuilt
    assert create_snapshot(filled, now=T1).sha256 == first.sha256


def test_files_being_written_are_not_part_of_a_snapshot(filled: StorageSettings) -> None:
    hidden = filled.offline_dir / "transactions/event_date=2025-03-10/.part-p0002-0-1.parquet"
    hidden.write_bytes(b"half")
    _parquet(filled, "transactions/.staging/part-p0003-0-1.parquet", 2)
    assert create_snapshot(filled, now=T0).rows(TRANSACTIONS) == 15


def test_an_empty_offline_store_gives_an_empty_snapshot(storage: StorageSettings) -> None:
    snapshot = create_snapshot(storage, now=T0)
    assert snapshot.files == {}
    assert load_snapshot(storage, snapshot.id).rows(TRANSACTIONS) == 0


def test_an_altered_file_is_refused(filled: StorageSettings) -> None:
    snapshot = create_snapshot(filled, now=T0)
    target = snapshot.paths(filled, LABELS)[0]
    target.unlink()  # replace the link's content without touching the offline store's file
    target.write_bytes(b"PAR1 forged")
    with pytest.raises(IntegrityError, match="missing or altered"):
        load_snapshot(filled, snapshot.id)
    assert load_snapshot(filled, snapshot.id, verify=False).id == snapshot.id


def test_a_missing_file_is_refused(filled: StorageSettings) -> None:
    snapshot = create_snapshot(filled, now=T0)
    snapshot.paths(filled, TRANSACTIONS)[1].unlink()
    with pytest.raises(IntegrityError):
        load_snapshot(filled, snapshot.id)


def test_an_edited_manifest_is_refused(filled: StorageSettings) -> None:
    snapshot = create_snapshot(filled, now=T0)
    manifest = filled.snapshots_dir / snapshot.id / MANIFEST
    raw = json.loads(manifest.read_text())
    raw["files"][TRANSACTIONS][0]["rows"] += 1
    manifest.write_text(json.dumps(raw))
    with pytest.raises(IntegrityError, match="manifest"):
        load_snapshot(filled, snapshot.id, verify=False)


def test_an_unknown_snapshot_is_not_found(storage: StorageSettings) -> None:
    with pytest.raises(NotFound):
        load_snapshot(storage, "snap-nope")
    assert list_snapshots(storage) == []


def test_the_data_commands_snapshot_list_and_verify(
    filled: StorageSettings, monkeypatch: pytest.MonkeyPatch
) -> None:
    from typer.testing import CliRunner

    from services.cli.data import app

    monkeypatch.setenv("MLOPS_STORAGE_DATA_DIR", str(filled.data_dir))
    runner = CliRunner()
    made = runner.invoke(app, ["snapshot"])
    assert made.exit_code == 0, made.output
    (snapshot_id,) = list_snapshots(filled)
    assert snapshot_id in made.output and "transactions: 2 files, 15 rows" in made.output
    listed = runner.invoke(app, ["snapshots"], terminal_width=200)
    assert (
        snapshot_id in listed.output and "transactions" in listed.output and "15" in listed.output
    )
    shown = runner.invoke(app, ["show", snapshot_id, "--verify"], terminal_width=200)
    assert shown.exit_code == 0 and "matches its sha256" in shown.output
    target = load_snapshot(filled, snapshot_id).paths(filled, LABELS)[0]
    target.unlink()
    target.write_bytes(b"PAR1 forged")
    refused = runner.invoke(app, ["show", snapshot_id, "--verify"], terminal_width=200)
    assert refused.exit_code == 1 and "altered" in refused.output
    unknown = runner.invoke(app, ["show", "snap-nope"])
    assert unknown.exit_code == 1 and "does not exist" in unknown.output
