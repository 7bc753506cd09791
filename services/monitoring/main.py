"""Wiring of the monitoring service from its settings (``python -m services.monitoring``)."""

from __future__ import annotations

import asyncio
from functools import partial

from prometheus_client import REGISTRY

from services.monitoring.prediction_metrics import PredictionLogMetrics
from services.monitoring.prediction_reader import PredictionLogReader
from services.monitoring.settings import MonitoringSettings
from services.shared.kafka import create_consumer, ensure_topics
from services.shared.logging import get_logger
from services.shared.runtime import SERVICE_READY, run_service
from services.shared.topics import Topics

SERVICE = "monitoring"
log = get_logger(SERVICE)


async def serve(settings: MonitoringSettings, stop: asyncio.Event) -> None:
    topics = Topics.from_settings(settings.kafka)
    # waiting for the broker must not delay a stop
    setup = asyncio.ensure_future(ensure_topics(settings.kafka, timeout_s=settings.start_timeout_s))
    stopping = asyncio.ensure_future(stop.wait())
    await asyncio.wait({setup, stopping}, return_when=asyncio.FIRST_COMPLETED)
    if not setup.done():
        setup.cancel()
        return
    stopping.cancel()
    setup.result()

    consumer = create_consumer(
        settings.kafka,
        topics.predictions,
        group_id=settings.group_id,
        client_id=SERVICE,
        max_poll_records=settings.max_poll_records,
    )
    reader = PredictionLogReader(
        consumer,
        PredictionLogMetrics(REGISTRY),
        group=settings.group_id,
        topic=topics.predictions,
        poll_timeout_ms=settings.poll_timeout_ms,
        max_records=settings.max_poll_records,
        lag_interval_s=settings.lag_interval_s,
    )
    await consumer.start()
    try:
        SERVICE_READY.labels(SERVICE).set(1)
        log.info("prediction_log_reading", topic=topics.predictions, group=settings.group_id)
        await reader.run(stop)
    finally:
        SERVICE_READY.labels(SERVICE).set(0)
        await consumer.stop()


def main() -> int:
    settings = MonitoringSettings()
    return run_service(SERVICE, settings, partial(serve, settings))
