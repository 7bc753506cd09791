"""``models.lifecycle``: the registry's ModelEvents on Kafka, keyed by model name.

One key per model keeps a model's events in one partition, in order. Each event's ``served``
field is the complete routing table after it, so a consumer (serving) needs only the latest
event of a model to know what to route to.
"""

from __future__ import annotations

from collections.abc import Sequence

from aiokafka import AIOKafkaProducer

from services.registry.records import LifecycleEvent
from services.registry.views import event_message
from services.shared.codecs import protobuf_headers
from services.shared.kafka import create_producer
from services.shared.logging import get_logger
from services.shared.proto.mlops.v1 import models_pb2
from services.shared.settings import KafkaSettings
from services.shared.topics import Topics

log = get_logger("registry.lifecycle")


class LifecycleEventPublisher:
    def __init__(self, kafka: KafkaSettings) -> None:
        self.topic = Topics.from_settings(kafka).lifecycle
        self._producer: AIOKafkaProducer = create_producer(kafka, client_id="registry", linger_ms=0)

    async def start(self) -> None:
        await self._producer.start()

    async def stop(self) -> None:
        await self._producer.stop()

    async def publish(self, events: Sequence[LifecycleEvent]) -> None:
        """Publish in order; each is acknowledged by the broker before the next is sent."""
        for event in events:
            message = event_message(event)
            await self._producer.send_and_wait(
                self.topic,
                message.SerializeToString(),
                key=event.model_name.encode(),
                headers=protobuf_headers(message),
            )
            log.info(
                "lifecycle_event",
                event_id=event.event_id,
                type=models_pb2.ModelEventType.Name(event.type),
                model=event.model_name,
                version=event.version,
                alias=event.alias,
                served=",".join(
                    f"{s.alias}:v{s.version}:{s.traffic_percent}%" for s in event.served
                ),
            )
