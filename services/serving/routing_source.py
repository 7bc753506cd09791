"""Keeps the router's table current: the registry at start-up, then ``models.lifecycle``.

Start-up: the consumer is positioned at the end of models.lifecycle first, then the registry
is asked for its routing table (``GetRoutingTable``), and asked once more after the consumer is
in place if no event has arrived meanwhile, so no change can fall between the two. From then on
every lifecycle event of the model carries the complete routing table (``served``) and replaces
the current one; events older than the table in force are ignored. Every replica reads every
event (no consumer group). The table is applied as the registry computed it, shares included.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import grpc
from aiokafka import AIOKafkaConsumer
from aiokafka.errors import KafkaError
from aiokafka.structs import TopicPartition
from google.protobuf.message import DecodeError

from services.serving import metrics
from services.serving.routing import CanaryRouter, RoutingTable
from services.shared.errors import Unavailable
from services.shared.kafka import create_consumer, ensure_topics
from services.shared.logging import get_logger
from services.shared.proto.mlops.v1 import models_pb2, registry_pb2, registry_pb2_grpc
from services.shared.retry import pause
from services.shared.settings import KafkaSettings, RegistryClientSettings
from services.shared.tls import registry_aio_channel

log = get_logger("serving.routing")


def apply_table(router: CanaryRouter, table: RoutingTable, source: str) -> None:
    previous = router.table
    router.update(table)
    if previous is not None:
        for model in previous.entries():
            # zero first: with several workers the value lives on in a shared file
            metrics.ROUTING.labels(str(model.version), model.alias).set(0)
            metrics.ROUTING.remove(str(model.version), model.alias)
    for model in table.entries():
        metrics.ROUTING.labels(str(model.version), model.alias).set(model.traffic_percent)
    metrics.ROUTING_UPDATES.labels(source).inc()
    log.info("routing_updated", source=source, table=table.describe())


async def read_registry_table(
    registry: RegistryClientSettings, timeout_s: float = 5.0
) -> RoutingTable | None:
    """The registry's routing table now; None when there is no production version.

    Raises ``Unavailable`` when the registry cannot be reached.
    """
    async with registry_aio_channel(registry) as channel:
        stub = registry_pb2_grpc.ModelRegistryStub(channel)
        try:
            response = await stub.GetRoutingTable(
                registry_pb2.GetRoutingTableRequest(model_name=registry.model_name),
                timeout=timeout_s,
            )
        except grpc.aio.AioRpcError as exc:
            raise Unavailable(
                f"registry {registry.address}: {exc.code().name} {exc.details()}"
            ) from exc
    if not response.routes:
        return None
    try:
        return RoutingTable.from_served(response.routes)
    except ValueError as exc:
        raise Unavailable(f"registry {registry.address}: {exc}") from exc


class RoutingFollower:
    """Follows the registry's routing decisions for one model into a ``CanaryRouter``."""

    def __init__(
        self,
        router: CanaryRouter,
        *,
        registry: RegistryClientSettings,
        kafka: KafkaSettings,
        lifecycle_topic: str,
        retry_interval_s: float = 2.0,
        consumer_factory: Callable[[], AIOKafkaConsumer] | None = None,
    ) -> None:
        self.router = router
        self.model_name = registry.model_name
        self._registry = registry
        self._kafka = kafka
        self._topic = lifecycle_topic
        self._retry_s = retry_interval_s
        self._consumer_factory = consumer_factory or (
            lambda: create_consumer(kafka, group_id=None, client_id="serving-routing")
        )
        self._last_event_ns = -1
        self._events_applied = 0
        self.following = asyncio.Event()  # set once the consumer sits at the topic's end

    async def run(self, stop: asyncio.Event) -> None:
        """Follow until ``stop`` is set."""
        tasks = [
            asyncio.create_task(self._read_registry_until_known(stop), name="routing-registry"),
            asyncio.create_task(self._follow_lifecycle(stop), name="routing-lifecycle"),
        ]
        try:
            await stop.wait()
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    # ------------------------------------------------------------------ registry

    async def _read_registry_until_known(self, stop: asyncio.Event) -> None:
        while not stop.is_set() and self.router.table is None:
            await self._read_registry_once()
            if self.router.table is None:
                await pause(stop, self._retry_s)
        # a change made between that read and the consumer taking its position would be
        # missed: once the consumer is in place, read once more
        waits = [asyncio.ensure_future(self.following.wait()), asyncio.ensure_future(stop.wait())]
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiting in waits:
                waiting.cancel()
        if self.following.is_set() and not stop.is_set():
            await self._read_registry_once()

    async def _read_registry_once(self) -> None:
        if self._events_applied:
            return  # the lifecycle topic is authoritative from here on
        try:
            table = await read_registry_table(self._registry)
        except Unavailable as exc:
            log.warning("registry_unreachable", address=self._registry.address, error=str(exc))
            return
        if table is not None and not self._events_applied:
            apply_table(self.router, table, "registry")

    # ------------------------------------------------------------------ lifecycle

    async def _follow_lifecycle(self, stop: asyncio.Event) -> None:
        consumer = await self._positioned_consumer(stop)
        if consumer is None:
            return
        try:
            while not stop.is_set():
                batches = await consumer.getmany(timeout_ms=500, max_records=100)
                for records in batches.values():
                    for record in records:
                        self.apply_event(record.value)
        finally:
            await asyncio.shield(consumer.stop())

    async def _positioned_consumer(self, stop: asyncio.Event) -> AIOKafkaConsumer | None:
        while not stop.is_set():
            try:
                await ensure_topics(self._kafka, [self._topic], timeout_s=self._retry_s)
            except Unavailable as exc:
                log.warning("lifecycle_unreachable", topic=self._topic, error=str(exc))
                continue
            consumer = self._consumer_factory()
            try:
                await self._position(consumer)
                return consumer
            except (KafkaError, OSError, Unavailable) as exc:
                log.warning("lifecycle_unreachable", topic=self._topic, error=repr(exc))
                await consumer.stop()
                await pause(stop, self._retry_s)
            except BaseException:  # cancelled while connecting: close before leaving
                await asyncio.shield(consumer.stop())
                raise
        return None

    async def _position(self, consumer: AIOKafkaConsumer) -> None:
        """Assign every partition of the topic and seek to its end."""
        await consumer.start()
        await consumer.topics()  # fills the cluster metadata
        partitions = consumer.partitions_for_topic(self._topic) or set()
        if not partitions:
            raise Unavailable(f"topic {self._topic} has no partitions yet")
        assigned = [TopicPartition(self._topic, p) for p in sorted(partitions)]
        consumer.assign(assigned)
        ends = await consumer.end_offsets(assigned)
        for tp in assigned:
            consumer.seek(tp, ends[tp])
        self.following.set()
        log.info("lifecycle_following", topic=self._topic, partitions=len(assigned))

    def apply_event(self, payload: bytes | None) -> bool:
        """Apply one models.lifecycle record; True when it changed the routing table."""
        if not payload:
            return False
        event = models_pb2.ModelEvent()
        try:
            event.ParseFromString(payload)
        except DecodeError as exc:  # a record that is not a ModelEvent: skip it, say so
            log.warning("lifecycle_unreadable", error=repr(exc))
            return False
        if event.model_name != self.model_name:
            return False
        occurred_ns = event.occurred_at.ToNanoseconds() if event.HasField("occurred_at") else 0
        if occurred_ns and occurred_ns < self._last_event_ns:
            log.info("lifecycle_stale", event_id=event.event_id, type=event.type)
            return False
        if not event.served:
            # an event that does not route (registered, gate results) leaves routing alone
            return False
        try:
            table = RoutingTable.from_served(event.served)
        except ValueError as exc:
            log.warning("lifecycle_table_invalid", event_id=event.event_id, error=str(exc))
            return False
        self._last_event_ns = max(self._last_event_ns, occurred_ns)
        self._events_applied += 1
        apply_table(self.router, table, f"lifecycle:{models_pb2.ModelEventType.Name(event.type)}")
        return True
