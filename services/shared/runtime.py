"""Process lifecycle shared by the services: logging, /metrics, signals, graceful stop.

Each service's ``main.py`` builds its objects from its settings and hands an async ``serve``
function to ``run_service``; ``serve`` runs until the ``stop`` event is set (SIGTERM/SIGINT)
and then shuts its parts down in order.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections.abc import Awaitable, Callable

import psutil
from prometheus_client import Gauge, start_http_server

from services.shared.logging import configure_logging, get_logger
from services.shared.settings import ServiceSettings

SERVICE_INFO = Gauge("mlops_service_info", "Which platform service this process is", ["service"])
SERVICE_READY = Gauge("mlops_service_ready", "1 when the service does its work", ["service"])
SERVICE_STARTUP = Gauge(
    "mlops_service_startup_seconds",
    "Seconds from this process's spawn to the first time it was ready",
    ["service"],
)
_ever_ready: set[str] = set()


def set_ready(service: str, ready: bool) -> None:
    """Say whether the service does its work; the first time it does, report how long the
    process took from its spawn (``service_ready startup_s=...`` and
    ``mlops_service_startup_seconds``)."""
    SERVICE_READY.labels(service).set(1 if ready else 0)
    if ready and service not in _ever_ready:
        _ever_ready.add(service)
        seconds = max(time.time() - psutil.Process().create_time(), 0.0)
        SERVICE_STARTUP.labels(service).set(seconds)
        get_logger(service).info("service_ready", service=service, startup_s=round(seconds, 2))


Serve = Callable[[asyncio.Event], Awaitable[None]]


def start_metrics(service: str, settings: ServiceSettings) -> int:
    """Serve Prometheus metrics over HTTP; returns the bound port."""
    server, _thread = start_http_server(settings.metrics_port, addr=settings.metrics_host)
    SERVICE_INFO.labels(service).set(1)
    SERVICE_READY.labels(service).set(0)
    return int(server.server_address[1])


def run_service(
    service: str, settings: ServiceSettings, serve: Serve, *, metrics_server: bool = True
) -> int:
    """Run ``serve`` under signal handling; returns the process exit code.

    ``metrics_server=False``: the service serves /metrics itself (beside its own HTTP API,
    with ``prometheus_client.make_asgi_app``) on ``settings.metrics_port``."""
    configure_logging(settings.log.level, settings.log.format)
    log = get_logger(service)
    if metrics_server:
        port = start_metrics(service, settings)
    else:
        SERVICE_INFO.labels(service).set(1)
        SERVICE_READY.labels(service).set(0)
        port = settings.metrics_port
    log.info("service_starting", service=service, metrics_port=port)

    async def _main() -> None:
        from services.shared.kafka import keep_topics

        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        # every service puts the contract's topics back if the broker lost them
        keeper = asyncio.create_task(keep_topics(settings.kafka, stop), name="keep-topics")
        try:
            await serve(stop)
        finally:
            stop.set()
            await keeper

    try:
        with contextlib.suppress(ImportError):
            import uvloop

            asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
        asyncio.run(_main())
    except Exception:  # a crash: logged once, non-zero exit, the supervisor restarts us
        log.exception("service_crashed", service=service)
        return 1
    log.info("service_stopped", service=service)
    return 0
