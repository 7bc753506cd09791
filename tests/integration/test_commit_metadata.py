"""The metadata of an offset commit comes back with the offset, on the real (Tansu) broker.

Monitoring keeps where its counting of predictions.log stopped in its commits' metadata. Apache
Kafka stores it; Tansu 0.6 drops it, so ``broker_compat`` keeps it beside the broker and puts it
back only on the very offset it was committed with.
"""

from __future__ import annotations

from pathlib import Path

from aiokafka import TopicPartition

from services.shared.kafka import committed_offsets, create_consumer, ensure_topics
from services.shared.settings import KafkaSettings
from services.shared.topics import Topics


async def test_commit_metadata_comes_back_with_its_own_offset_only(
    kafka: KafkaSettings, tmp_path: Path
) -> None:
    settings = kafka.model_copy(update={"compat_dir": tmp_path / "compat"})
    topic = Topics.from_settings(settings).predictions
    await ensure_topics(settings, [topic], timeout_s=30)
    group = "test-commit-metadata"
    tp = TopicPartition(topic, 0)
    consumer = create_consumer(settings, topic, group_id=group, client_id="test-metadata")
    await consumer.start()
    try:
        await consumer.getmany(timeout_ms=1000)  # joins the group: partitions assigned
        assert tp in consumer.assignment()

        await consumer.commit({tp: (0, "counted=5")})
        assert (await committed_offsets(settings, group, [tp]))[tp] == (0, "counted=5")

        # a later commit without metadata: the kept metadata belonged to another offset
        await consumer.commit({tp: (1, "")})
        assert (await committed_offsets(settings, group, [tp]))[tp] == (1, "")

        await consumer.commit({tp: (1, "counted=9")})
        assert (await committed_offsets(settings, group, [tp]))[tp] == (1, "counted=9")
    finally:
        await consumer.stop()
    # another group on the same broker has none of it
    assert await committed_offsets(settings, "another-group", [tp]) == {}
