"""Kafka clients, built one way for every service.

Producers wait for all in-sync replicas (``acks=all``); consumers never auto-commit, so a
service commits an offset only after what it produced from that record is acknowledged
(at-least-once end to end; consumers deduplicate by event id).
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError, TopicAlreadyExistsError
from aiokafka.helpers import create_ssl_context
from prometheus_client import Counter

from services.shared.broker_compat import activate as activate_broker_workarounds
from services.shared.broker_compat import kept_metadata
from services.shared.errors import Unavailable
from services.shared.logging import get_logger
from services.shared.retry import pause
from services.shared.settings import KafkaSettings
from services.shared.topics import Topics

log = get_logger("kafka")
UNREACHABLE_RECHECK_S = 0.25
TOPICS_RECREATED = Counter(
    "mlops_kafka_topics_recreated_total",
    "Topics this process found missing on the broker and created again",
)


def kafka_ssl_context(settings: KafkaSettings) -> ssl.SSLContext | None:
    """The TLS context of SSL/SASL_SSL connections (None for plaintext protocols)."""
    if not settings.uses_tls:
        return None
    return create_ssl_context(
        cafile=str(settings.ssl_ca_file) if settings.ssl_ca_file else None,
        certfile=str(settings.ssl_cert_file) if settings.ssl_cert_file else None,
        keyfile=str(settings.ssl_key_file) if settings.ssl_key_file else None,
    )


def security_options(settings: KafkaSettings) -> dict[str, Any]:
    """aiokafka's keyword arguments for the configured protocol: every client of the
    platform (producers, consumers, admin) gets them."""
    options: dict[str, Any] = {"security_protocol": settings.security_protocol}
    context = kafka_ssl_context(settings)
    if context is not None:
        options["ssl_context"] = context
    if settings.uses_sasl:
        options["sasl_mechanism"] = settings.sasl_mechanism
        options["sasl_plain_username"] = settings.sasl_username
        options["sasl_plain_password"] = settings.sasl_password.get_secret_value()
    return options


def faust_credentials(settings: KafkaSettings) -> Any:
    """The same security as faust's ``broker_credentials`` (None: plaintext)."""
    import faust

    context = kafka_ssl_context(settings)
    if settings.uses_sasl:
        return faust.SASLCredentials(
            username=settings.sasl_username,
            password=settings.sasl_password.get_secret_value(),
            ssl_context=context,
            mechanism=settings.sasl_mechanism,
        )
    if context is not None:
        return faust.SSLCredentials(context)
    return None


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
        **security_options(settings),
    )


def create_consumer(
    settings: KafkaSettings,
    *topics: str,
    group_id: str | None,
    client_id: str,
    auto_offset_reset: str = "earliest",
    max_poll_records: int = 500,
    partition_assignment_strategy: tuple[Any, ...] | None = None,
    batching_wait_ms: int | None = None,
) -> AIOKafkaConsumer:
    """``batching_wait_ms``: for a reader that is not on a latency path (monitoring), how
    long a fetch may wait to fill up (fetch.min.bytes 256 KiB, fetch.max.wait this): fewer,
    fuller fetches, which is most of what such a reader costs the broker. None: records are
    wanted as soon as they arrive."""
    activate_broker_workarounds(settings)
    extra: dict[str, Any] = {}
    if partition_assignment_strategy is not None:
        extra["partition_assignment_strategy"] = partition_assignment_strategy
    if batching_wait_ms is not None:
        extra["fetch_max_wait_ms"] = batching_wait_ms
        extra["fetch_min_bytes"] = 256 * 1024
    return AIOKafkaConsumer(
        *topics,
        **extra,
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
        **security_options(settings),
    )


async def ensure_topics(
    settings: KafkaSettings,
    names: Iterable[str] | None = None,
    *,
    timeout_s: float = 30.0,
    compacted: Iterable[str] = (),
) -> list[str]:
    """Create the contract's topics (or ``names``) if missing; returns the ones created.
    Those also in ``compacted`` (table changelogs) are created with ``cleanup.policy=compact``.

    Retries until the broker answers or ``timeout_s`` passes, so a service started before
    its broker waits for it instead of crashing in a restart loop.
    """
    wanted = list(names) if names is not None else Topics.from_settings(settings).all()
    compact = set(compacted)
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        admin = AIOKafkaAdminClient(
            bootstrap_servers=settings.bootstrap,
            request_timeout_ms=settings.request_timeout_ms,
            **security_options(settings),
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
                                topic_configs={"cleanup.policy": "compact"}
                                if topic in compact
                                else None,
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


async def keep_topics(
    settings: KafkaSettings,
    stop: asyncio.Event,
    names: Iterable[str] | None = None,
    *,
    interval_s: float = 10.0,
    compacted: Iterable[str] = (),
    on_recreated: Callable[[list[str]], Awaitable[None]] | None = None,
) -> None:
    """Re-create ``names`` (default: the contract's topics) whenever they are missing, until
    ``stop``; then await ``on_recreated(the topics re-created)``.

    A broker that lost its topics (the local in-memory broker after a restart; a topic
    deleted by hand on a real cluster) would otherwise leave every consumer committing to
    partitions that do not exist, and every producer failing, until someone restarts the
    services. Consumers whose position is past the new topics' end then start them over from
    their beginning (``auto_offset_reset=earliest``).

    One metadata request every ``interval_s``, and one as soon as the check's connection to
    the broker drops (looked at locally every ``UNREACHABLE_RECHECK_S``, no request), then
    every ``UNREACHABLE_RECHECK_S`` until the broker answers: topics a restarted broker lost
    are back within a fraction of a second of its return. That matters on the local broker,
    which loses records sent to a topic it does not have (services/shared/broker_compat.py).
    """
    wanted = list(names) if names is not None else Topics.from_settings(settings).all()
    wait = interval_s
    while not await pause(stop, wait):
        wait = interval_s
        admin = AIOKafkaAdminClient(
            bootstrap_servers=settings.bootstrap,
            request_timeout_ms=settings.request_timeout_ms,
            **security_options(settings),
        )
        try:
            await admin.start()
            while not stop.is_set():
                existing = set(await admin.list_topics())
                missing = [t for t in wanted if t not in existing]
                if missing:
                    created = await ensure_topics(
                        settings, missing, timeout_s=0, compacted=compacted
                    )
                    if created:
                        TOPICS_RECREATED.inc(len(created))
                        log.warning("topics_recreated", topics=",".join(created))
                        if on_recreated is not None:
                            await on_recreated(created)
                await _until_disconnected(admin, stop, interval_s)
        except (KafkaError, Unavailable, OSError) as exc:  # the broker away: look again soon
            log.info("topic_check_failed", error=f"{type(exc).__name__}: {exc}")
            wait = min(interval_s, UNREACHABLE_RECHECK_S)
        finally:
            await admin.close()


async def _until_disconnected(
    admin: AIOKafkaAdminClient, stop: asyncio.Event, timeout_s: float
) -> None:
    """Wait ``timeout_s``, or less if every connection of ``admin`` closed (a broker that went
    away closes them; aiokafka keeps no other sign of it without a request)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if await pause(stop, min(UNREACHABLE_RECHECK_S, deadline - time.monotonic())):
            return
        connections = admin._client._conns.values()  # aiokafka's own; read only
        if not any(conn.connected() for conn in connections):
            return


async def committed_offsets(
    settings: KafkaSettings, group_id: str, partitions: Iterable[TopicPartition]
) -> dict[TopicPartition, tuple[int, str]]:
    """The offsets ``group_id`` committed for ``partitions``, each with the metadata committed
    along with it (``AIOKafkaConsumer.committed`` gives the offset alone). A partition the
    group never committed is absent."""
    wanted = list(partitions)
    if not wanted:
        return {}
    activate_broker_workarounds(settings)
    admin = AIOKafkaAdminClient(
        bootstrap_servers=settings.bootstrap,
        request_timeout_ms=settings.request_timeout_ms,
        **security_options(settings),
    )
    await admin.start()
    try:
        committed = await admin.list_consumer_group_offsets(group_id, partitions=wanted)
    finally:
        await admin.close()
    answered = {
        tp: (position.offset, position.metadata or "")
        for tp, position in committed.items()
        if position.offset >= 0
    }
    return kept_metadata(settings, group_id, answered)


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
        bootstrap_servers=settings.bootstrap,
        request_timeout_ms=settings.request_timeout_ms,
        **security_options(settings),
    )
    admin = AIOKafkaAdminClient(
        bootstrap_servers=settings.bootstrap,
        request_timeout_ms=settings.request_timeout_ms,
        **security_options(settings),
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
