"""Wiring of the operator dashboard from its settings (``python -m services.dashboard``):
the sources, the board, the tracer, the event feed and uvicorn serving the FastAPI app."""

from __future__ import annotations

import asyncio
import contextlib

import httpx
import uvicorn
from prometheus_client import REGISTRY

from services.dashboard.app import create_app
from services.dashboard.board import OperatorBoard
from services.dashboard.events import PlatformEvents
from services.dashboard.settings import DashboardSettings
from services.dashboard.sources import JsonApi, PrometheusSource, RegistrySource
from services.shared.logging import configure_logging, get_logger
from services.shared.prediction_trace import PredictionTracer
from services.shared.runtime import start_metrics

SERVICE = "dashboard"
log = get_logger(SERVICE)


async def serve(settings: DashboardSettings) -> None:
    http = httpx.AsyncClient(timeout=settings.source_timeout_s)
    registry = RegistrySource(settings.registry, settings.registry_timeout_s)
    events = PlatformEvents(settings.kafka, settings.recent_events)
    board = OperatorBoard(
        PrometheusSource(http, settings.prometheus_url),
        JsonApi(http, settings.monitoring_api_url, "monitoring"),
        JsonApi(http, settings.autopilot_api_url, "autopilot"),
        registry,
        events,
        rate_window=settings.rate_window,
        window_s=settings.window_s,
        step_s=settings.step_s,
        registry_refresh_s=settings.registry_refresh_s,
    )
    tracer = PredictionTracer(
        settings.kafka,
        settings.storage,
        settings.feast,
        settings.redis,
        settings.registry,
        timeout_s=settings.trace_timeout_s,
    )
    app = create_app(
        board,
        tracer,
        token=settings.registry.bearer_token(),
        interval_s=settings.refresh_interval_s,
        events_connected=lambda: events.connected,
        metrics=REGISTRY,
    )
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            host=settings.host,
            port=settings.port,
            log_config=None,  # our structured logging (configure_logging) handles uvicorn's
            access_log=False,
            timeout_graceful_shutdown=2,  # open live feeds end with the process
        )
    )
    stop = asyncio.Event()
    following = asyncio.create_task(events.run(stop))
    log.info("service_starting", service=SERVICE, address=f"http://{settings.host}:{settings.port}")
    try:
        await server.serve()  # until SIGTERM/SIGINT (uvicorn's handlers)
    finally:
        stop.set()
        with contextlib.suppress(asyncio.CancelledError):
            await following
        await http.aclose()
        registry.close()
        log.info("service_stopped", service=SERVICE)


def main() -> int:
    settings = DashboardSettings()
    configure_logging(settings.log.level, settings.log.format)
    start_metrics(SERVICE, settings)
    try:
        asyncio.run(serve(settings))
    except Exception:  # a crash: logged once, non-zero exit, the supervisor restarts us
        log.exception("service_crashed", service=SERVICE)
        return 1
    return 0
