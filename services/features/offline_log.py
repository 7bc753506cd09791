"""The offline feature log: every feature row the online store received, as Parquet.

Layout (what Feast's FileSource in feature_repo/fraud_features.py reads, and what dataset
snapshots hard-link)::

    <offline_dir>/features/<view>/event_date=YYYY-MM-DD/part-<created_us>-<writer>-<n>.parquet

Columns, in order: the entity key (``user_id`` / ``merchant_id``, string), every feature of the
view with its declared type (int64 / float64 / string), ``event_timestamp`` (timestamp[us,
UTC]: the entity's latest event time the row is computed as of; also decides event_date) and
``created_timestamp`` (timestamp[us, UTC]: when the row was computed; strictly increasing per
worker, so rows with the same event_timestamp are ordered as they were applied).

Files are immutable: written to a dot-prefixed temporary name in the same directory, synced,
then renamed into place (``os.replace``), so a reader (or a snapshot's hard link) never sees a
partial file and nothing is ever rewritten.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from services.features.windows import FeatureRow

_ARROW_TYPES = {"int64": pa.int64(), "float64": pa.float64(), "string": pa.string()}
_TIMESTAMP = pa.timestamp("us", tz="UTC")
_US_PER_DAY = 86_400_000_000
_EPOCH_ORDINAL = date(1970, 1, 1).toordinal()
TEMPORARY_PREFIX = "."


@dataclass(frozen=True, slots=True)
class StampedRow:
    """A feature row with the time it was computed (its created_timestamp)."""

    row: FeatureRow
    created_us: int


def event_date(event_time_us: int) -> str:
    return date.fromordinal(_EPOCH_ORDINAL + event_time_us // _US_PER_DAY).isoformat()


class CreatedClock:
    """Wall-clock microseconds, strictly increasing across calls (created_timestamp)."""

    def __init__(self) -> None:
        self._last = 0

    def next(self) -> int:
        now = time.time_ns() // 1000
        self._last = now if now > self._last else self._last + 1
        return self._last


class FeatureLogWriter:
    """Writes one view's rows as immutable Parquet files, one per event date per call."""

    def __init__(
        self, directory: Path, entity_key: str, features: dict[str, str], writer_id: str
    ) -> None:
        self.directory = directory
        self.entity_key = entity_key
        self.features = dict(features)
        self.writer_id = writer_id
        self._files = 0
        self.schema = pa.schema(
            [
                pa.field(entity_key, pa.string(), nullable=False),
                *(pa.field(name, _ARROW_TYPES[kind]) for name, kind in features.items()),
                pa.field("event_timestamp", _TIMESTAMP, nullable=False),
                pa.field("created_timestamp", _TIMESTAMP, nullable=False),
            ]
        )

    def table(self, rows: Sequence[StampedRow]) -> pa.Table:
        columns: list[pa.Array] = [pa.array([r.row.entity_id for r in rows], pa.string())]
        for name, kind in self.features.items():
            values = [r.row.features[name] for r in rows]
            columns.append(pa.array(values, _ARROW_TYPES[kind]))
        columns.append(pa.array([r.row.event_time_us for r in rows], _TIMESTAMP))
        columns.append(pa.array([r.created_us for r in rows], _TIMESTAMP))
        return pa.Table.from_arrays(columns, schema=self.schema)

    def write(self, rows: Sequence[StampedRow]) -> list[Path]:
        """Write ``rows`` (one file per event date); returns the files written."""
        by_date: dict[str, list[StampedRow]] = defaultdict(list)
        for stamped in rows:
            by_date[event_date(stamped.row.event_time_us)].append(stamped)
        written = []
        for day, day_rows in sorted(by_date.items()):
            partition = self.directory / f"event_date={day}"
            partition.mkdir(parents=True, exist_ok=True)
            self._files += 1
            first_created = min(r.created_us for r in day_rows)
            name = f"part-{first_created:016d}-{self.writer_id}-{self._files:06d}.parquet"
            written.append(self._write_atomically(partition / name, self.table(day_rows)))
        return written

    @staticmethod
    def _write_atomically(path: Path, table: pa.Table) -> Path:
        temporary = path.with_name(f"{TEMPORARY_PREFIX}{path.name}.tmp")
        try:
            with temporary.open("wb") as handle:
                pq.write_table(table, handle)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temporary, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                temporary.unlink()
            raise
        directory = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(directory)  # the rename itself survives a power loss
        finally:
            os.close(directory)
        return path

    def remove_stale_temporaries(self, older_than_s: float = 3600.0) -> int:
        """Delete temporaries a crashed writer left behind (old enough not to be in use)."""
        removed = 0
        if not self.directory.exists():
            return 0
        deadline = time.time() - older_than_s
        for path in self.directory.glob(f"event_date=*/{TEMPORARY_PREFIX}*.tmp"):
            with contextlib.suppress(FileNotFoundError):
                if path.stat().st_mtime < deadline:
                    path.unlink()
                    removed += 1
        return removed
