"""`mlops bootstrap`'s catch-up check over the offline store (local files only)."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from services.cli.bootstrap import CatchUp, offline_rows, wait_for_catch_up
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


def test_catch_up_counts_only_what_was_added_after_the_baseline() -> None:
    baseline = {
        "transactions": 100,
        "labels": 90,
        "features/user_activity": 100,
        "features/merchant_activity": 150,
    }
    target = CatchUp.for_history(baseline, transactions=10, labels=10)
    now = {
        "transactions": 110,
        "labels": 95,
        "features/user_activity": 104,
        "features/merchant_activity": 170,
    }
    assert target.missing(now) == {"labels": 5, "features/user_activity": 6}
    assert target.missing({**now, "labels": 100, "features/user_activity": 110}) == {}


def test_waiting_times_out_naming_what_lags(storage: StorageSettings) -> None:
    _write(storage, "transactions", "part-1.parquet", 10)
    target = CatchUp.for_history(offline_rows(storage), transactions=3, labels=0)
    _write(storage, "transactions", "part-2.parquet", 3)
    _write(storage, "features/merchant_activity", "part-1.parquet", 3)
    polled: list[dict[str, int]] = []
    with pytest.raises(TimeoutError, match="user feature rows logged: 3 missing"):
        wait_for_catch_up(storage, target, timeout_s=0.0, on_poll=polled.append, interval_s=0)
    assert polled[-1]["transactions"] == 3
    _write(storage, "features/user_activity", "part-1.parquet", 3)
    assert wait_for_catch_up(storage, target, timeout_s=0.0)["transactions"] == 13
