"""Wires the autopilot from its settings: the registry client, training.requests producer,
monitoring's and Prometheus's APIs, the loop, the Kafka reader of monitoring.drift,
models.lifecycle and training.results, the timer, and the JSON API with /metrics
(``python -m services.autopilot``)."""

from __future__ import annotations

import asyncio

from services.autopilot.api import build_api
from services.autopilot.loop import Autopilot
from services.autopilot.settings import AutopilotSettings
from services.autopilot.state import StateFile
from services.autopilot.transports import (
    GrpcRegistry,
    KafkaTrainingRequests,
    LiveEvidence,
    LoopEvents,
)
from services.shared.http_api import HttpApi
from services.shared.kafka import ensure_topics
from services.shared.logging import get_logger
from services.shared.retry import ticks
from services.shared.runtime import SERVICE_READY, run_service
from services.shared.topics import Topics

SERVICE = "autopilot"
log = get_logger(SERVICE)


async def _ticks(
    autopilot: Autopilot, stop: asyncio.Event, lock: asyncio.Lock, tick_s: float
) -> None:
    async for _ in ticks(stop, tick_s):
        try:
            async with lock:
                await autopilot.tick()
        except Exception as exc:  # the timer must outlive any one failure
            log.exception("tick_crashed", error=type(exc).__name__)


async def serve(settings: AutopilotSettings, stop: asyncio.Event) -> None:
    topics = Topics.from_settings(settings.kafka)
    registry = GrpcRegistry(settings.registry)
    training = KafkaTrainingRequests(settings.kafka)
    evidence = LiveEvidence(
        settings.monitoring_url,
        settings.prometheus_url,
        settings.registry.model_name,
        timeout_s=settings.http_timeout_s,
    )
    autopilot = Autopilot(
        settings.policy(), registry, training, evidence, StateFile(settings.state_path)
    )
    lock = asyncio.Lock()
    api = HttpApi(
        build_api(autopilot, lock, settings.registry.bearer_token),
        settings.metrics_host,
        settings.metrics_port,
    )
    await api.start()
    try:
        await ensure_topics(
            settings.kafka,
            [topics.drift, topics.lifecycle, topics.training_requests, topics.training_results],
        )
        await training.start()
        events = LoopEvents(settings.kafka, settings.group_id, autopilot)
        await events.start()
        try:
            await autopilot.start()
            SERVICE_READY.labels(SERVICE).set(1)
            log.info(
                "autopilot_ready",
                phase=autopilot.phase,
                paused=autopilot.state.paused,
                halted=autopilot.state.halted,
                production=autopilot.state.production_version,
                state_file=str(settings.state_path),
                api_port=api.port,
            )
            await asyncio.gather(
                events.run(stop, lock), _ticks(autopilot, stop, lock, settings.tick_s)
            )
        finally:
            SERVICE_READY.labels(SERVICE).set(0)
            await events.stop()
            await training.stop()
    finally:
        await api.stop()
        await evidence.close()
        await registry.close()


def main() -> int:
    settings = AutopilotSettings()
    return run_service(SERVICE, settings, lambda stop: serve(settings, stop), metrics_server=False)
