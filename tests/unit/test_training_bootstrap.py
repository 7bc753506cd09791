"""`mlops bootstrap`'s catch-up check over the offline store (local files only)."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from services.cli.bootstrap import Backlog, CatchUp, offline_rows, wait_for_catch_up
from services.shared.settings import StorageSettings


def _write(storage: StorageSettings, dataset: str, name: str, rows: int) -> None:
    directory = storage.offline_dir / dataset / "event_date=2026-03-01"
    directory.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"x": list(range(rows))}), directory / name)


def test_rows_are_counted_per_dataset_without_files_being_written(
    storage: StorageSettings,
) -> None:
    _write(storage, "transactions", "part-1.parquet", 5)
    _write(storage, "transactions", ".part-2.parquet.tmp.parquet", 7)  # not renamed yet
    _write(storage, "labels", "part-1.parquet", 3)
    _write(storage, "features/user_activity", "part-1.parquet", 4)
    assert offline_rows(storage) == {
        "transactions": 5,
        "labels": 3,
        "features/user_activity": 4,
        "features/merchant_activity": 0,
    }


def test_catch_up_counts_only_what_the_archive_gained_after_the_baseline() -> None:
    baseline = {"transactions": 100, "labels": 90}
    target = CatchUp.for_history(baseline, transactions=10, labels=10)
    now = {"transactions": 110, "labels": 95, "features/user_activity": 4}
    assert target.missing(now) == {"labels": 5}
    assert target.gained(now)["features/user_activity"] == 4
    assert target.missing({**now, "labels": 100}) == {}
    assert CatchUp.nothing_new(baseline).missing(baseline) == {}


def test_waiting_needs_the_archive_and_no_backlog_and_times_out_naming_what_lags(
    storage: StorageSettings,
) -> None:
    _write(storage, "transactions", "part-1.parquet", 10)
    target = CatchUp.for_history(offline_rows(storage), transactions=3, labels=0)
    _write(storage, "transactions", "part-2.parquet", 2)
    backlogs = iter([Backlog(ingestion=4, features=9), Backlog(ingestion=0, features=7)])
    polled: list[tuple[dict[str, int], Backlog]] = []

    def poll(gained: dict[str, int], behind: Backlog) -> None:
        polled.append((gained, behind))

    with pytest.raises(TimeoutError, match=r"transactions archived: 1 missing.*ingestion: 4 rec"):
        wait_for_catch_up(storage, target, lambda: next(backlogs), 0.0, poll, interval_s=0)
    assert polled == [({**_ZERO, "transactions": 2}, Backlog(4, 9))]

    _write(storage, "transactions", "part-3.parquet", 1)  # archived, but features still lag
    with pytest.raises(TimeoutError, match=r"\(features: 7 records not processed\)"):
        wait_for_catch_up(storage, target, lambda: next(backlogs), 0.0, interval_s=0)

    done = wait_for_catch_up(storage, target, lambda: Backlog(0, 0), 0.0, interval_s=0)
    assert done["transactions"] == 13


_ZERO = {
    "transactions": 0,
    "labels": 0,
    "features/user_activity": 0,
    "features/merchant_activity": 0,
}
