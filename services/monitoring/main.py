"""Wiring of the monitoring service from its settings (``python -m services.monitoring``)."""

from __future__ import annotations

import asyncio
from functools import partial

from aiokafka.coordinator.assignors.range import RangePartitionAssignor
from prometheus_client import REGISTRY

from services.monitoring.api import create_app
from services.monitoring.drift import DriftConfig
from services.monitoring.live_metrics import LiveMetrics
from services.monitoring.monitor import LiveMonitor, MonitorConfig
from services.monitoring.prediction_metrics import PredictionLogMetrics
from services.monitoring.reader import MonitoringReader
from services.monitoring.references import MlflowReferences
from services.monitoring.settings import MonitoringSettings
from services.monitoring.skew import skew_sampler
from services.shared.http_api import HttpApi
from services.shared.kafka import (
    committed_offsets,
    create_consumer,
    create_producer,
    ensure_topics,
)
from services.shared.logging import get_logger
from services.shared.runtime import run_service, set_ready
from services.shared.topics import Topics

SERVICE = "monitoring"
log = get_logger(SERVICE)


def monitor_config(settings: MonitoringSettings) -> MonitorConfig:
    return MonitorConfig(
        drift=DriftConfig(
            inputs=settings.drift_inputs,
            false_alarms_per_million=settings.drift_false_alarms_per_million,
            input_shift=settings.drift_input_shift,
            pooled_shift=settings.drift_pooled_shift,
            concept_shift=settings.drift_concept_shift,
            concept_warmup=settings.drift_concept_warmup,
            rank_shift=settings.drift_rank_shift,
            rank_warmup=settings.drift_rank_warmup,
            rank_window=settings.drift_rank_window,
            data_warmup=settings.drift_data_warmup,
            calibration_events=settings.drift_calibration_events,
            moved_input_sd=settings.drift_moved_input_sd,
        ),
        join_max_wait_s=settings.join_max_wait_s,
        join_max_pending=settings.join_max_pending,
        label_linger_s=settings.label_linger_s,
        window_s=settings.window_s,
        window_max=settings.window_max,
        min_labelled=settings.min_labelled,
        min_positives=settings.min_positives,
        paired_capacity=settings.paired_capacity,
        cooldown_s=settings.drift_cooldown_s,
    )


async def serve(settings: MonitoringSettings, stop: asyncio.Event) -> None:
    topics = Topics.from_settings(settings.kafka)
    monitor = LiveMonitor(monitor_config(settings), LiveMetrics(REGISTRY))
    http = HttpApi(create_app(monitor), settings.metrics_host, settings.metrics_port)
    await http.start()
    try:
        await _consume(settings, topics, monitor, stop)
    finally:
        await http.stop()


async def _consume(
    settings: MonitoringSettings, topics: Topics, monitor: LiveMonitor, stop: asyncio.Event
) -> None:
    # waiting for the broker must not delay a stop
    setup = asyncio.ensure_future(ensure_topics(settings.kafka, timeout_s=settings.start_timeout_s))
    stopping = asyncio.ensure_future(stop.wait())
    await asyncio.wait({setup, stopping}, return_when=asyncio.FIRST_COMPLETED)
    if not setup.done():
        setup.cancel()
        return
    stopping.cancel()
    setup.result()

    # subscribed below, with the reader told of each assignment (where counting stopped)
    consumer = create_consumer(
        settings.kafka,
        group_id=settings.group_id,
        client_id=SERVICE,
        max_poll_records=settings.max_poll_records,
        batching_wait_ms=settings.fetch_wait_ms,
        # partition N of both topics to the same member: the join needs both sides
        partition_assignment_strategy=(RangePartitionAssignor,),
    )
    producer = create_producer(settings.kafka, client_id=SERVICE)
    references = MlflowReferences(settings.mlflow)
    skew = skew_sampler(REGISTRY)
    reader = MonitoringReader(
        consumer,
        producer,
        PredictionLogMetrics(REGISTRY),
        monitor,
        references.load,
        partial(committed_offsets, settings.kafka, settings.group_id),
        group=settings.group_id,
        predictions_topic=topics.predictions,
        labels_topic=topics.validated_labels,
        drift_topic=topics.drift,
        poll_timeout_ms=settings.poll_timeout_ms,
        max_records=settings.max_poll_records,
        commit_interval_s=settings.commit_interval_s,
        tick_interval_s=settings.tick_interval_s,
        lag_interval_s=settings.lag_interval_s,
        use_training_reference=settings.drift_use_training_reference,
        skew=skew[0] if skew else None,
        skew_interval_s=skew[1] if skew else 0.0,
    )
    consumer.subscribe([topics.predictions, topics.validated_labels], listener=reader)
    await producer.start()
    await consumer.start()
    try:
        set_ready(SERVICE, True)
        log.info(
            "monitoring_reading",
            predictions=topics.predictions,
            labels=topics.validated_labels,
            drift=topics.drift,
            group=settings.group_id,
            drift_inputs=",".join(settings.drift_inputs),
            false_alarms_per_million=settings.drift_false_alarms_per_million,
        )
        await reader.run(stop)
    finally:
        set_ready(SERVICE, False)
        await consumer.stop()
        await producer.stop()


def main() -> int:
    settings = MonitoringSettings()
    return run_service(SERVICE, settings, partial(serve, settings), metrics_server=False)
