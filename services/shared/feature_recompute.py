"""Training-serving skew: recompute what serving used, offline and point in time, and compare.

Serving logs the exact model inputs of every answer (``PredictionRecord.features``). This
module recomputes them the way training computes its training set: the streaming features
from the offline feature log (Feast's point-in-time join over Parquet, as of just before the
transaction's event time: ``POINT_IN_TIME_OFFSET``), then the same request-time transformation
(``model_inputs``). Any difference is skew for that request: a feature pushed late to the
online store, an online store that missed a write, a transformation that changed.

Used by ``mlops trace`` and the dashboard for one prediction (services/shared/prediction_trace.py)
and by monitoring's sampled, continuous comparison (services/monitoring/skew.py).
Feast is imported lazily (``import feast`` takes seconds) and every call blocks: callers in an
event loop run it in a thread.
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np

from services.shared import featurestore
from services.shared.settings import FeastSettings, RedisSettings, StorageSettings
from services.shared.usecase.features import (
    MERCHANT_FEATURES,
    MODEL_INPUTS,
    USER_FEATURES,
    TransactionColumns,
    model_inputs,
)

# served features are as of just before the transaction: training's point-in-time rule
POINT_IN_TIME_OFFSET = timedelta(microseconds=1)
# serving logs float32 model inputs as doubles; a difference below this is no difference
DEFAULT_TOLERANCE = 1e-4


@dataclass(frozen=True)
class ServedRow:
    """What serving answered from: the transaction and the model inputs it logged."""

    transaction_id: str
    user_id: str
    merchant_id: str
    amount: float
    channel: str
    country: str
    event_time: datetime  # timezone-aware
    served: Mapping[str, float]  # model input name -> value serving used


@dataclass(frozen=True)
class FeatureComparison:
    name: str
    served: float | None
    offline: float
    difference: float | None  # served - offline; None when serving did not log it
    skewed: bool


@dataclass(frozen=True)
class Recomputed:
    transaction_id: str
    as_of: datetime
    streaming: dict[str, Any]  # the offline streaming features (None: the entity was unknown)
    inputs: list[FeatureComparison]

    @property
    def skewed(self) -> list[str]:
        return [c.name for c in self.inputs if c.skewed]


def as_of(event_time: datetime) -> datetime:
    """The moment training reads a transaction's features at (its point in time)."""
    return event_time.astimezone(UTC) - POINT_IN_TIME_OFFSET


def compare(
    served: Mapping[str, float], offline: Sequence[float], tolerance: float = DEFAULT_TOLERANCE
) -> list[FeatureComparison]:
    """One comparison per model input (relative tolerance for large values)."""
    result = []
    for name, value in zip(MODEL_INPUTS, offline, strict=True):
        off = float(value)
        got = served.get(name)
        if got is None:
            result.append(FeatureComparison(name, None, off, None, True))
            continue
        difference = float(got) - off
        limit = tolerance * max(1.0, abs(off))
        result.append(
            FeatureComparison(
                name,
                float(got),
                off,
                difference,
                not math.isfinite(difference) or abs(difference) > limit,
            )
        )
    return result


def _plain(value: Any) -> Any:
    """A JSON-friendly scalar from a pandas cell (NaN/NA: None)."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, (int, np.integer)):
        return int(value)
    try:
        number = float(value)
    except (TypeError, ValueError):  # pandas.NA
        return None
    return None if math.isnan(number) else number


class OfflineFeatureRecomputer:
    """Point-in-time recomputation of served model inputs from the offline feature log."""

    def __init__(
        self,
        feast: FeastSettings,
        redis: RedisSettings,
        storage: StorageSettings,
        *,
        tolerance: float = DEFAULT_TOLERANCE,
    ) -> None:
        self.feast = feast
        self.redis = redis
        self.storage = storage
        self.tolerance = tolerance

    def recompute(self, rows: Sequence[ServedRow]) -> list[Recomputed]:
        """Blocking: one Feast historical retrieval for every row."""
        if not rows:
            return []
        import pandas as pd

        entities = pd.DataFrame(
            {
                "transaction_id": [r.transaction_id for r in rows],
                "user_id": [r.user_id for r in rows],
                "merchant_id": [r.merchant_id for r in rows],
                "event_timestamp": pd.to_datetime([as_of(r.event_time) for r in rows], utc=True),
                "_row": list(range(len(rows))),
            }
        )
        with tempfile.TemporaryDirectory(prefix="feast-recompute-") as tmp:
            store = featurestore.open_store(
                self.feast, self.redis, self.storage, registry_path=Path(tmp) / "registry.db"
            )
            definitions = featurestore.load_definitions_module(self.feast).build(
                self.storage.offline_dir, self.feast.feature_service
            )
            store.apply(definitions.objects())
            service = store.get_feature_service(self.feast.feature_service)
            joined = store.get_historical_features(entity_df=entities, features=service).to_df()
        joined = joined.sort_values("_row").reset_index(drop=True)
        names = [*USER_FEATURES, *MERCHANT_FEATURES]
        online = {name: joined[name].tolist() for name in names}
        inputs = model_inputs(
            TransactionColumns(
                amount=np.asarray([r.amount for r in rows], dtype=np.float64),
                channel=[r.channel for r in rows],
                country=[r.country for r in rows],
                event_time_epoch=np.asarray([r.event_time.timestamp() for r in rows]),
            ),
            online,
        )
        return [
            Recomputed(
                transaction_id=row.transaction_id,
                as_of=as_of(row.event_time),
                streaming={name: _plain(online[name][i]) for name in names},
                inputs=compare(row.served, inputs[i].tolist(), self.tolerance),
            )
            for i, row in enumerate(rows)
        ]
