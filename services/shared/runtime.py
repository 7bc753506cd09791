"""Process lifecycle shared by the services: logging, /metrics, signals, graceful stop.

Each service's ``main.py`` builds its objects from its settings and hands an async ``serve``
function to ``run_service``; ``serve`` runs until the ``stop`` event is set (SIGTERM/SIGINT)
and then shuts its parts down in order.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Awaitable, Callable

from prometheus_client import Gauge, start_http_server

from services.shared.logging import configure_logging, get_logger
from services.shared.settings import ServiceSettings

SERVICE_INFO = Gauge("mlops_service_info", "Which platform service this process is", ["service"])
SERVICE_READY = Gauge("mlops_service_ready", "1 when the service does its work", ["service"])

Serve = Callable[[asyncio.Event], Awaitable[None]]


def start_metrics(service: str, settings: ServiceSettings) -> int:
    """Serve Prometheus metrics over HTTP; returns the bound port."""
    server, _thread = start_http_server(settings.metrics_port, addr=settings.metrics_host)
    SERVICE_INFO.labels(service).set(1)
    SERVICE_READY.labels(service).set(0)
    return int(server.server_address[1])


def run_service(service: str, settings: ServiceSettings, serve: Serve) -> int:
    """Run ``serve`` under signal handling; returns the process exit code."""
    configure_logging(settings.log.level, settings.log.format)
    log = get_logger(service)
    port = start_metrics(service, settings)
    log.info("service_starting", service=service, metrics_port=port)

    async def _main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await serve(stop)

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
