"""The features worker against a real broker and Redis: online features equal a reference.

A phased stream of validated events (windows rolling over days, out-of-order and too-late
events, duplicates, early, corrected and out-of-window labels, one unreadable record) goes
straight to the validated topics; the real worker (``python -m services.features``) computes
the features; what Feast serves online must equal ``Reference``, computed independently from
the same events, and the offline log must hold exactly the reference's rows, in order.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as ds
import pytest
from features_harness import (
    FeaturesWorker,
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
from services.shared.kafka import create_consumer
from services.shared.proto.mlops.v1 import events_pb2
from services.shared.settings import FeastSettings, KafkaSettings, RedisSettings, StorageSettings
from services.shared.topics import Topics
from services.shared.usecase.features import MERCHANT_FEATURES, USER_FEATURES

GARBAGE = (b"u1", b"\xff\x00 not a ValidatedTransaction")


async def read_dead_letters(kafka: KafkaSettings, count: int) -> list[events_pb2.DeadLetter]:
    consumer = create_consumer(
        kafka, Topics.from_settings(kafka).dlq, group_id=None, client_id="features-test"
    )
    await consumer.start()
    try:
        letters: list[events_pb2.DeadLetter] = []
        while len(letters) < count:
            batch = await consumer.getmany(timeout_ms=10_000)
            assert batch, "dead letters expected on events.dlq"
            for records in batch.values():
                letters.extend(events_pb2.DeadLetter.FromString(r.value) for r in records)
        return letters
    finally:
        await consumer.stop()


def feature_log(storage: StorageSettings, view: str) -> pa.Table:
    directory = storage.offline_dir / "features" / view
    return ds.dataset(directory, format="parquet", partitioning="hive").to_table()


async def test_online_features_and_feature_log_equal_an_independent_reference(
    kafka: KafkaSettings,
    redis_server: RedisSettings,
    storage: StorageSettings,
    feast_settings: FeastSettings,
    tmp_path: Path,
) -> None:
    kafka = kafka.model_copy(update={"partitions": 1})  # one processing order: every row known
    store = open_store(feast_settings, redis_server, storage)
    apply_definitions(store, feast_settings, storage.offline_dir)
    await create_input_topics(kafka)
    env = worker_env(kafka, redis_server, storage, feast_settings, localinfra.free_port())
    worker = FeaturesWorker(env, tmp_path / "features.log")
    reference = Reference()
    try:
        for number, phase in enumerate(phased_stream(seed=7)):
            await publish(kafka, [*phase, GARBAGE] if number == 0 else phase)
            reference.feed(phase)
            wait_until_online_matches(store, feast_settings, reference, f"phase {number}")

        assert reference.late_user_events >= 4  # one placed per day (and some early-label ones)
        assert (
            worker.metric("mlops_features_late_events_dropped_total", view="user_activity")
            == reference.late_user_events
        )
        assert worker.metric("mlops_features_events_total", stream="labels", outcome="held") == 4
        assert (
            worker.metric(
                "mlops_features_events_total", stream="merchant_labels", outcome="outside_window"
            )
            == 1
        )
        assert worker.metric("mlops_features_freshness_seconds_count", view="user_activity") > 0
        letters = await read_dead_letters(kafka, 1)
        assert [(d.reason_code, d.original_value, d.original_key) for d in letters] == [
            ("malformed_protobuf", GARBAGE[1], GARBAGE[0])
        ]
    finally:
        exit_code = worker.stop()  # graceful: the offline log is flushed
    assert exit_code == 0, worker.process.tail()

    # the offline log holds every row the online store got, in the order it got them
    for view, key, names, rows in (
        ("user_activity", "user_id", USER_FEATURES, reference.user_rows),
        ("merchant_activity", "merchant_id", MERCHANT_FEATURES, reference.merchant_rows),
    ):
        table = feature_log(storage, view)
        assert table.schema.field("event_timestamp").type == pa.timestamp("us", tz="UTC")
        assert table.schema.field("created_timestamp").type == pa.timestamp("us", tz="UTC")
        logged: dict[str, list[tuple[int, dict[str, object]]]] = {}
        for record in table.sort_by("created_timestamp").to_pylist():
            stamp = int(record["event_timestamp"].timestamp() * 1_000_000)
            logged.setdefault(record[key], []).append(
                (stamp, {name: record[name] for name in names})
            )
            assert record["event_date"] == record["event_timestamp"].date().isoformat()
        assert logged == rows, view


@pytest.mark.parametrize("seed", [7])
def test_the_reference_stream_covers_its_cases(seed: int) -> None:
    """Guards the test above against a stream that silently stopped exercising a case."""
    reference = Reference()
    for phase in phased_stream(seed):
        reference.feed(phase)
    assert reference.late_user_events >= 4
    assert any(len({c for c, _ in rows}) < len(rows) for rows in reference.user_rows.values())
    rates = {
        f["merchant_fraud_rate_7d"] for rows in reference.merchant_rows.values() for _, f in rows
    }
    assert rates - {0.0, 1.0}, "some merchant rows have a fraud rate strictly between 0 and 1"
    assert all(isinstance(t, Txn) for t in phased_stream(seed)[0])
