"""The training set: labelled transactions with point-in-time features, from one snapshot.

- Transactions and labels are read from the snapshot's files (the archive is at-least-once:
  both are deduplicated by transaction_id; a later label for a transaction wins).
- Streaming features come from Feast's historical retrieval over the snapshot's feature logs,
  with the feature definitions applied into a temporary registry (the live registry is never
  touched). Each transaction asks for its features as of one microsecond *before* it: the
  features service logs a row for the transaction itself, and serving scores a transaction
  before that row exists.
- The model's inputs come from ``model_inputs``, the same function serving calls.
- ``time_split`` cuts by event time: train on the past, validate on the next period, test on
  the latest one.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from services.shared import featurestore
from services.shared.datasets import LABELS, TRANSACTIONS, Snapshot
from services.shared.errors import FailedPrecondition
from services.shared.logging import get_logger
from services.shared.run_contract import LABEL_COLUMN, TIME_COLUMN
from services.shared.settings import FeastSettings, RedisSettings, StorageSettings
from services.shared.usecase.features import (
    MERCHANT_FEATURES,
    MERCHANT_VIEW,
    MODEL_INPUTS,
    USER_FEATURES,
    USER_VIEW,
    TransactionColumns,
    model_inputs,
)

log = get_logger("training.dataset")

_TRANSACTION_COLUMNS = [
    "transaction_id",
    "user_id",
    "merchant_id",
    "amount",
    "channel",
    "country",
    "event_time",
]
_LABEL_COLUMNS = ["transaction_id", "is_fraud", "event_time", "ingested_at"]
# served features come as of just before the transaction (see the module docstring)
POINT_IN_TIME_OFFSET = pd.Timedelta(microseconds=1)


@dataclass(frozen=True)
class LabelledSet:
    """Model inputs with their labels, one row per transaction, ordered by event time."""

    features: np.ndarray  # float32 [rows, len(MODEL_INPUTS)]
    labels: np.ndarray  # float32 0/1
    event_time: np.ndarray  # datetime64[us] (UTC)
    transaction_ids: np.ndarray  # object (str)
    # training weight of each row (services/training/window.py); None: every row weighs 1
    weights: np.ndarray | None = None

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def positives(self) -> int:
        return int(self.labels.sum())

    def row_weights(self) -> np.ndarray:
        """float32 weight per row (ones unless weighted)."""
        if self.weights is None:
            return np.ones(len(self), dtype=np.float32)
        return self.weights.astype(np.float32)

    def weighted(self, weights: np.ndarray) -> LabelledSet:
        return replace(self, weights=np.asarray(weights, dtype=np.float32))

    def subset(self, index: np.ndarray) -> LabelledSet:
        return LabelledSet(
            self.features[index],
            self.labels[index],
            self.event_time[index],
            self.transaction_ids[index],
            None if self.weights is None else self.weights[index],
        )

    def to_table(self) -> pa.Table:
        """MODEL_INPUTS columns + label + event_time (the registry's gate reads this)."""
        columns: dict[str, pa.Array] = {
            name: pa.array(self.features[:, i], pa.float32()) for i, name in enumerate(MODEL_INPUTS)
        }
        columns[LABEL_COLUMN] = pa.array(self.labels.astype(np.int8), pa.int8())
        columns[TIME_COLUMN] = pa.array(self.event_time, pa.timestamp("us", tz="UTC"))
        return pa.table(columns)


@dataclass(frozen=True)
class TimeSplit:
    train: LabelledSet
    validation: LabelledSet
    test: LabelledSet
    validation_start: datetime
    test_start: datetime


def time_split(data: LabelledSet, validation_fraction: float, test_fraction: float) -> TimeSplit:
    """Train on the oldest rows, validate on the next ``validation_fraction``, test on the
    latest ``test_fraction``; rows sharing a boundary's timestamp go to the later period."""
    n = len(data)
    order = np.argsort(data.event_time, kind="mergesort")
    times = data.event_time[order]
    test_at = times[min(n - 1, round(n * (1 - test_fraction)))]
    validation_at = times[min(n - 1, round(n * (1 - test_fraction - validation_fraction)))]
    train_idx = order[times < validation_at]
    validation_idx = order[(times >= validation_at) & (times < test_at)]
    test_idx = order[times >= test_at]
    split = TimeSplit(
        train=data.subset(train_idx),
        validation=data.subset(validation_idx),
        test=data.subset(test_idx),
        validation_start=pd.Timestamp(validation_at, tz="UTC").to_pydatetime(),
        test_start=pd.Timestamp(test_at, tz="UTC").to_pydatetime(),
    )
    require_both_classes(split)
    return split


def require_both_classes(split: TimeSplit) -> None:
    """Every period must hold frauds and legitimate rows, or nothing can be learnt or judged."""
    for name, part in (
        ("train", split.train),
        ("validation", split.validation),
        ("test", split.test),
    ):
        if len(part) == 0 or part.positives == 0 or part.positives == len(part):
            raise FailedPrecondition(
                f"the {name} period has {len(part)} rows and {part.positives} frauds: "
                "a model needs both classes in every period (more labelled history needed)"
            )


def _read(paths: list[Path], columns: list[str]) -> pd.DataFrame:
    tables = [pq.read_table(path, columns=columns) for path in paths]
    if not tables:
        return pd.DataFrame(columns=columns)
    return pa.concat_tables(tables, promote_options="default").to_pandas()


def _utc(series: pd.Series) -> pd.Series:
    return pd.to_datetime(series, utc=True).astype("datetime64[us, UTC]")


def labelled_transactions(snapshot: Snapshot, storage: StorageSettings) -> pd.DataFrame:
    """Transactions joined with their labels (both deduplicated), ordered by event time."""
    transactions = _read(snapshot.paths(storage, TRANSACTIONS), _TRANSACTION_COLUMNS)
    labels = _read(snapshot.paths(storage, LABELS), _LABEL_COLUMNS)
    if transactions.empty or labels.empty:
        raise FailedPrecondition(
            f"snapshot {snapshot.id} has {len(transactions)} transactions and {len(labels)} "
            "labels: nothing to train on"
        )
    transactions["event_time"] = _utc(transactions["event_time"])
    transactions = transactions.sort_values(["transaction_id", "event_time"], kind="mergesort")
    transactions = transactions.drop_duplicates("transaction_id", keep="first")
    labels["ingested_at"] = _utc(labels["ingested_at"])
    labels = labels.sort_values(["transaction_id", "ingested_at"], kind="mergesort")
    labels = labels.drop_duplicates("transaction_id", keep="last")  # a correction wins
    joined = transactions.merge(
        labels[["transaction_id", "is_fraud"]], on="transaction_id", how="inner"
    )
    if joined.empty:
        raise FailedPrecondition(f"snapshot {snapshot.id}: no transaction has a label")
    return joined.sort_values(["event_time", "transaction_id"], kind="mergesort").reset_index(
        drop=True
    )


def _epoch_seconds(times: pd.Series) -> np.ndarray:
    return times.astype("datetime64[us, UTC]").astype("int64").to_numpy() / 1e6


class TrainingSetBuilder:
    """Builds the point-in-time correct training set of a dataset snapshot."""

    def __init__(self, storage: StorageSettings, feast: FeastSettings, redis: RedisSettings):
        self.storage = storage
        self.feast = feast
        self.redis = redis

    def build(self, snapshot: Snapshot) -> LabelledSet:
        for view in (USER_VIEW, MERCHANT_VIEW):
            if not snapshot.files.get(f"features/{view}"):
                raise FailedPrecondition(
                    f"snapshot {snapshot.id} has no feature log of view {view!r} "
                    "(has the features service run?)"
                )
        rows = labelled_transactions(snapshot, self.storage)
        entities = rows[[*_TRANSACTION_COLUMNS, "is_fraud"]].copy()
        entities["event_timestamp"] = entities["event_time"] - POINT_IN_TIME_OFFSET
        with tempfile.TemporaryDirectory(prefix="feast-training-") as tmp:
            store = featurestore.open_store(
                self.feast, self.redis, self.storage, registry_path=Path(tmp) / "registry.db"
            )
            definitions = featurestore.load_definitions_module(self.feast).build(
                snapshot.offline_dir(self.storage), self.feast.feature_service
            )
            store.apply(definitions.objects())
            service = store.get_feature_service(self.feast.feature_service)
            joined = store.get_historical_features(entity_df=entities, features=service).to_df()
        if len(joined) != len(entities):
            raise FailedPrecondition(
                f"historical retrieval returned {len(joined)} rows for {len(entities)} entities"
            )
        # the offline store does not keep row order; a fixed order keeps runs reproducible
        joined = joined.sort_values(["event_time", "transaction_id"], kind="mergesort")
        joined = joined.reset_index(drop=True)
        online = {name: joined[name].tolist() for name in (*USER_FEATURES, *MERCHANT_FEATURES)}
        inputs = model_inputs(
            TransactionColumns(
                amount=joined["amount"].to_numpy(dtype=np.float64),
                channel=joined["channel"].tolist(),
                country=joined["country"].tolist(),
                event_time_epoch=_epoch_seconds(joined["event_time"]),
            ),
            online,
        )
        log.info(
            "training_set_built",
            snapshot_id=snapshot.id,
            rows=len(joined),
            frauds=int(joined["is_fraud"].sum()),
        )
        return LabelledSet(
            features=inputs,
            labels=joined["is_fraud"].to_numpy(dtype=np.float32),
            event_time=joined["event_time"].dt.tz_convert(None).to_numpy(dtype="datetime64[us]"),
            transaction_ids=joined["transaction_id"].to_numpy(dtype=object),
        )
