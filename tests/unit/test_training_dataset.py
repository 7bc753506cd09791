"""The training set of a snapshot: deduplication, label join, point-in-time features.

Feast's historical retrieval runs in-process over local Parquet (duckdb offline store, a
temporary registry): no network.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from fraud_history import LABEL_SCHEMA, write_fraud_history

from services.shared.datasets import create_snapshot
from services.shared.errors import FailedPrecondition
from services.shared.settings import FeastSettings, RedisSettings, StorageSettings
from services.shared.usecase.features import MODEL_INPUTS
from services.training.dataset import TrainingSetBuilder, labelled_transactions


@pytest.fixture
def history_storage(storage: StorageSettings) -> StorageSettings:
    write_fraud_history(storage.offline_dir, n_users=40, days=4, duplicates=5)
    return storage


def test_transactions_and_labels_are_deduplicated_and_joined(
    history_storage: StorageSettings,
) -> None:
    offline = history_storage.offline_dir
    transactions = pq.read_table(offline / "transactions").to_pandas()
    # a corrected label, archived later, for one transaction
    first = transactions.iloc[0]
    moment = datetime(2026, 3, 6, tzinfo=UTC)
    corrected = {
        "transaction_id": first.transaction_id,
        "is_fraud": True,
        "event_time": moment,
        "ingested_at": moment + timedelta(days=30),
        "source_topic": "events.labels",
        "source_partition": 0,
        "source_offset": 10_000,
    }
    target = offline / "labels" / "event_date=2026-03-06"
    target.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist([corrected], schema=LABEL_SCHEMA), target / "late.parquet")

    snapshot = create_snapshot(history_storage)
    rows = labelled_transactions(snapshot, history_storage)
    assert rows["transaction_id"].is_unique
    assert len(rows) == transactions["transaction_id"].nunique()
    assert bool(rows.set_index("transaction_id").loc[first.transaction_id, "is_fraud"])
    assert rows["event_time"].is_monotonic_increasing


def test_features_are_taken_as_of_just_before_each_transaction(
    history_storage: StorageSettings,
) -> None:
    snapshot = create_snapshot(history_storage)
    builder = TrainingSetBuilder(
        history_storage, FeastSettings(project=f"t{uuid.uuid4().hex[:8]}"), RedisSettings()
    )
    data = builder.build(snapshot)
    rows = labelled_transactions(snapshot, history_storage)
    assert len(data) == len(rows)
    assert data.features.shape == (len(rows), len(MODEL_INPUTS))
    assert list(data.transaction_ids) == list(rows["transaction_id"])

    column = {name: i for i, name in enumerate(MODEL_INPUTS)}
    frame = pd.DataFrame(
        {
            "user_id": rows["user_id"],
            "first_seen": data.features[:, column["is_first_seen_user"]],
            "count_24h": np.expm1(data.features[:, column["log_user_txn_count_24h"]]),
            "time": rows["event_time"],
        }
    )
    # the row the features service logged for a transaction itself must not leak in: a user's
    # first transaction sees no features; a later one sees the row logged for the previous
    # transaction (its 24 h count, ending at that transaction), as serving would online
    for _user, group in frame.groupby("user_id"):
        times = list(group["time"])
        assert group["first_seen"].iloc[0] == 1.0
        assert (group["first_seen"].iloc[1:] == 0.0).all()
        expected = [0] + [
            sum(1 for u in times[:i] if u > times[i - 1] - pd.Timedelta(hours=24))
            for i in range(1, len(times))
        ]
        np.testing.assert_allclose(group["count_24h"].to_numpy(), expected, atol=1e-3)


def test_a_snapshot_without_feature_logs_is_refused(storage: StorageSettings) -> None:
    write_fraud_history(storage.offline_dir, n_users=10, days=2)
    for path in (storage.offline_dir / "features").rglob("*.parquet"):
        path.unlink()
    snapshot = create_snapshot(storage)
    builder = TrainingSetBuilder(storage, FeastSettings(project="t"), RedisSettings())
    with pytest.raises(FailedPrecondition, match="no feature log"):
        builder.build(snapshot)
