"""The platform's event topics the dashboard follows: monitoring.drift (DriftEvent) and
models.lifecycle (ModelEvent), read from the beginning without a consumer group (the
dashboard keeps no position: every start shows the recent history again), the most recent
``keep`` of each held in memory for the page."""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque

from aiokafka.errors import KafkaError
from google.protobuf.message import DecodeError

from services.shared.codecs import decode_protobuf
from services.shared.errors import PlatformError
from services.shared.kafka import create_consumer, ensure_topics
from services.shared.logging import get_logger
from services.shared.proto.mlops.v1 import models_pb2, monitoring_pb2
from services.shared.retry import pause
from services.shared.settings import KafkaSettings
from services.shared.topics import Topics

log = get_logger("dashboard")


class PlatformEvents:
    """Recent drift and lifecycle events, newest last."""

    def __init__(self, kafka: KafkaSettings, keep: int) -> None:
        self._kafka = kafka
        self._topics = Topics.from_settings(kafka)
        self._drift: deque[monitoring_pb2.DriftEvent] = deque(maxlen=keep)
        self._lifecycle: deque[models_pb2.ModelEvent] = deque(maxlen=keep)
        self.skipped = 0  # undecodable records (logged; they stay in the topic)
        self.connected = False

    def drift(self) -> list[monitoring_pb2.DriftEvent]:
        return list(reversed(self._drift))

    def lifecycle(self) -> list[models_pb2.ModelEvent]:
        return list(reversed(self._lifecycle))

    def add(self, topic: str, value: bytes | None) -> None:
        """Keep one record of either topic (the Kafka loop's and the tests' entry point)."""
        try:
            if topic == self._topics.drift:
                self._drift.append(decode_protobuf(value or b"", monitoring_pb2.DriftEvent))
            elif topic == self._topics.lifecycle:
                self._lifecycle.append(decode_protobuf(value or b"", models_pb2.ModelEvent))
        except DecodeError as exc:
            self.skipped += 1
            log.warning(
                "event_skipped", topic=topic, reason_code="malformed_protobuf", error=str(exc)
            )

    async def run(self, stop: asyncio.Event, *, retry_s: float = 5.0) -> None:
        """Follow both topics until ``stop``; a broker that is away is retried."""
        topics = [self._topics.drift, self._topics.lifecycle]
        while not stop.is_set():
            consumer = create_consumer(
                self._kafka, *topics, group_id=None, client_id="dashboard", max_poll_records=500
            )
            try:
                await ensure_topics(self._kafka, topics, timeout_s=retry_s)
                await consumer.start()
                # read again from the beginning: what was kept is replaced, not repeated
                self._drift.clear()
                self._lifecycle.clear()
                self.connected = True
                log.info("events_following", topics=",".join(topics))
                while not stop.is_set():
                    batches = await consumer.getmany(timeout_ms=500)
                    for records in batches.values():
                        for record in records:
                            self.add(record.topic, record.value)
            except (KafkaError, OSError) as exc:
                log.warning("events_unavailable", error=repr(exc))
            except PlatformError as exc:  # the broker did not answer in time: retried
                log.warning("events_unavailable", error=str(exc))
            finally:
                self.connected = False
                with contextlib.suppress(KafkaError, OSError):
                    await consumer.stop()
            await pause(stop, retry_s)
