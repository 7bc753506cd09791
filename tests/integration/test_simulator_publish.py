"""The traffic simulator's Kafka transport (services/cli/simulate.py) against a real broker:
records arrive as a product service would send them, and `mlops simulate` works as a command."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections import Counter, defaultdict
from datetime import UTC, datetime, timedelta

from aiokafka import TopicPartition
from aiokafka.structs import ConsumerRecord

from services.cli.simulate import publish, record_value
from services.cli.simulator import SimulationConfig, TrafficSimulator
from services.shared.kafka import create_consumer, ensure_topics
from services.shared.settings import KafkaSettings
from services.shared.topics import Topics


async def _read(kafka: KafkaSettings, topic: str) -> list[ConsumerRecord[bytes, bytes]]:
    consumer = create_consumer(kafka, group_id=None, client_id="test-reader")
    await consumer.start()
    try:
        await consumer.topics()  # metadata: whatever partitions the topic has
        tps = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or ())]
        ends = await consumer.end_offsets(tps)
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        records: list[ConsumerRecord[bytes, bytes]] = []
        while len(records) < sum(ends.values()):
            for batch in (await consumer.getmany(timeout_ms=500)).values():
                records.extend(batch)
        return records
    finally:
        await consumer.stop()


async def test_published_traffic_is_keyed_json_as_product_services_send_it(
    kafka: KafkaSettings,
) -> None:
    await ensure_topics(kafka)
    topics = Topics.from_settings(kafka)
    config = SimulationConfig(
        seed=1, users=200, merchants=20, invalid_fraction=0.1, duplicate_fraction=0.1
    )
    end = datetime(2025, 3, 10, tzinfo=UTC)  # a fixed window: the same events every run
    events = list(TrafficSimulator(config).history(end - timedelta(hours=6), end))
    progress: list[int] = []
    stats = await publish(events, kafka, rate=None, progress=lambda s: progress.append(s.records))

    transactions = await _read(kafka, topics.transactions)
    labels = await _read(kafka, topics.labels)
    assert stats.transactions == len(transactions) == sum(e.kind == "transaction" for e in events)
    assert stats.labels == len(labels) == sum(e.kind == "label" for e in events)
    assert stats.invalid == sum(e.expect == "invalid" for e in events) > 0
    assert stats.duplicates == sum(e.expect == "duplicate" for e in events) > 0
    assert progress[-1] == stats.records
    # every record is there, byte for byte, under its key
    sent = Counter((e.key.encode(), record_value(e)) for e in events if e.kind == "transaction")
    assert Counter((r.key, r.value) for r in transactions) == sent
    for record in labels:
        label = json.loads(record.value)
        assert record.key == label["transaction_id"].encode()
        assert set(label) == {"transaction_id", "is_fraud", "event_time"}
    # one user's transactions stay in one partition, in order
    partitions: dict[bytes | None, set[int]] = defaultdict(set)
    for record in transactions:
        partitions[record.key].add(record.partition)
    assert all(len(p) == 1 for p in partitions.values())
    assert all(not r.headers for r in transactions)  # JSON is the default: no content-type


def test_the_mlops_simulate_command_publishes_live_traffic(kafka: KafkaSettings) -> None:
    topics = Topics.from_settings(kafka)
    env = {
        **os.environ,
        "MLOPS_KAFKA_BOOTSTRAP": kafka.bootstrap,
        "MLOPS_KAFKA_TOPIC_PREFIX": kafka.topic_prefix,
        "MLOPS_KAFKA_PARTITIONS": "3",
    }
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "services.cli.main",
            "simulate",
            "--count",
            "60",
            "--rate",
            "200",
            "--label-delay",
            "0.5",
            "--seed",
            "5",
            "--invalid-fraction",
            "0.1",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "published 60 transactions" in result.stderr
    transactions = asyncio.run(_read(kafka, topics.transactions))
    labels = asyncio.run(_read(kafka, topics.labels))
    assert len(transactions) == 60
    assert {r.partition for r in transactions} == {0, 1, 2}  # created as configured
    invalid = 60 - len(labels)  # every valid transaction got its label
    assert 0 < invalid < 20
    assert f"{invalid} invalid" in result.stderr
