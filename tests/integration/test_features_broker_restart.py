"""A restart of the local in-memory broker under the features worker: it goes on by itself.

The broker (a Tansu of this test's own) loses every topic, record and committed offset; the
re-created input topics start again at offset 0. The worker must read them from there (faust
would take their records for ones it had already seen: their offsets are below its read
offsets), keep the state it had (its windows), and write that state to the new changelogs,
so that a later restart of the worker recovers all of it, not only what came after the
broker's restart; a second broker restart soon after the first is a loss of its own (the
chaos run of 2026-12-07 22:08 lost the state of a worker that took it for the first one's).
Checked against the independent reference at each step.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from pathlib import Path

from aiokafka import TopicPartition
from features_harness import (
    FeaturesWorker,
    Reference,
    create_input_topics,
    publish,
    wait_for,
    wait_until_online_matches,
    worker_env,
)
from test_features_restart import busy_stream

from services.cli import localinfra
from services.features.settings import FeaturesSettings
from services.shared.featurestore import apply_definitions, open_store
from services.shared.kafka import consumer_group_lag
from services.shared.settings import FeastSettings, KafkaSettings, RedisSettings, StorageSettings
from services.shared.topics import Topics


async def wait_no_lag(kafka: KafkaSettings, timeout_s: float) -> None:
    """Until the worker's group has committed everything on the validated topics."""
    topics = Topics.from_settings(kafka)
    group = FeaturesSettings(kafka=kafka).group_id
    deadline = time.monotonic() + timeout_s
    lag: dict[TopicPartition, int] = {}
    while time.monotonic() < deadline:
        lag = await consumer_group_lag(kafka, group, [topics.validated, topics.validated_labels])
        if not any(lag.values()):
            return
        await asyncio.sleep(0.5)
    raise AssertionError(f"the features group kept a lag for {timeout_s:.0f}s: {lag}")


async def test_a_broker_restart_loses_no_feature_state(
    redis_server: RedisSettings,
    storage: StorageSettings,
    feast_settings: FeastSettings,
    tmp_path: Path,
) -> None:
    port = localinfra.free_port()
    brokers = [localinfra.RunningProcess(localinfra.tansu(port), tmp_path / "tansu-1.log")]
    kafka = KafkaSettings(
        bootstrap=f"127.0.0.1:{port}",
        broker_flavor="tansu",
        partitions=2,
        session_timeout_ms=6000,
        topic_prefix=f"t{uuid.uuid4().hex[:10]}.",
        compat_dir=tmp_path / "broker_compat",
    )
    store = open_store(feast_settings, redis_server, storage)
    apply_definitions(store, feast_settings, storage.offline_dir)
    events = busy_stream(seed=5, transactions=900)
    n = len(events)
    before, after, later = events[: n // 2], events[n // 2 : 5 * n // 6], events[5 * n // 6 :]
    reference = Reference()

    def env() -> dict[str, str]:
        return worker_env(kafka, redis_server, storage, feast_settings, localinfra.free_port())

    try:
        worker = FeaturesWorker(env(), tmp_path / "features-1.log")
        try:
            await create_input_topics(kafka)
            await publish(kafka, before)
            reference.feed(before)
            wait_until_online_matches(store, feast_settings, reference, "before the restart", 90)
            assert worker.metric("mlops_features_changelog_rewrites_total") == 0  # no loss yet

            def restart_the_broker(restart: int) -> None:
                recreated = worker.metric("mlops_kafka_topics_recreated_total")
                brokers[-1].stop()  # everything the broker held is gone
                brokers.append(
                    localinfra.RunningProcess(
                        localinfra.tansu(port), tmp_path / f"tansu-{restart + 1}.log"
                    )
                )
                # the worker re-creates its own topics (as soon as its topic check's connection
                # drops) with the configured partitions; a record sent to one before would make
                # the broker create it with its own default
                wait_for(
                    lambda: worker.metric("mlops_kafka_topics_recreated_total") > recreated,
                    60,
                    f"the worker to re-create its internal topics (restart {restart})",
                )

            restart_the_broker(1)
            await create_input_topics(kafka)  # as ingestion does when it finds them missing
            await publish(kafka, after)  # at offsets below the worker's read offsets
            reference.feed(after)
            wait_until_online_matches(store, feast_settings, reference, "after the restart", 90)
            await wait_no_lag(kafka, 60)  # and it commits them: the group is not stuck
            assert worker.metric("mlops_features_changelog_rewrites_total") == 1

            # a second restart within a minute of the first rewrite is a loss of its own: the
            # whole state goes into the new changelogs again (the new worker below needs it).
            # Nothing is published between the two: a burst into a re-created topic above the
            # worker's old read position is not detected as a new topic (RELIABILITY.md)
            restart_the_broker(2)
            await create_input_topics(kafka)
            wait_for(
                lambda: worker.metric("mlops_features_changelog_rewrites_total") >= 2,
                30,
                "the worker to rewrite its tables into the new changelogs",
            )
            assert "partition_offsets_forgotten" in worker.process.log_path.read_text()
        finally:
            exit_code = worker.stop()  # graceful: what it sent is acknowledged
        assert exit_code == 0, worker.process.tail()

        # a new worker rebuilds its state from the changelogs alone: the windows of before
        # the broker's restart are in them again
        second = FeaturesWorker(env(), tmp_path / "features-2.log")
        try:
            await publish(kafka, later)
            reference.feed(later)
            wait_until_online_matches(
                store, feast_settings, reference, "after a worker restart", 90
            )
        finally:
            exit_code = second.stop()
        assert exit_code == 0, second.process.tail()
    finally:
        for broker in brokers:
            broker.stop()
