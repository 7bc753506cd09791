"""Kafka clients, built one way for every service.

Producers wait for all in-sync replicas (``acks=all``); consumers never auto-commit, so a
service commits an offset only after what it produced from that record is acknowledged
(at-least-once end to end; consumers deduplicate by event id).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Mapping

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError, TopicAlreadyExistsError

from services.shared.broker_compat import activate as activate_broker_workarounds
from services.shared.errors import Unavailable
from services.shared.logging import get_logger
from services.shared.settings import KafkaSettings
from services.shared.topics import Topics

log = get_logger("kafka")


def create_producer(
    settings: KafkaSettings,
    *,
    client_id: str,
    linger_ms: int = 5,
    max_batch_size: int = 256 * 1024,
) -> AIOKafkaProducer:
    activate_broker_workarounds(settings)
    return AIOKafkaProducer(
        bootstrap_servers=settings.bootstrap,
        client_id=client_id,
        acks="all",
        enable_idempotence=settings.enable_idempotence,
        linger_ms=linger_ms,
        max_batch_size=max_batch_size,
        request_timeout_ms=settings.request_timeout_ms,
    )


def create_consumer(
    settings: KafkaSettings,
    *topics: str,
    group_id: str | None,
    client_id: str,
    auto_offset_reset: str = "earliest",
    max_poll_records: int = 500,
) -> AIOKafkaConsumer:
    activate_broker_workarounds(settings)
    return AIOKafkaConsumer(
        *topics,
        bootstrap_servers=settings.bootstrap,
        group_id=group_id,
        client_id=client_id,
        enable_auto_commit=False,
        auto_offset_reset=auto_offset_reset,
        isolation_level="read_committed" if settings.enable_idempotence else "read_uncommitted",
        max_poll_records=max_poll_records,
        session_timeout_ms=settings.session_timeout_ms,
        heartbeat_interval_ms=max(1000, settings.session_timeout_ms // 5),
        request_timeout_ms=settings.request_timeout_ms,
    )


async def ensure_topics(
    settings: KafkaSettings, names: Iterable[str] | None = None, *, timeout_s: float = 30.0
) -> list[str]:
    """Create the contract's topics (or ``names``) if missing; returns the ones created.

    Retries until the broker answers or ``timeout_s`` passes, so a service started before
    its broker waits for it instead of crashing in a restart loop.
    """
    wanted = list(names) if names is not None else Topics.from_settings(settings).all()
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        admin = AIOKafkaAdminClient(
            bootstrap_servers=settings.bootstrap, request_timeout_ms=settings.request_timeout_ms
        )
        try:
            await admin.start()
            existing = set(await admin.list_topics())
            missing = [t for t in wanted if t not in existing]
            created: list[str] = []
            for topic in missing:
                try:
                    await admin.create_topics(
                        [
                            NewTopic(
                                topic,
                                num_partitions=settings.partitions,
                                replication_factor=settings.replication_factor,
                            )
                        ]
                    )
                    created.append(topic)
                except TopicAlreadyExistsError:
                    pass  # another service created it between list and create
            if created:
                log.info("topics_created", topics=",".join(created))
            return created
        except KafkaError as exc:
            if asyncio.get_running_loop().time() > deadline:
                raise Unavailable(f"Kafka at {settings.bootstrap} unreachable: {exc}") from exc
            log.warning("kafka_unreachable", bootstrap=settings.bootstrap, error=str(exc))
            await asyncio.sleep(1.0)
        finally:
            await admin.close()


async def consumer_group_lag(
    settings: KafkaSettings, group_id: str, topics: Iterable[str]
) -> dict[TopicPartition, int]:
    """Records not yet committed by ``group_id``, per partition of ``topics``.

    A partition the group never committed counts in full. End offsets come from the broker
    (through ``broker_compat`` on Tansu, whose ListOffsets answer is wrong).
    """
    return (await consumer_groups_lag(settings, {group_id: topics}))[group_id]


async def consumer_groups_lag(
    settings: KafkaSettings, groups: Mapping[str, Iterable[str]]
) -> dict[str, dict[TopicPartition, int]]:
    """``consumer_group_lag`` of several groups over one connection.

    The groups' committed offsets are read in the order given, and the end offsets after all
    of them: when a group feeds the next one (listed after it), a lag of zero for both means
    the second has processed everything the first produced.
    """
    activate_broker_workarounds(settings)
    consumer = AIOKafkaConsumer(
        bootstrap_servers=settings.bootstrap, request_timeout_ms=settings.request_timeout_ms
    )
    admin = AIOKafkaAdminClient(
        bootstrap_servers=settings.bootstrap, request_timeout_ms=settings.request_timeout_ms
    )
    await consumer.start()
    await admin.start()
    try:
        await consumer.topics()  # fetches cluster metadata
        partitions = {
            group: [
                TopicPartition(topic, p)
                for topic in topics
                for p in sorted(consumer.partitions_for_topic(topic) or ())
            ]
            for group, topics in groups.items()
        }
        committed = {
            group: await admin.list_consumer_group_offsets(group, partitions=tps) if tps else {}
            for group, tps in partitions.items()
        }
        every = sorted({tp for tps in partitions.values() for tp in tps})
        ends = await consumer.end_offsets(every) if every else {}
        lag: dict[str, dict[TopicPartition, int]] = {}
        for group, tps in partitions.items():
            lag[group] = {}
            for tp in tps:
                position = committed[group].get(tp)
                done = position.offset if position is not None and position.offset >= 0 else 0
                lag[group][tp] = max(ends[tp] - done, 0)
        return lag
    finally:
        await admin.close()
        await consumer.stop()
