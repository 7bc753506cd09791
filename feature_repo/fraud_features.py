"""Feast definitions of the fraud model's streaming features: the single source of truth.

The features service pushes into these views (online: Redis; offline: Parquet under the
platform's offline store), training reads them back point-in-time correct, serving reads them
online. Feature names and types come from services/shared/usecase/features.py.

``build(offline_dir)`` makes the definitions over any offline directory: training applies them
over a dataset snapshot (so a run reads exactly the snapshot's files); the module-level objects
below are what ``feast apply`` registers for the live store.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from feast import Entity, FeatureService, FeatureView, Field, FileSource, PushSource, ValueType
from feast.data_format import ParquetFormat
from feast.types import Float64, Int64, PrimitiveFeastType, String

from services.shared.settings import FeastSettings, StorageSettings
from services.shared.usecase.features import (
    MERCHANT_FEATURES,
    MERCHANT_VIEW,
    USER_FEATURES,
    USER_VIEW,
)

_TYPES: dict[str, PrimitiveFeastType] = {"int64": Int64, "float64": Float64, "string": String}


def feature_log_dir(offline_dir: Path, view: str) -> Path:
    """Where the offline rows of a feature view live (Parquet, partitioned by event date)."""
    return offline_dir / "features" / view


@dataclass(frozen=True)
class FraudFeatureDefinitions:
    user: Entity
    merchant: Entity
    user_push: PushSource
    merchant_push: PushSource
    user_activity: FeatureView
    merchant_activity: FeatureView
    fraud_model: FeatureService

    def objects(self) -> list[object]:
        return [
            self.user,
            self.merchant,
            self.user_push,
            self.merchant_push,
            self.user_activity,
            self.merchant_activity,
            self.fraud_model,
        ]


def _view(
    name: str, entity: Entity, features: dict[str, str], offline_dir: Path, description: str
) -> tuple[PushSource, FeatureView]:
    batch = FileSource(
        name=f"{name}_log",
        path=str(feature_log_dir(offline_dir, name) / "**" / "*.parquet"),
        file_format=ParquetFormat(),
        timestamp_field="event_timestamp",
        created_timestamp_column="created_timestamp",
    )
    push = PushSource(name=f"{name}_push", batch_source=batch)
    view = FeatureView(
        name=name,
        entities=[entity],
        # no TTL: online reads return the latest row whatever its age, so training must too
        ttl=timedelta(0),
        schema=[Field(name=n, dtype=_TYPES[t]) for n, t in features.items()],
        source=push,
        online=True,
        description=description,
    )
    return push, view


def build(offline_dir: Path, feature_service: str = "fraud_model_v1") -> FraudFeatureDefinitions:
    user = Entity(
        name="user",
        join_keys=["user_id"],
        value_type=ValueType.STRING,
        description="A card holder.",
    )
    merchant = Entity(
        name="merchant",
        join_keys=["merchant_id"],
        value_type=ValueType.STRING,
        description="A merchant accepting card payments.",
    )
    user_push, user_activity = _view(
        USER_VIEW,
        user,
        USER_FEATURES,
        offline_dir,
        "Per-user spending activity over event-time windows (1 h, 24 h, 7 days).",
    )
    merchant_push, merchant_activity = _view(
        MERCHANT_VIEW,
        merchant,
        MERCHANT_FEATURES,
        offline_dir,
        "Per-merchant volume (24 h) and labelled fraud rate (7 days).",
    )
    fraud_model = FeatureService(
        name=feature_service,
        features=[user_activity, merchant_activity],
        description="Streaming features the fraud model reads at training and serving time.",
    )
    return FraudFeatureDefinitions(
        user, merchant, user_push, merchant_push, user_activity, merchant_activity, fraud_model
    )


_live = build(StorageSettings().offline_dir, FeastSettings().feature_service)
user = _live.user
merchant = _live.merchant
user_activity_push = _live.user_push
merchant_activity_push = _live.merchant_push
user_activity = _live.user_activity
merchant_activity = _live.merchant_activity
fraud_model_v1 = _live.fraud_model
