"""The features worker's faust consumer forgets a partition's offsets when its topic started
over (a restart of the in-memory local broker; services/features/consumer.py)."""

from __future__ import annotations

from collections.abc import Iterator

import faust
import pytest
from aiokafka import TopicPartition
from faust.types import TP
from faust.types.tuples import Message

from services.features.consumer import FeaturesConsumer, FeaturesTransport

TOPIC = "events.validated"


@pytest.fixture
def consumer() -> Iterator[FeaturesConsumer]:
    """The worker's consumer, never started (no broker is contacted)."""
    app = faust.App("t-forget", broker="kafka://127.0.0.1:1", store="memory://")
    app.transport = FeaturesTransport(app.conf.broker_consumer, app)
    app.topics._acking_topics.add(TOPIC)  # as an agent reading the topic would
    consumer = app.consumer
    assert isinstance(consumer, FeaturesConsumer)
    yield consumer
    consumer._thread.thread_loop.close()  # type: ignore[attr-defined]
    app.loop.close()


def _message(offset: int) -> Message:
    return Message(TOPIC, 0, offset, 0.0, 0, [], b"k", b"v", None)


def test_records_of_a_topic_that_started_over_are_acknowledged_and_committed(
    consumer: FeaturesConsumer,
) -> None:
    tp = TP(TOPIC, 0)
    # the old topic: read and committed up to 10811, a gap remembered past it
    consumer._read_offset[tp] = 10_811
    consumer._committed_offset[tp] = 10_811
    consumer._acked[tp] = [10_812]
    consumer._acked_index[tp] = {10_812}
    assert not consumer.ack(_message(5))  # below the old commit: taken as already committed

    consumer.forget_partition(TopicPartition(TOPIC, 0))
    assert consumer._read_offset[tp] is None  # the new topic's records are delivered
    for offset in range(3):
        assert consumer.ack(_message(offset))
    assert consumer._new_offset(tp) == 3
    assert consumer._should_commit(tp, 3)


def test_other_partitions_keep_their_offsets(consumer: FeaturesConsumer) -> None:
    kept = TP(TOPIC, 1)
    consumer._read_offset[kept] = 40
    consumer._committed_offset[kept] = 41
    consumer.forget_partition(TopicPartition(TOPIC, 0))
    assert (consumer._read_offset[kept], consumer._committed_offset[kept]) == (40, 41)
