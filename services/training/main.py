"""Wires the training service from its settings: MLflow tracker, registry client, pipeline,
and the Kafka consumer of training.requests."""

from __future__ import annotations

import asyncio

from services.shared.kafka import ensure_topics
from services.shared.logging import get_logger
from services.shared.registry_client import RegistryClient
from services.shared.runtime import run_service, set_ready
from services.shared.topics import Topics
from services.training.consumer import TrainingRequestConsumer
from services.training.pipeline import TrainingPipeline
from services.training.settings import TrainingSettings
from services.training.tracking import ExperimentTracker

log = get_logger("training")


def build_pipeline(settings: TrainingSettings, *, actor: str = "training") -> TrainingPipeline:
    registry = RegistryClient(settings.registry, actor=actor) if settings.register_models else None
    return TrainingPipeline(settings, ExperimentTracker(settings.mlflow), registry)


async def serve(settings: TrainingSettings, stop: asyncio.Event) -> None:
    topics = Topics.from_settings(settings.kafka)
    await ensure_topics(settings.kafka, [topics.training_requests, topics.training_results])
    consumer = TrainingRequestConsumer(settings, build_pipeline(settings))
    set_ready("training", True)
    try:
        await consumer.run(stop)
    finally:
        set_ready("training", False)


def main() -> int:
    settings = TrainingSettings()
    return run_service("training", settings, lambda stop: serve(settings, stop))
