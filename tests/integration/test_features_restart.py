"""kill -9 of the features worker mid-stream, then a restart: nothing lost, nothing twice.

Two partitions; transactions and labels flow while the worker is killed (SIGKILL, no chance
to flush or commit) and a new worker takes over from the changelogs and committed offsets.
At the end, what Feast serves online equals the independent reference for every user and
merchant, the offline log holds exactly the reference's user rows (redelivered events
re-emit rows equal to the originals, never a row that counted something twice), and the
restarted worker did see redelivered events.
"""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import pyarrow.dataset as ds
from features_harness import (
    HOUR_US,
    T0,
    US,
    Event,
    FeaturesWorker,
    Label,
    Reference,
    Txn,
    create_input_topics,
    publish,
    wait_until_online_matches,
    worker_env,
)

from services.cli import localinfra
from services.shared.featurestore import apply_definitions, open_store
from services.shared.settings import FeastSettings, KafkaSettings, RedisSettings, StorageSettings
from services.shared.usecase.features import USER_FEATURES


def busy_stream(seed: int, transactions: int = 2000) -> list[Event]:
    """Transactions one event-second apart (33 minutes in all: less than the lateness, so no
    merchant ever sees a late event whatever the partitions' interleaving), a few out of
    order, a few too late for their user (each to a merchant of its own), labels ~100 events
    after their transaction and a few before it."""
    rng = random.Random(seed)
    events: list[Event] = []
    pending_labels: list[tuple[int, Label]] = []
    for i in range(transactions):
        t = T0 + i * US
        user = rng.randint(1, 40)
        if i > 500 and i % 300 == 0:
            txn = Txn(f"k{i}", f"u{user}", f"m-late-{i}", 5.0, "DE", t - 2 * HOUR_US)
        else:
            jitter = rng.choice([0, 0, 0, 0, rng.randint(1, 600)]) * US
            txn = Txn(
                f"k{i}",
                f"u{user}",
                f"m{rng.randint(1, 15)}",
                round(rng.uniform(1, 500), 2),
                rng.choice(["DE", "FR", "NL"]),
                t - jitter,
            )
        label = Label(txn.transaction_id, rng.random() < 0.2, t + 60 * US)
        if rng.random() < 0.02:
            events.append(label)  # before its transaction
        elif rng.random() < 0.5:
            pending_labels.append((i + 100, label))
        events.append(txn)
        while pending_labels and pending_labels[0][0] <= i:
            events.append(pending_labels.pop(0)[1])
    events.extend(label for _, label in pending_labels)
    return events


async def test_kill_9_mid_stream_then_restart_loses_nothing_and_counts_nothing_twice(
    kafka: KafkaSettings,
    redis_server: RedisSettings,
    storage: StorageSettings,
    feast_settings: FeastSettings,
    tmp_path: Path,
) -> None:
    assert kafka.partitions == 2
    store = open_store(feast_settings, redis_server, storage)
    apply_definitions(store, feast_settings, storage.offline_dir)
    await create_input_topics(kafka)
    events = busy_stream(seed=3)
    reference = Reference()
    reference.feed(events)  # per user, processing order is publish order (one partition each)

    def env() -> dict[str, str]:
        return worker_env(kafka, redis_server, storage, feast_settings, localinfra.free_port())

    transactions = sum(isinstance(e, Txn) for e in events)
    first = FeaturesWorker(env(), tmp_path / "features-1.log")
    publisher = asyncio.create_task(publish(kafka, events, chunk=50, pause_s=0.05))
    try:
        processed = 0.0
        while processed < 600:
            processed = first.metric("mlops_features_events_total", stream="transactions")
            await asyncio.sleep(0.05)
        first.kill()  # mid-stream: rows pushed, offsets not yet committed
        assert processed < transactions, "the worker should be killed before the end"
    except BaseException:
        publisher.cancel()
        raise
    finally:
        first.kill()
    second = FeaturesWorker(env(), tmp_path / "features-2.log")
    try:
        await publisher
        wait_until_online_matches(store, feast_settings, reference, "after restart", 120)
        redelivered = second.metric(
            "mlops_features_events_total", stream="transactions", outcome="duplicate"
        )
        assert redelivered > 0, "the kill should have left processed, uncommitted events"
    finally:
        exit_code = second.stop()
    assert exit_code == 0, second.process.tail()

    # every user row the reference has, and no other: re-emitted rows equal the originals
    table = ds.dataset(
        storage.offline_dir / "features" / "user_activity", format="parquet", partitioning="hive"
    ).to_table()
    logged = {
        (
            r["user_id"],
            int(r["event_timestamp"].timestamp() * 1_000_000),
            tuple(r[name] for name in USER_FEATURES),
        )
        for r in table.to_pylist()
    }
    expected = {
        (user, clock, tuple(features[name] for name in USER_FEATURES))
        for user, rows in reference.user_rows.items()
        for clock, features in rows
    }
    assert logged == expected
    assert table.num_rows >= sum(len(rows) for rows in reference.user_rows.values())
