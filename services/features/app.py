"""The faust application of the features service: topics, tables, agents and timers.

Dataflow (every topic has the same number of partitions, so faust co-partitions them)::

    events.validated (key user_id) --> [user_activity agent] --> Feast user_activity rows
        |  re-key by transaction_id --> <app>.transaction-refs --+
        |  re-key by merchant_id ----> <app>.merchant-facts      |
    events.validated.labels (key transaction_id) ----------------+--> [label_join agent]
                                        <app>.merchant-facts <-- joined labels (key merchant_id)
    <app>.merchant-facts --> [merchant_activity agent] --> Feast merchant_activity rows

State lives in three faust tables used as fact logs (``FactTable``): each fact is one key,
written with the partition of the event that produced it, so the changelog is small per
update and safe under compaction; the agents' domain objects (windows.py, label_join.py) keep
the in-memory indexes and are rebuilt from the tables after every recovery. Recovery after a
restart replays the changelogs (on the local Tansu broker, ``broker_compat`` makes faust see
their true end offsets).

Delivery: at-least-once with idempotent state. Forwarded facts and changelog writes are
flushed by faust before it commits input offsets; the two row-producing agents acknowledge
their events only after ``FeatureSink`` has written the rows online and offline.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable, Hashable, Iterable, Mapping
from functools import partial
from pathlib import Path
from typing import Any, cast

import faust
from faust.streams import Stream
from faust.types import TP, EventT, StreamT, TopicT

from services.features import metrics
from services.features.events import (
    MerchantFact,
    TransactionRef,
    UndecodableEvent,
    decode_label,
    decode_transaction,
)
from services.features.label_join import TransactionLabelJoin
from services.features.settings import FeaturesSettings
from services.features.sink import FeatureSink
from services.features.windows import (
    MerchantActivity,
    Outcome,
    UserActivity,
    WindowPolicy,
)
from services.shared.logging import get_logger
from services.shared.proto.mlops.v1 import events_pb2
from services.shared.topics import Topics
from services.shared.usecase.features import MERCHANT_VIEW, USER_VIEW

log = get_logger("features.app")

Rebuild = Callable[[Iterable[tuple[Hashable, Any]], set[int]], None]


class FactTable(faust.Table):
    """A faust table written fact by fact with explicit partitions (a ``RecordLog``).

    faust's own ``table[key] = value`` takes the partition from the stream's current event,
    which in a batch (``take``) is not the event that produced the fact, and is unusable from
    a timer; facts carry their partition, so writes name it. The changelog records are
    produced by ``send_changelog_records`` at the end of each batch straight through the
    app's producer (faust's per-record ``send_soon`` path cost more than the rest of the
    processing); faust flushes that producer before it commits input offsets, as before.
    Records are JSON, exactly as faust's own json serializer writes them, so faust's
    recovery reads them back.
    """

    # mode names a service's logger after its module; faust's loggers are the quiet ones
    logger = logging.getLogger("faust.tables.fact_table")

    def __init__(self, *args: Any, rebuild: Rebuild | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._rebuild = rebuild
        self._unsent: list[tuple[int, bytes, bytes | None]] = []
        self.active_partitions: set[int] = set()

    def put(self, key: tuple[str, ...], value: list[Any], partition: int) -> None:
        self.data[key] = value
        self._unsent.append((partition, _json(key), _json(value)))

    def remove(self, key: tuple[str, ...], partition: int) -> None:
        self.data.pop(key, None)
        self._unsent.append((partition, _json(key), None))  # a tombstone

    async def send_changelog_records(self) -> None:
        unsent, self._unsent = self._unsent, []
        producer, topic = self.app.producer, self.changelog_topic_name
        for partition, key, value in unsent:
            await producer.send(topic, key, value, partition, None, None)

    async def on_recovery_completed(self, active_tps: set[TP], standby_tps: set[TP]) -> None:
        await super().on_recovery_completed(active_tps, standby_tps)
        self.active_partitions = {tp.partition for tp in active_tps}
        if self._rebuild is not None:
            started = time.perf_counter()
            self._rebuild(list(self.data.items()), self.active_partitions)
            log.info(
                "table_state_rebuilt",
                table=self.name,
                partitions=",".join(map(str, sorted(self.active_partitions))),
                records=len(self.data),
                seconds=round(time.perf_counter() - started, 3),
            )


def rewind_uncommitted_inputs(consumer: Any, input_topics: set[str]) -> None:
    """Make the consumer start input partitions that have no committed offset from the start.

    faust 0.15.3 keeps fetching while it restores tables and drops what it fetched for the
    input partitions, relying on the seek to the committed offsets that follows. aiokafka's
    ``seek_to_committed`` does not seek a partition with no committed offset (nor one
    committed at 0), so a worker that had not committed yet (a first start, or a restart
    before the first commit) silently skipped every record fetched during recovery (seen
    in the kill -9 test: ~500 events lost). After faust's seek, such partitions are
    rewound to their earliest offset; the state's dedup makes any re-read harmless.
    """
    seek_to_committed = consumer.seek_to_committed

    async def seek_to_committed_or_earliest() -> Mapping[TP, int]:
        committed: Mapping[TP, int] = await seek_to_committed()
        uncommitted = [
            tp for tp, offset in committed.items() if tp.topic in input_topics and not offset
        ]
        if uncommitted:
            earliest = await consumer.earliest_offsets(*uncommitted)
            for tp in uncommitted:
                await consumer.seek(tp, earliest[tp])
            log.info(
                "inputs_rewound",
                partitions=",".join(f"{tp.topic}:{tp.partition}" for tp in uncommitted),
            )
        return committed

    consumer.seek_to_committed = seek_to_committed_or_earliest


def faust_settings(settings: FeaturesSettings) -> dict[str, Any]:
    kafka = settings.kafka
    session_s = kafka.session_timeout_ms / 1000
    return {
        "broker": [f"kafka://{host.strip()}" for host in kafka.bootstrap.split(",")],
        "store": "memory://",
        "autodiscover": False,
        "datadir": str(settings.storage.data_dir / "faust" / settings.group_id),
        "web_enabled": settings.web_port > 0,
        "web_port": settings.web_port or 6066,
        "web_bind": settings.metrics_host,
        "web_host": settings.metrics_host,
        "topic_partitions": kafka.partitions,
        "topic_replication_factor": kafka.replication_factor,
        "broker_session_timeout": session_s,
        "broker_heartbeat_interval": max(session_s / 5, 0.5),
        # faust requires the request timeout to be at least the session timeout
        "broker_request_timeout": max(kafka.request_timeout_ms / 1000, session_s + 5),
        "broker_commit_interval": 1.0,
        "producer_acks": -1,
        "producer_linger_ms": 2,
        "consumer_auto_offset_reset": "earliest",
        "table_standby_replicas": settings.table_standby_replicas,
    }


class FeaturePipeline:
    """Builds the faust app and wires the domain objects and the sink into its agents."""

    def __init__(self, settings: FeaturesSettings, sink: FeatureSink) -> None:
        self.settings = settings
        self.sink = sink
        self.topics = Topics.from_settings(settings.kafka)
        partitions = settings.kafka.partitions
        options = faust_settings(settings)
        Path(options["datadir"]).parent.mkdir(parents=True, exist_ok=True)  # faust: no parents
        self.app = faust.App(settings.group_id, **options)
        app = self.app
        group = settings.group_id
        self.transaction_refs_topic = f"{group}.transaction-refs"
        self.merchant_facts_topic = f"{group}.merchant-facts"

        self.validated = self._raw_topic(self.topics.validated)
        self.merchant_facts = self._raw_topic(self.merchant_facts_topic, internal=partitions)
        self.join_input = self._raw_topic(self.transaction_refs_topic, self.topics.validated_labels)
        self.dead_letters = self._raw_topic(self.topics.dlq)

        policy = WindowPolicy(
            allowed_lateness_us=int(settings.allowed_lateness_s * 1e6),
            max_user_facts=settings.max_user_facts,
            max_merchant_facts=settings.max_merchant_facts,
        )
        self.user_facts = self._table("user-facts", partitions)
        self.merchant_fact_table = self._table("merchant-facts", partitions)
        self.join_table = self._table("label-join", partitions)
        self.users = UserActivity(self.user_facts, policy)
        self.merchants = MerchantActivity(self.merchant_fact_table, policy)
        self.join = TransactionLabelJoin(
            self.join_table,
            retention_us=int(settings.label_join_retention_s * 1e6),
            label_hold_us=int(settings.label_hold_s * 1e6),
            max_pending=settings.max_held_labels,
        )
        self.user_facts._rebuild = self.users.rebuild
        self.merchant_fact_table._rebuild = self.merchants.rebuild
        self.join_table._rebuild = self.join.rebuild

        app.agent(self.validated, name=f"{group}.user_activity")(self._user_activity)
        app.agent(self.join_input, name=f"{group}.label_join")(self._label_join)
        app.agent(self.merchant_facts, name=f"{group}.merchant_activity")(self._merchant_activity)
        rewind_uncommitted_inputs(
            app.consumer,
            {
                self.topics.validated,
                self.topics.validated_labels,
                self.transaction_refs_topic,
                self.merchant_facts_topic,
            },
        )
        app.timer(settings.offline_flush_interval_s / 2)(self._flush_offline)
        app.timer(settings.expiry_interval_s)(self._expire)

    def _raw_topic(self, *names: str, internal: int | None = None) -> TopicT:
        """A topic of bytes (we decode); ``internal`` = partitions of a topic of ours."""
        return self.app.topic(
            *names,
            key_serializer="raw",
            value_serializer="raw",
            internal=internal is not None,
            partitions=internal,
        )

    def _table(self, name: str, partitions: int) -> FactTable:
        table = FactTable(
            self.app,
            name=name,
            default=None,
            beacon=self.app.tables.beacon,
            partitions=partitions,  # keys and values go to the changelog as JSON (faust's default)
        )
        self.app.tables.add(table)
        return table

    # ----------------------------------------------------------------------------- agents

    async def _user_activity(self, stream: StreamT[Any]) -> None:
        settings = self.settings
        async for events in _unacked_batches(
            stream, settings.batch_max_events, settings.batch_within_ms / 1000
        ):
            rows = []
            for event in events:
                try:
                    txn = decode_transaction(event.value)
                except UndecodableEvent as exc:
                    await self._dead_letter(event, "transactions", exc)
                    continue
                update = self.users.apply(txn, event.message.offset, event.message.partition)
                self._count("transactions", USER_VIEW, update.outcome, update.evicted)
                if update.row is not None:
                    rows.append(update.row)
                # every transaction goes on, whatever the user state made of it: the merchant
                # and the join have their own clocks and deduplicate by transaction_id
                await self._forward(
                    self.transaction_refs_topic,
                    txn.transaction_id,
                    TransactionRef(txn.transaction_id, txn.merchant_id, txn.event_time_us).encode(),
                )
                await self._forward(
                    self.merchant_facts_topic,
                    txn.merchant_id,
                    MerchantFact(
                        "txn",
                        txn.merchant_id,
                        txn.transaction_id,
                        txn.event_time_us,
                        trigger_event_us=txn.event_time_us,
                        trigger_ingested_us=txn.ingested_us,
                    ).encode(),
                )
            await self.user_facts.send_changelog_records()
            await self.sink.publish(rows, [partial(stream.ack, e) for e in events])

    async def _label_join(self, stream: StreamT[Any]) -> None:
        settings = self.settings
        async for events in cast(Stream[Any], stream).take_events(
            settings.batch_max_events, settings.batch_within_ms / 1000
        ):
            for event in events:
                partition = event.message.partition
                is_ref = event.message.topic == self.transaction_refs_topic
                try:
                    if is_ref:
                        result = self.join.on_transaction(
                            TransactionRef.decode(event.key, event.value), partition
                        )
                    else:
                        result = self.join.on_label(decode_label(event.value), partition)
                except UndecodableEvent as exc:
                    await self._dead_letter(event, "refs" if is_ref else "labels", exc)
                    continue
                if not is_ref:
                    metrics.EVENTS.labels("labels", "held" if result.held else "joined").inc()
                if result.evicted:
                    metrics.JOIN_EXPIRED.labels("evicted_label").inc(result.evicted)
                if result.fact is not None:
                    await self._forward(
                        self.merchant_facts_topic, result.fact.merchant_id, result.fact.encode()
                    )
            await self.join_table.send_changelog_records()

    async def _merchant_activity(self, stream: StreamT[Any]) -> None:
        settings = self.settings
        async for events in _unacked_batches(
            stream, settings.batch_max_events, settings.batch_within_ms / 1000
        ):
            rows = []
            for event in events:
                try:
                    fact = MerchantFact.decode(event.key, event.value)
                except UndecodableEvent as exc:
                    await self._dead_letter(event, "merchant_facts", exc)
                    continue
                update = self.merchants.apply(fact, event.message.offset, event.message.partition)
                self._count(f"merchant_{fact.kind}s", MERCHANT_VIEW, update.outcome, update.evicted)
                if update.row is not None:
                    rows.append(update.row)
            await self.merchant_fact_table.send_changelog_records()
            await self.sink.publish(rows, [partial(stream.ack, e) for e in events])

    async def _forward(self, topic: str, key: str, value: bytes) -> None:
        """Re-key a fact onto an internal topic (the default partitioner, like Kafka's)."""
        await self.app.producer.send(topic, key.encode(), value, None, None, None)

    @staticmethod
    def _count(stream: str, view: str, outcome: Outcome, evicted: int) -> None:
        metrics.EVENTS.labels(stream, outcome.value).inc()
        if outcome is Outcome.LATE:
            metrics.LATE_DROPPED.labels(view).inc()
        if evicted:
            metrics.EVICTED.labels(view).inc(evicted)

    async def _dead_letter(self, event: EventT, stream: str, error: UndecodableEvent) -> None:
        message = event.message
        letter = events_pb2.DeadLetter(
            original_key=message.key or b"",
            original_value=message.value or b"",
            reason_code=error.reason_code,
            reason=f"features service: {error.reason}",
            field=error.field,
        )
        letter.source.topic = message.topic
        letter.source.partition = message.partition
        letter.source.offset = message.offset
        letter.rejected_at.GetCurrentTime()
        if message.timestamp:
            letter.source_timestamp.FromMilliseconds(int(message.timestamp * 1000))
        for key, value in _headers(message.headers):
            letter.original_headers.add(key=key, value=value)
        await self.dead_letters.send(key=message.key, value=letter.SerializeToString())
        metrics.DEAD_LETTERS.labels(stream, error.reason_code).inc()
        metrics.EVENTS.labels(stream, "undecodable").inc()
        log.warning(
            "event_dead_lettered",
            topic=message.topic,
            partition=message.partition,
            offset=message.offset,
            reason_code=error.reason_code,
            reason=error.reason,
        )

    # ----------------------------------------------------------------------------- timers

    async def _flush_offline(self) -> None:
        try:
            await self.sink.flush_if_due()
        except OSError as exc:  # rows stay queued; the next tick retries
            log.error("offline_flush_failed", error=str(exc), pending_rows=self.sink.pending_rows)
        self.update_gauges()

    async def _expire(self) -> None:
        users = self.users.expire_idle(self.user_facts.active_partitions)
        merchants = self.merchants.expire_idle(self.merchant_fact_table.active_partitions)
        expired = self.join.expire(self.join_table.active_partitions)
        for table in (self.user_facts, self.merchant_fact_table, self.join_table):
            await table.send_changelog_records()
        metrics.JOIN_EXPIRED.labels("transaction").inc(expired.transactions)
        metrics.JOIN_EXPIRED.labels("unmatched_label").inc(expired.unmatched_labels)
        if users or merchants or expired.transactions or expired.unmatched_labels:
            log.info(
                "state_expired",
                users=users,
                merchants=merchants,
                join_transactions=expired.transactions,
                unmatched_labels=expired.unmatched_labels,
            )

    def update_gauges(self) -> None:
        metrics.TABLE_ENTRIES.labels("user_facts").set(self.users.fact_count)
        metrics.TABLE_ENTRIES.labels("merchant_facts").set(self.merchants.fact_count)
        metrics.TABLE_ENTRIES.labels("label_join").set(self.join.entry_count)
        metrics.TABLE_ENTRIES.labels("held_labels").set(self.join.pending_count)
        metrics.ENTITIES.labels(USER_VIEW).set(self.users.entity_count)
        metrics.ENTITIES.labels(MERCHANT_VIEW).set(self.merchants.entity_count)


def _json(data: Any) -> bytes:
    return json.dumps(data, separators=(",", ":")).encode()


def _unacked_batches(
    stream: StreamT[Any], max_events: int, within_s: float
) -> AsyncIterator[list[EventT]]:
    """Batches of events that stay unacknowledged until acked by hand (faust types
    ``noack_take`` as yielding values; it yields the events)."""
    batches = cast(Stream[Any], stream).noack_take(max_events, within_s)
    return cast(AsyncIterator[list[EventT]], batches)


def _headers(headers: Any) -> list[tuple[str, bytes]]:
    if not headers:
        return []
    items = headers.items() if isinstance(headers, dict) else headers
    return [(str(k), bytes(v or b"")) for k, v in items]


def writer_id() -> str:
    """A short id distinguishing this process's offline files from other workers'."""
    return uuid.uuid4().hex[:8]
