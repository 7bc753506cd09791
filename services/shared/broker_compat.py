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
  970 ms; with a 20 ms wait 8 ms and 16 ms). A fixed 20 ms wait made every idle consumer
  poll 50 times a second: an idle local stack spent 0.4 of a core in the broker alone. So
  the wait adapts, per consumer: ``TANSU_FETCH_MIN_WAIT_MS`` after a fetch that brought
  records (under load a hop stays short), doubled after each empty one up to
  ``TANSU_FETCH_IDLE_WAIT_MS`` (an idle consumer polls once a second, whatever its own
  ``fetch_max_wait_ms``: with 500 ms the idle stack's broker used 0.037-0.040 cores, with
  1,000 ms 0.028-0.030, the whole idle stack 0.100-0.109 vs 0.089-0.096, A/B on one stack).
  The first record after an idle spell (1.3 s without records) waits at most that long per
  hop; the ones behind it do not, and a steady trickle keeps the wait at the minimum.
  A consumer that asks for fuller fetches (``fetch_min_bytes`` > 1: monitoring, through
  ``kafka.create_consumer(batching_wait_ms=...)``) waits its whole ``fetch_max_wait_ms`` (at
  most ``TANSU_FETCH_BATCHING_WAIT_MS``) every time: Tansu ignores min bytes, and with the
  20 ms wait monitoring's reading of predictions.log cost the broker 0.36 of a core at
  800 Predict/s.
- Tansu 0.6 answers a fetch from beyond a partition's end with no records and no
  OFFSET_OUT_OF_RANGE (Kafka's answer, on which the client resets the position per
  ``auto_offset_reset``). After a restart of the in-memory broker every topic starts again at
  offset 0, so every consumer whose position was further waited at it for ever (ingestion's
  validator, serving's routing follower: measured by loadtests/chaos.py), and would then have
  skipped everything before it. A fetch answered with a high watermark below the position is
  therefore treated as out of range: the position is reset as Kafka would have it, and the
  listeners registered with ``on_position_reset`` are told (in the consumer's thread, before
  the next fetch): a client that keeps its own bookkeeping of offsets (faust: read offsets,
  acknowledgements, the last commit) must forget the old topic's, or it takes the new
  topic's records, whose offsets are lower, for ones it has already seen.
- Tansu 0.6 acknowledges a produce request for a topic it does not have (a client that kept
  the topic's metadata from before a restart of the broker) and keeps its records where the
  re-created topic's first offsets will be; they are never served, and the topic's first
  writes after it is re-created fail with UnknownError (``AlreadyExists`` in Tansu's log) until
  its offsets pass them. Measured with one producer at 500 records/s across a restart, the
  topic re-created 4 s later: 1,178 acknowledged records lost and 620 sends failed. Nothing a
  client can do about the records sent before it learns of the restart; what shortens the
  window is re-creating the topics sooner (``kafka.keep_topics`` checks as soon as its
  connection drops, and every 0.25 s until the broker answers). The failed writes are a
  different matter: aiokafka treats UnknownError as final and fails the send, and a service
  whose send fails must stop before acknowledging its input (the features service crashed on
  it right after rewriting its tables' state into the re-created changelogs, and came back
  with part of that state: seen in CI, 2026-12-07). So a produce answered with UnknownError
  is retried like a retriable error (``SendProduceReqHandler._can_retry`` patched), within
  the producer's delivery timeout as any retry; each retried batch is counted
  (``mlops_kafka_tansu_produce_retries_total``) and logged.
- Tansu 0.6 keeps a committed offset but drops the metadata committed with it (Kafka keeps
  both; monitoring writes where its counting stopped there). Commits that carry metadata are
  therefore also written to a file per broker address and group under
  ``KafkaSettings.compat_dir`` (``GroupCoordinator.commit_offsets`` patched), and
  ``kept_metadata`` puts the metadata back on what the broker answers, only where the broker's
  committed offset is the one committed with it (a restarted broker, which lost its offsets,
  or another broker on the same port gets none).
"""

from __future__ import annotations

import collections
import json
import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from aiokafka.conn import collect_hosts
from aiokafka.consumer.fetcher import Fetcher, OffsetResetStrategy
from aiokafka.consumer.group_coordinator import GroupCoordinator
from aiokafka.errors import UnknownError
from aiokafka.producer.sender import SendProduceReqHandler
from aiokafka.protocol.fetch import FetchRequest
from aiokafka.structs import TopicPartition
from prometheus_client import Counter

from services.shared.logging import get_logger
from services.shared.settings import KafkaSettings

log = get_logger("broker_compat")
_original_end_offsets = Fetcher.end_offsets
_original_fetcher_init = Fetcher.__init__
_original_proc_fetch_request = Fetcher._proc_fetch_request
_original_commit_offsets = GroupCoordinator.commit_offsets
_original_can_retry = SendProduceReqHandler._can_retry
_metadata_dirs: list[Path] = []  # the one set by ``activate``
_reset_listeners: list[Callable[[TopicPartition], None]] = []
TANSU_FETCH_MIN_WAIT_MS = 20
TANSU_FETCH_IDLE_WAIT_MS = 1000
TANSU_FETCH_BATCHING_WAIT_MS = 1000
PRODUCE_RETRIES = Counter(
    "mlops_kafka_tansu_produce_retries_total",
    "Record batches the local Tansu broker refused with UnknownError, retried (broker_compat)",
)


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


def _fetcher_init_with_adaptive_wait(self: Fetcher, *args: Any, **kwargs: Any) -> None:
    wanted = kwargs.get("fetch_max_wait_ms", 500)
    if kwargs.get("fetch_min_bytes", 1) > 1:  # batching: always the whole wait
        floor = ceiling = min(wanted, TANSU_FETCH_BATCHING_WAIT_MS)
    else:
        floor, ceiling = TANSU_FETCH_MIN_WAIT_MS, TANSU_FETCH_IDLE_WAIT_MS
    kwargs["fetch_max_wait_ms"] = floor
    _original_fetcher_init(self, *args, **kwargs)
    self._tansu_busy_wait_ms = floor
    self._tansu_idle_wait_ms = max(ceiling, floor)


async def _proc_fetch_request_adapting_wait(
    self: Fetcher, assignment: Any, node_id: int, request: Any
) -> bool:
    """The next fetch's wait: short after records, doubled (up to the idle wait) after none;
    a position past the partition's end is out of range (reset, as Kafka would answer)."""
    woke: bool = await _original_proc_fetch_request(self, assignment, node_id, request)
    if not woke and assignment.active:
        _reset_positions_past_the_end(self, assignment, request)
    if woke:
        self._fetch_max_wait_ms = self._tansu_busy_wait_ms
    else:
        self._fetch_max_wait_ms = min(self._fetch_max_wait_ms * 2, self._tansu_idle_wait_ms)
    return woke


def _reset_positions_past_the_end(self: Fetcher, assignment: Any, request: Any) -> None:
    for topic, partitions in request.topics:
        for partition, offset, *_ in partitions:
            tp = TopicPartition(topic, partition)
            state = assignment.state_value(tp)
            if (
                state is None
                or not state.has_valid_position
                or state.position != offset
                or state.highwater is None
                or offset <= state.highwater
            ):
                continue
            if self._default_reset_strategy == OffsetResetStrategy.NONE:
                continue  # the caller wants to decide: nothing to reset to
            log.warning(
                "tansu_offset_out_of_range",
                topic=topic,
                partition=partition,
                position=offset,
                high_watermark=state.highwater,
                note="the topic was re-created (a broker restart): position reset",
            )
            state.await_reset(self._default_reset_strategy)
            for listener in _reset_listeners:
                listener(tp)


def on_position_reset(listener: Callable[[TopicPartition], None]) -> Callable[[], None]:
    """Call ``listener(partition)`` whenever a position past a re-created partition's end is
    reset (module docstring); it runs in the consumer's thread, before the next fetch.
    Returns what removes the listener again."""
    _reset_listeners.append(listener)
    return lambda: _reset_listeners.remove(listener)


def _metadata_file(hosts: list[tuple[str, int, Any]], group_id: str) -> Path | None:
    if not _metadata_dirs:
        return None
    broker = ",".join(sorted(f"{host}:{port}" for host, port, _ in hosts))
    return _metadata_dirs[0] / re.sub(r"[^A-Za-z0-9_.-]", "_", f"{broker}-{group_id}.json")


def _read_kept(path: Path) -> dict[str, list[Any]]:
    try:
        kept: dict[str, list[Any]] = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return kept


async def _commit_offsets_keeping_metadata(
    self: GroupCoordinator, assignment: Any, offsets: Mapping[TopicPartition, Any]
) -> None:
    await _original_commit_offsets(self, assignment, offsets)
    with_metadata = {tp: om for tp, om in offsets.items() if om.metadata}
    path = _metadata_file(self._client.hosts, self.group_id)
    if not with_metadata or path is None:
        return
    kept = _read_kept(path)
    kept.update(
        {f"{tp.topic}:{tp.partition}": [om.offset, om.metadata] for tp, om in with_metadata.items()}
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(f".{os.getpid()}.tmp")
    temporary.write_text(json.dumps(kept))
    temporary.replace(path)


def kept_metadata(
    settings: KafkaSettings, group_id: str, committed: dict[TopicPartition, tuple[int, str]]
) -> dict[TopicPartition, tuple[int, str]]:
    """``committed`` (offset, metadata) as the broker answered it, with the metadata Tansu
    dropped put back (unchanged against Apache Kafka)."""
    if settings.broker_flavor != "tansu":
        return committed
    path = _metadata_file(collect_hosts(settings.bootstrap), group_id)
    kept = _read_kept(path) if path is not None else {}
    out = dict(committed)
    for tp, (offset, metadata) in committed.items():
        entry = kept.get(f"{tp.topic}:{tp.partition}")
        if not metadata and entry is not None and entry[0] == offset:
            out[tp] = (offset, str(entry[1]))
    return out


def activate(settings: KafkaSettings) -> None:
    """Apply the workarounds if (and only if) the configured broker is Tansu."""
    if settings.broker_flavor != "tansu" or Fetcher.end_offsets is _end_offsets_from_high_watermark:
        return
    _metadata_dirs[:] = [settings.compat_dir]
    GroupCoordinator.commit_offsets = _commit_offsets_keeping_metadata  # type: ignore[method-assign,unused-ignore]
    Fetcher.end_offsets = _end_offsets_from_high_watermark  # type: ignore[method-assign,unused-ignore]
    Fetcher.__init__ = _fetcher_init_with_adaptive_wait  # type: ignore[method-assign,unused-ignore]
    Fetcher._proc_fetch_request = _proc_fetch_request_adapting_wait  # type: ignore[method-assign,unused-ignore]
    SendProduceReqHandler._can_retry = _can_retry_unknown_error  # type: ignore[method-assign,unused-ignore]
    log.info(
        "tansu_workarounds_active",
        patched="aiokafka.Fetcher.end_offsets,aiokafka.Fetcher.__init__/_proc_fetch_request"
        "(adaptive fetch_max_wait_ms),aiokafka.GroupCoordinator.commit_offsets (metadata kept "
        "in a file),aiokafka.SendProduceReqHandler._can_retry (UnknownError retried)",
        fetch_wait_ms=f"{TANSU_FETCH_MIN_WAIT_MS}-{TANSU_FETCH_IDLE_WAIT_MS}",
    )


def _can_retry_unknown_error(self: SendProduceReqHandler, error: Any, batch: Any) -> bool:
    """A produce refused with UnknownError (Tansu's answer to a write at offsets it holds lost
    records at: module docstring) is retried, until the batch expires like any retry."""
    if isinstance(error, UnknownError) and not batch.expired():
        PRODUCE_RETRIES.inc()
        log.warning(
            "tansu_produce_retried",
            topic=batch.tp.topic,
            partition=batch.tp.partition,
            note="UnknownError after a restart of the local broker: the batch is sent again",
        )
        return True
    return bool(_original_can_retry(self, error, batch))
