"""Versioned datasets: snapshots of the offline store.

The offline store (``StorageSettings.offline_dir``) holds immutable Parquet files, written
atomically and never modified::

    offline/transactions/event_date=YYYY-MM-DD/part-*.parquet     archived by ingestion
    offline/labels/event_date=YYYY-MM-DD/part-*.parquet           archived by ingestion
    offline/features/<view>/event_date=YYYY-MM-DD/part-*.parquet  logged by the features service

A snapshot is the data version that training and lineage refer to: a manifest of every file
(relative path, row count, sha256) plus hard links to those files under the snapshot's own
directory, so a snapshot keeps reading the same bytes whatever is added later. Its id ends with
the first characters of the manifest's hash; ``load_snapshot`` verifies every file.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import pyarrow.parquet as pq

from services.shared.errors import IntegrityError, NotFound
from services.shared.settings import StorageSettings

MANIFEST = "manifest.json"
TRANSACTIONS = "transactions"
LABELS = "labels"


@dataclass(frozen=True)
class DatasetFile:
    path: str  # relative to the offline directory
    rows: int
    sha256: str


@dataclass(frozen=True)
class Snapshot:
    id: str
    created_at: str
    sha256: str  # of the manifest's file list: the dataset's content hash
    files: dict[str, list[DatasetFile]] = field(default_factory=dict)  # dataset -> files

    def offline_dir(self, storage: StorageSettings) -> Path:
        """An offline directory holding exactly this snapshot's files."""
        return storage.snapshots_dir / self.id / "offline"

    def paths(self, storage: StorageSettings, dataset: str) -> list[Path]:
        base = self.offline_dir(storage)
        return [base / f.path for f in self.files.get(dataset, [])]

    def rows(self, dataset: str) -> int:
        return sum(f.rows for f in self.files.get(dataset, []))


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _dataset_of(relative: Path) -> str:
    """``transactions``, ``labels`` or ``features/<view>`` from a file's relative path."""
    parts = relative.parts
    return "/".join(parts[:2]) if parts[0] == "features" else parts[0]


def _content_hash(files: dict[str, list[DatasetFile]]) -> str:
    listing = [[f.path, f.rows, f.sha256] for ds in sorted(files) for f in files[ds]]
    return hashlib.sha256(json.dumps(listing).encode()).hexdigest()


def create_snapshot(storage: StorageSettings, *, now: datetime | None = None) -> Snapshot:
    """Snapshot every Parquet file now in the offline store."""
    offline = storage.offline_dir
    files: dict[str, list[DatasetFile]] = {}
    for path in sorted(offline.rglob("*.parquet")):
        relative = path.relative_to(offline)
        if any(part.startswith(".") for part in relative.parts):
            continue  # files being written
        files.setdefault(_dataset_of(relative), []).append(
            DatasetFile(str(relative), pq.ParquetFile(path).metadata.num_rows, _sha256(path))
        )
    content = _content_hash(files)
    moment = (now or datetime.now(UTC)).astimezone(UTC)
    snapshot = Snapshot(
        id=f"snap-{moment:%Y%m%dT%H%M%S}Z-{content[:10]}",
        created_at=moment.isoformat(),
        sha256=content,
        files=files,
    )
    target = storage.snapshots_dir / snapshot.id
    if (target / MANIFEST).exists():
        return load_snapshot(storage, snapshot.id)
    staging = storage.snapshots_dir / f".{snapshot.id}.tmp"
    if staging.exists():
        shutil.rmtree(staging)
    for dataset_files in files.values():
        for f in dataset_files:
            link = staging / "offline" / f.path
            link.parent.mkdir(parents=True, exist_ok=True)
            os.link(offline / f.path, link)  # same bytes, no copy; the source is immutable
    staging.mkdir(parents=True, exist_ok=True)
    (staging / MANIFEST).write_text(json.dumps(asdict(snapshot), indent=2))
    os.replace(staging, target)
    return snapshot


def load_snapshot(storage: StorageSettings, snapshot_id: str, *, verify: bool = True) -> Snapshot:
    """A snapshot by id; with ``verify``, every file is checked against its recorded sha256."""
    manifest = storage.snapshots_dir / snapshot_id / MANIFEST
    if not manifest.exists():
        raise NotFound(f"dataset snapshot {snapshot_id!r} does not exist")
    raw = json.loads(manifest.read_text())
    files = {ds: [DatasetFile(**f) for f in fs] for ds, fs in raw["files"].items()}
    snapshot = Snapshot(raw["id"], raw["created_at"], raw["sha256"], files)
    if _content_hash(files) != snapshot.sha256:
        raise IntegrityError(f"snapshot {snapshot_id}: manifest does not match its hash")
    if verify:
        base = snapshot.offline_dir(storage)
        for dataset_files in files.values():
            for f in dataset_files:
                path = base / f.path
                if not path.exists() or _sha256(path) != f.sha256:
                    raise IntegrityError(f"snapshot {snapshot_id}: {f.path} is missing or altered")
    return snapshot


def list_snapshots(storage: StorageSettings) -> list[str]:
    if not storage.snapshots_dir.exists():
        return []
    return sorted(p.name for p in storage.snapshots_dir.iterdir() if (p / MANIFEST).exists())
