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

Delivery: at-least-once with idempotent state. Every agent hands its events' acknowledgements
to ``FeatureSink``, which runs them only once the rows are online and in the offline log and
the batch's changelog records and re-keyed facts (``OutboundRecords``) are acknowledged by
the broker; faust commits only acknowledged offsets.
"""

from __future__ import annotations

import json
import logging
import math
import time
import uuid
from collections.abc import AsyncIterator, Callable, Hashable, Iterable
from functools import partial
from pathlib import Path
from typing import Any, cast

import faust
from faust.streams import Stream
from faust.types import TP, EventT, StreamT, TopicT

from services.features import metrics
from services.features.consumer import FeaturesConsumer, FeaturesTransport
from services.features.events import (
    MerchantFact,
    TransactionRef,
    UndecodableEvent,
    decode_label,
    decode_merchant_facts,
    decode_refs,
    decode_transaction,
    fact_position,
)
from services.features.label_join import TransactionLabelJoin
from services.features.outbound import OutboundRecords
from services.features.settings import FeaturesSettings
from services.features.sink import FeatureSink
from services.features.windows import (
    MerchantActivity,
    Outcome,
    UserActivity,
    WindowPolicy,
)
from services.shared.kafka import ensure_topics, faust_credentials
from services.shared.logging import get_logger
from services.shared.sender import Source, dead_letter
from services.shared.topics import Topics
from services.shared.usecase.features import MERCHANT_VIEW, USER_VIEW

log = get_logger("features.app")
CHANGELOG_REWRITE_QUIET_S = 60.0

Rebuild = Callable[[Iterable[tuple[Hashable, Any]], set[int]], None]


class FactTable(faust.Table):
    """A faust table written fact by fact with explicit partitions (a ``RecordLog``).

    faust's own ``table[key] = value`` takes the partition from the stream's current event,
    which in a batch (``take``) is not the event that produced the fact, and is unusable from
    a timer; facts carry their partition, so writes name it. The changelog records go out
    batched with the other records of the batch (``OutboundRecords``; faust's per-record
    ``send_soon`` path cost more than the rest of the processing). They are JSON, exactly as
    faust's own json serializer writes them, so faust's recovery reads them back.
    """

    # mode names a service's logger after its module; faust's loggers are the quiet ones
    logger = logging.getLogger("faust.tables.fact_table")

    def __init__(self, *args: Any, rebuild: Rebuild | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._rebuild = rebuild
        self.outbound: OutboundRecords | None = None
        self.active_partitions: set[int] = set()

    def put(self, key: tuple[str, ...], value: list[Any], partition: int) -> None:
        self.data[key] = value
        self._changelog(partition, _json(key), _json(value))

    def remove(self, key: tuple[str, ...], partition: int) -> None:
        self.data.pop(key, None)
        self._changelog(partition, _json(key), None)  # a tombstone

    def _changelog(self, partition: int, key: bytes, value: bytes | None) -> None:
        assert self.outbound is not None, "FactTable used before the pipeline wired it"
        self.outbound.add(self.changelog_topic_name, partition, key, value)

    def rewrite_changelog(self) -> int:
        """Write every fact of this worker's partitions to the changelog again (the broker
        lost it: a restart of the in-memory local broker); how many. The partition is the
        last field of every fact."""
        mine = [
            (key, value)
            for key, value in self.data.items()
            if value is not None and int(value[-1]) in self.active_partitions
        ]
        for key, value in mine:
            self._changelog(int(value[-1]), _json(key), _json(value))
        return len(mine)

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


class InputPositions:
    """Puts every input partition back at its committed offset (or its beginning) after a
    rebalance, at the one moment faust cannot lose records any more.

    faust 0.15.3 keeps the consumer's flow on while it restores tables: its fetches hand over
    records of input partitions too, which it drops, relying on the seek to the committed
    offsets that follows. But aiokafka's ``seek_to_committed`` does not seek a partition with
    no committed offset (nor one committed at 0), and faust clears the stream buffers (and
    with them records already handed over after that seek) only later, when it turns the flow
    back on. A worker that had not committed yet (a first start, a restart before its first
    commit) therefore skipped records: the kill -9 test lost up to hundreds of events.

    Here the positions are worked out once the changelogs are read (``on_rebalance_complete``)
    and applied right before faust resumes the flow, after it cleared its buffers: from then
    on nothing is dropped. The seek is the one faust itself uses (aiokafka's, from the main
    thread, with faust's read offset reset in the same step). Re-reading is harmless: the
    state deduplicates.
    """

    # an input partition with records past its committed offset and no commit for this long
    # is reported once (``check_progress``), with what faust's consumer holds for it
    STALL_S = 60.0

    def __init__(self, app: faust.App, input_topics: set[str]) -> None:
        self._consumer = app.consumer
        self._thread = self._consumer._thread  # type: ignore[attr-defined]  # faust's consumer thread
        self._input_topics = input_topics
        self._targets: dict[Any, int] | None = None
        self._progress: dict[TP, tuple[int | None, float]] = {}  # committed, since when
        self._stalled: set[TP] = set()
        self._resume_flow = self._consumer.resume_flow
        self._consumer.resume_flow = self._reposition_then_resume  # type: ignore[method-assign]
        app.on_rebalance_complete.connect(self._plan)

    async def _targets_in_consumer_thread(self) -> dict[Any, int]:
        consumer = self._thread._ensure_consumer()
        targets = {}
        for tp in consumer.assignment():
            if tp.topic in self._input_topics:
                committed = await consumer.committed(tp)
                targets[tp] = committed
        missing = [tp for tp, offset in targets.items() if not offset]
        if missing:
            earliest = await consumer.beginning_offsets(missing)
            targets.update({tp: earliest[tp] for tp in missing})
        return targets

    async def _plan(self, *_: Any, **__: Any) -> None:
        self._targets = await self._thread.call_thread(self._targets_in_consumer_thread)

    def _reposition_then_resume(self) -> None:
        targets, self._targets = self._targets, None
        if targets:
            for tp, offset in targets.items():
                self._thread.seek(tp, offset)
                self._consumer._read_offset[TP(tp.topic, tp.partition)] = None  # type: ignore[attr-defined]
            log.info(
                "inputs_positioned",
                partitions=",".join(f"{tp.topic}:{tp.partition}@{o}" for tp, o in targets.items()),
            )
        self._resume_flow()

    def check_progress(self, now: float) -> list[dict[str, Any]]:
        """Report (log once, and return) every input partition whose committed offset has not
        moved for ``STALL_S`` while its end is past it: whether faust fetches it (active,
        paused, buffered), the last offset handed to the streams, the acknowledged offsets
        waiting for a gap to close, the unacknowledged messages. A consumer group whose lag
        never falls then says whether its worker stopped reading or stopped committing
        (RELIABILITY.md: the chaos run's broker round). Reads faust's bookkeeping only."""
        consumer = self._consumer
        stalled = []
        for tp in consumer.assignment():
            if tp.topic not in self._input_topics:
                continue
            committed = consumer._committed_offset.get(tp)  # type: ignore[attr-defined]
            end = consumer.highwater(tp)
            seen = self._progress.get(tp)
            if seen is None or seen[0] != committed or end is None or end <= (committed or 0):
                self._progress[tp] = (committed, now)
                self._stalled.discard(tp)
                continue
            if now - seen[1] < self.STALL_S or tp in self._stalled:
                continue
            self._stalled.add(tp)
            unacked = [
                message
                for message in list(consumer._unacked_messages)  # type: ignore[attr-defined]
                if message.tp == tp
            ]
            report: dict[str, Any] = {
                "topic": tp.topic,
                "partition": tp.partition,
                "committed": committed,
                "end": end,
                "stalled_s": round(now - seen[1]),
                "read_offset": consumer._read_offset.get(tp),  # type: ignore[attr-defined]
                "active": tp in consumer._get_active_partitions(),  # type: ignore[attr-defined]
                "paused": tp in consumer._paused_partitions,  # type: ignore[attr-defined]
                "buffered": tp in consumer._buffered_partitions,  # type: ignore[attr-defined]
                "acked_waiting": len(consumer._acked.get(tp, ())),  # type: ignore[attr-defined]
                "unacked": len(unacked),
                "first_unacked": min((m.offset for m in unacked), default=None),
            }
            log.warning("input_partition_stalled", **report)
            stalled.append(report)
        return stalled


def faust_settings(settings: FeaturesSettings) -> dict[str, Any]:
    kafka = settings.kafka
    session_s = kafka.session_timeout_ms / 1000
    return {
        "broker": [f"kafka://{host.strip()}" for host in kafka.bootstrap.split(",")],
        # TLS / SASL as every other client of the platform (services/shared/kafka.py)
        "broker_credentials": faust_credentials(kafka),
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
        # events stay unacknowledged until their rows are in the offline log (FeatureSink);
        # faust must not wait for them on a rebalance or stop: they are redelivered instead
        "stream_wait_empty": False,
    }


class FeaturePipeline:
    """Builds the faust app and wires the domain objects and the sink into its agents."""

    def __init__(
        self, settings: FeaturesSettings, sink: FeatureSink, outbound: OutboundRecords
    ) -> None:
        self.settings = settings
        self.sink = sink
        self.outbound = outbound
        self._changelogs_rewritten_at = -math.inf
        self.topics = Topics.from_settings(settings.kafka)
        partitions = settings.kafka.partitions
        options = faust_settings(settings)
        Path(options["datadir"]).parent.mkdir(parents=True, exist_ok=True)  # faust: no parents
        self.app = faust.App(settings.group_id, **options)
        # faust's consumer, with one hand-over of each fetch to the streams (consumer.py)
        self.app.transport = FeaturesTransport(self.app.conf.broker_consumer, self.app)
        app = self.app
        group = settings.group_id
        self.transaction_refs_topic = settings.transaction_refs_topic
        self.merchant_facts_topic = settings.merchant_facts_topic

        self.validated = self._raw_topic(self.topics.validated)
        self.merchant_facts = self._raw_topic(self.merchant_facts_topic, internal=partitions)
        self.join_input = self._raw_topic(self.transaction_refs_topic, self.topics.validated_labels)

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
        for table, domain in (
            (self.user_facts, self.users),
            (self.merchant_fact_table, self.merchants),
            (self.join_table, self.join),
        ):
            table._rebuild = domain.rebuild
            table.outbound = outbound

        app.agent(self.validated, name=f"{group}.user_activity")(self._user_activity)
        app.agent(self.join_input, name=f"{group}.label_join")(self._label_join)
        app.agent(self.merchant_facts, name=f"{group}.merchant_activity")(self._merchant_activity)
        self.input_positions = InputPositions(
            app,
            {
                self.topics.validated,
                self.topics.validated_labels,
                self.transaction_refs_topic,
                self.merchant_facts_topic,
            },
        )
        app.timer(settings.offline_flush_interval_s / 2)(self._flush_offline)
        app.timer(InputPositions.STALL_S / 4)(self._check_inputs)
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
                self.outbound.add_fact(
                    self.transaction_refs_topic,
                    txn.transaction_id.encode(),
                    TransactionRef(txn.transaction_id, txn.merchant_id, txn.event_time_us),
                )
                self.outbound.add_fact(
                    self.merchant_facts_topic,
                    txn.merchant_id.encode(),
                    MerchantFact(
                        "txn",
                        txn.merchant_id,
                        txn.transaction_id,
                        txn.event_time_us,
                        trigger_event_us=txn.event_time_us,
                        trigger_ingested_us=txn.ingested_us,
                    ),
                )
            # rows go online first; the broker's acknowledgement of what the batch produced
            # is awaited only before its events are acknowledged (FeatureSink.flush)
            await self.sink.publish(rows, [partial(_ack_all, stream, events)])
            await self.outbound.send()

    async def _label_join(self, stream: StreamT[Any]) -> None:
        settings = self.settings
        async for events in _unacked_batches(
            stream, settings.batch_max_events, settings.batch_within_ms / 1000
        ):
            for event in events:
                partition = event.message.partition
                is_ref = event.message.topic == self.transaction_refs_topic
                try:
                    if is_ref:
                        results = [
                            self.join.on_transaction(ref, partition)
                            for ref in decode_refs(event.value)
                        ]
                    else:
                        results = [self.join.on_label(decode_label(event.value), partition)]
                except UndecodableEvent as exc:
                    await self._dead_letter(event, "refs" if is_ref else "labels", exc)
                    continue
                for result in results:
                    if not is_ref:
                        outcome = "held" if result.held else "joined"
                        metrics.labelled(metrics.EVENTS, "labels", outcome).inc()
                    if result.evicted:
                        metrics.JOIN_EXPIRED.labels("evicted_label").inc(result.evicted)
                    if result.fact is not None:
                        self.outbound.add_fact(
                            self.merchant_facts_topic,
                            result.fact.merchant_id.encode(),
                            result.fact,
                        )
            await self.outbound.send()
            # acknowledged with the other agents' events, once the outbound records are durable
            await self.sink.publish([], [partial(_ack_all, stream, events)])

    async def _merchant_activity(self, stream: StreamT[Any]) -> None:
        settings = self.settings
        async for events in _unacked_batches(
            stream, settings.batch_max_events, settings.batch_within_ms / 1000
        ):
            rows = []
            for event in events:
                try:
                    facts = decode_merchant_facts(event.value)
                except UndecodableEvent as exc:
                    await self._dead_letter(event, "merchant_facts", exc)
                    continue
                for index, fact in enumerate(facts):
                    # a fact's position orders it within its partition: offset, then index
                    position = fact_position(event.message.offset, index)
                    update = self.merchants.apply(fact, position, event.message.partition)
                    self._count(
                        f"merchant_{fact.kind}s", MERCHANT_VIEW, update.outcome, update.evicted
                    )
                    if update.row is not None:
                        rows.append(update.row)
            await self.sink.publish(rows, [partial(_ack_all, stream, events)])
            await self.outbound.send()

    @staticmethod
    def _count(stream: str, view: str, outcome: Outcome, evicted: int) -> None:
        metrics.labelled(metrics.EVENTS, stream, outcome.value).inc()
        if outcome is Outcome.LATE:
            metrics.labelled(metrics.LATE_DROPPED, view).inc()
        if evicted:
            metrics.EVICTED.labels(view).inc(evicted)

    async def _dead_letter(self, event: EventT, stream: str, error: UndecodableEvent) -> None:
        """Sent with the batch's other records: acknowledged only once it is durable."""
        message = event.message
        self.outbound.add_record(
            dead_letter(
                self.topics.dlq,
                key=message.key,
                value=message.value,
                headers=_headers(message.headers),
                source=Source(
                    message.topic,
                    message.partition,
                    message.offset,
                    int(message.timestamp * 1000) if message.timestamp else None,
                ),
                reason_code=error.reason_code,
                reason=f"features service: {error.reason}",
                field=error.field,
            )
        )
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

    async def _check_inputs(self) -> None:
        try:
            self.input_positions.check_progress(time.monotonic())
        except Exception as exc:  # noqa: BLE001 - a diagnostic of faust's internals (a rebalance
            # under way, a faust release that moved them) must never stop the service
            log.warning("input_progress_unreadable", error=f"{type(exc).__name__}: {exc}")

    async def _expire(self) -> None:
        users = self.users.expire_idle(self.user_facts.active_partitions)
        merchants = self.merchants.expire_idle(self.merchant_fact_table.active_partitions)
        expired = self.join.expire(self.join_table.active_partitions)
        await self.outbound.send()
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

    @property
    def tables(self) -> list[FactTable]:
        return [self.user_facts, self.merchant_fact_table, self.join_table]

    @property
    def changelog_topics(self) -> list[str]:
        return [table.changelog_topic_name for table in self.tables]

    @property
    def internal_topics(self) -> list[str]:
        """The topics of this service's own: re-keyed facts and the tables' changelogs."""
        return [self.transaction_refs_topic, self.merchant_facts_topic, *self.changelog_topics]

    @property
    def consumer(self) -> FeaturesConsumer:
        return cast(FeaturesConsumer, self.app.consumer)

    async def partition_started_over(self, why: str) -> None:
        """One partition's sign that the broker lost the topics (``why``: which partition):
        every partition of every topic shows the same loss, so signs within
        ``CHANGELOG_REWRITE_QUIET_S`` of a rewrite are that loss and rewrite nothing."""
        if time.monotonic() - self._changelogs_rewritten_at < CHANGELOG_REWRITE_QUIET_S:
            return
        await self.topics_lost(why)

    async def topics_lost(self, why: str) -> None:
        """The broker lost the service's topics (a restart of the in-memory local broker:
        ``why`` says how it showed). Write the tables' facts to the new changelogs, so a later
        restart of the service recovers the whole state, not only what came after. Called
        directly when the service itself re-created its topics, which only a new loss makes:
        two broker restarts within the quiet time of ``partition_started_over`` lost the
        second one's rewrite when both went through it (the chaos run of 2026-12-07 22:08,
        633 differing online features after the restarted service rebuilt empty tables)."""
        now = time.monotonic()
        self._changelogs_rewritten_at = now
        # the topics first: records sent to a topic the local broker does not have are lost
        # (services/shared/broker_compat.py)
        await ensure_topics(
            self.settings.kafka, self.internal_topics, compacted=self.changelog_topics
        )
        written = {table.name: table.rewrite_changelog() for table in self.tables}
        # handed to the sender, in order with everything else; the sink's next flush waits
        # for their acknowledgement with the rest (a flush here would take the sink's own)
        await self.outbound.send()
        metrics.CHANGELOG_REWRITES.inc()
        log.warning(
            "changelogs_rewritten",
            why=why,
            facts=",".join(f"{name}={count}" for name, count in written.items()),
            seconds=round(time.monotonic() - now, 3),
        )

    def drop_faust_monitor(self) -> None:
        """Stop faust's Monitor sensor: it updates in-memory stats (for faust's own web
        pages, which are off) on every message; our metrics are Prometheus'."""
        if self.app.monitor in set(self.app.sensors):
            self.app.sensors.remove(self.app.monitor)

    def update_gauges(self) -> None:
        metrics.TABLE_ENTRIES.labels("user_facts").set(self.users.fact_count)
        metrics.TABLE_ENTRIES.labels("merchant_facts").set(self.merchants.fact_count)
        metrics.TABLE_ENTRIES.labels("label_join").set(self.join.entry_count)
        metrics.TABLE_ENTRIES.labels("held_labels").set(self.join.pending_count)
        metrics.ENTITIES.labels(USER_VIEW).set(self.users.entity_count)
        metrics.ENTITIES.labels(MERCHANT_VIEW).set(self.merchants.entity_count)


_JSON = json.JSONEncoder(separators=(",", ":"))


def _json(data: Any) -> bytes:
    return _JSON.encode(data).encode()


def _unacked_batches(
    stream: StreamT[Any], max_events: int, within_s: float
) -> AsyncIterator[list[EventT]]:
    """Batches of events that stay unacknowledged until acked by hand (faust types
    ``noack_take`` as yielding values; it yields the events)."""
    batches = cast(Stream[Any], stream).noack_take(max_events, within_s)
    return cast(AsyncIterator[list[EventT]], batches)


async def _ack_all(stream: StreamT[Any], events: list[EventT]) -> None:
    """Acknowledge a batch's events (one callable per batch, not one per event)."""
    ack = stream.ack
    for event in events:
        await ack(event)


def _headers(headers: Any) -> list[tuple[str, bytes]]:
    if not headers:
        return []
    items = headers.items() if isinstance(headers, dict) else headers
    return [(str(k), bytes(v or b"")) for k, v in items]


def writer_id() -> str:
    """A short id distinguishing this process's offline files from other workers'."""
    return uuid.uuid4().hex[:8]
