"""Client-side workarounds for the local Tansu broker; never active against Apache Kafka.

Switched on only by ``MLOPS_KAFKA_BROKER_FLAVOR=tansu`` (the local stack and the test
fixtures set it). Everything the platform does differently for Tansu is in this module.

- ListOffsets(latest) on Tansu 0.6 answers the base offset of the last record batch + 1, not
  the log end offset. aiokafka's ``end_offsets`` (used for lag figures and by faust to know
  when a table's changelog is fully recovered) would stop short. Fetch responses carry the
  correct high watermark, so ``end_offsets`` is patched to ask a tiny fetch for it.
- Tansu 0.6 does not answer a long-polling fetch when data arrives: it holds it for the full
  ``fetch_max_wait_ms`` (aiokafka's default 500 ms; faust hard-codes 1500 ms), so every
  consumer hop added up to that much latency (measured: faust hop p50 410 ms, two hops
  970 ms; with a 20 ms cap 8 ms and 16 ms). The fetcher's wait is capped at
  ``TANSU_FETCH_MAX_WAIT_MS`` for every consumer created after ``activate``; an idle consumer
  then polls 50 times a second, which the local broker takes easily.
"""

from __future__ import annotations

import collections
from typing import Any

from aiokafka.consumer.fetcher import Fetcher
from aiokafka.protocol.fetch import FetchRequest
from aiokafka.structs import TopicPartition

from services.shared.logging import get_logger
from services.shared.settings import KafkaSettings

log = get_logger("broker_compat")
_original_end_offsets = Fetcher.end_offsets
_original_fetcher_init = Fetcher.__init__
TANSU_FETCH_MAX_WAIT_MS = 20


async def _end_offsets_from_high_watermark(
    self: Fetcher, partitions: list[TopicPartition], timeout_ms: int
) -> dict[TopicPartition, int]:
    listed: dict[TopicPartition, int] = await _original_end_offsets(self, partitions, timeout_ms)
    by_node: dict[int, dict[str, list[tuple[int, int, int]]]] = collections.defaultdict(
        lambda: collections.defaultdict(list)
    )
    for tp, offset in listed.items():
        node_id = self._client.cluster.leader_for_partition(tp)
        # the last batch's base offset is always a valid fetch position
        by_node[node_id][tp.topic].append((tp.partition, max(offset - 1, 0), 1024 * 1024))
    result = dict(listed)
    for node_id, topics in by_node.items():
        # Tansu answers an empty fetch (min_bytes=0) with no partitions at all
        request = FetchRequest(100, 1, 1024 * 1024, 0, list(topics.items()))
        response: Any = await self._client.send(node_id, request)
        for topic, partition_data in response.topics:
            for partition, error_code, high_watermark, *_ in partition_data:
                if error_code == 0:
                    result[TopicPartition(topic, partition)] = high_watermark
    return result


def _fetcher_init_with_short_wait(self: Fetcher, *args: Any, **kwargs: Any) -> None:
    wait = kwargs.get("fetch_max_wait_ms", TANSU_FETCH_MAX_WAIT_MS)
    kwargs["fetch_max_wait_ms"] = min(wait, TANSU_FETCH_MAX_WAIT_MS)
    _original_fetcher_init(self, *args, **kwargs)


def activate(settings: KafkaSettings) -> None:
    """Apply the workarounds if (and only if) the configured broker is Tansu."""
    if settings.broker_flavor != "tansu" or Fetcher.end_offsets is _end_offsets_from_high_watermark:
        return
    Fetcher.end_offsets = _end_offsets_from_high_watermark  # type: ignore[method-assign,unused-ignore]
    Fetcher.__init__ = _fetcher_init_with_short_wait  # type: ignore[method-assign,unused-ignore]
    log.info(
        "tansu_workarounds_active",
        patched="aiokafka.Fetcher.end_offsets,aiokafka.Fetcher.__init__(fetch_max_wait_ms)",
    )
