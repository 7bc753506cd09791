"""A point-in-time training set from Feast carries, per label, what serving saw.

The real worker processes a phased stream (one partition, so every row is predictable); then
the training set is built the way training builds it: one entity row per labelled
transaction (its latest label), ``event_timestamp = event_time - 1 µs`` (the row written for
that very transaction is excluded), joined point-in-time by Feast's duckdb offline store over
the feature log. Each row must hold exactly the features the online store held just before
the transaction, computed independently by ``Reference``.
"""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
from features_harness import (
    FeaturesWorker,
    Label,
    Reference,
    Txn,
    create_input_topics,
    phased_stream,
    publish,
    wait_until_online_matches,
    worker_env,
)

from services.cli import localinfra
from services.shared.featurestore import apply_definitions, open_store
from services.shared.settings import FeastSettings, KafkaSettings, RedisSettings, StorageSettings
from services.shared.usecase.features import MERCHANT_FEATURES, USER_FEATURES


def missing_to_none(value: object) -> object:
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else value


async def test_point_in_time_training_set_has_one_row_per_label_as_of_just_before_it(
    kafka: KafkaSettings,
    redis_server: RedisSettings,
    storage: StorageSettings,
    feast_settings: FeastSettings,
    tmp_path: Path,
) -> None:
    kafka = kafka.model_copy(update={"partitions": 1})
    store = open_store(feast_settings, redis_server, storage)
    apply_definitions(store, feast_settings, storage.offline_dir)
    await create_input_topics(kafka)
    worker = FeaturesWorker(
        worker_env(kafka, redis_server, storage, feast_settings, localinfra.free_port()),
        tmp_path / "features.log",
    )
    reference = Reference()
    phases = phased_stream(seed=11, users=4, merchants=3)
    try:
        for number, phase in enumerate(phases):
            await publish(kafka, phase)
            reference.feed(phase)
            wait_until_online_matches(store, feast_settings, reference, f"phase {number}")
    finally:
        exit_code = worker.stop()  # graceful: the offline log is complete
    assert exit_code == 0, worker.process.tail()

    # what training does: labelled transactions (latest label each), at event_time - 1 µs
    transactions = {e.transaction_id: e for p in phases for e in p if isinstance(e, Txn)}
    latest_label = {e.transaction_id: e for p in phases for e in p if isinstance(e, Label)}
    labelled = [transactions[t] for t in latest_label if t in transactions]
    assert len(labelled) > 50
    entity_df = pd.DataFrame(
        {
            "transaction_id": [t.transaction_id for t in labelled],
            "user_id": [t.user_id for t in labelled],
            "merchant_id": [t.merchant_id for t in labelled],
            "event_timestamp": pd.to_datetime(
                [t.event_time_us - 1 for t in labelled], unit="us", utc=True
            ),
            "is_fraud": [latest_label[t.transaction_id].is_fraud for t in labelled],
        }
    )
    service = store.get_feature_service(feast_settings.feature_service)
    training = store.get_historical_features(entity_df=entity_df, features=service).to_df()

    assert len(training) == len(labelled)
    assert training["transaction_id"].is_unique
    mismatches = []
    for record in training.to_dict("records"):
        txn = transactions[record["transaction_id"]]
        expected = reference.training_row(txn)
        got = {name: missing_to_none(record[name]) for name in (*USER_FEATURES, *MERCHANT_FEATURES)}
        if got != expected:
            mismatches.append((txn.transaction_id, got, expected))
    assert not mismatches, f"{len(mismatches)} rows differ, first: {mismatches[:2]}"
    # the cases that make point-in-time matter are in the set
    assert any(reference.training_row(t)["user_txn_count_24h"] is None for t in labelled)
    assert any((reference.training_row(t)["merchant_labels_7d"] or 0) > 0 for t in labelled)
