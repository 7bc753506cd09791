"""A service's HTTP API on its metrics port: a FastAPI app served by uvicorn inside the
service's own event loop, with Prometheus's /metrics beside the API's routes.

Platform errors become JSON answers with their HTTP status (``{"error": code, "detail": ...}``),
mapped once here. Signals stay with ``services.shared.runtime`` (uvicorn's own handlers are not
installed), so the service stops in its own order.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
from collections.abc import Generator

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

from services.shared.errors import PlatformError, Unauthenticated


def api_app(title: str) -> FastAPI:
    """A FastAPI app with /metrics mounted and platform errors mapped to their status."""
    app = FastAPI(title=title, docs_url=None, redoc_url=None, openapi_url=None)

    @app.get("/metrics")
    def _metrics() -> Response:  # sync: runs in a worker thread, as collecting may take a while
        return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)

    @app.exception_handler(PlatformError)
    async def _platform_error(request: Request, exc: PlatformError) -> JSONResponse:
        del request
        return JSONResponse({"error": exc.code, "detail": exc.message}, exc.http_status)

    return app


def check_bearer(authorization: str | None, token: str) -> None:
    """``authorization: Bearer <token>`` or ``Unauthenticated`` (401)."""
    if not token:
        raise Unauthenticated("no control-plane token is configured: mutating calls are refused")
    scheme, _, given = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.encode(), token.encode()):
        raise Unauthenticated("needs 'authorization: Bearer <registry token>'")


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield  # the service's runtime owns SIGTERM/SIGINT


class HttpApi:
    def __init__(self, app: FastAPI, host: str, port: int) -> None:
        self.server = _Server(
            uvicorn.Config(
                app,
                host=host,
                port=port,
                log_config=None,
                access_log=False,
                lifespan="off",
                ws="none",
            )
        )
        self._task: asyncio.Task[None] | None = None

    async def start(self, timeout_s: float = 10.0) -> None:
        self._task = asyncio.create_task(self.server.serve(), name="http-api")
        deadline = asyncio.get_running_loop().time() + timeout_s
        while not self.server.started:
            if self._task.done():
                self._task.result()  # raises what stopped it (the port is taken, ...)
                raise RuntimeError("the HTTP API stopped while starting")
            if asyncio.get_running_loop().time() > deadline:
                raise TimeoutError("the HTTP API did not start")
            await asyncio.sleep(0.02)

    @property
    def port(self) -> int:
        servers = getattr(self.server, "servers", [])
        for server in servers:
            for sock in server.sockets:
                return int(sock.getsockname()[1])
        return int(self.server.config.port)

    async def stop(self) -> None:
        if self._task is None:
            return
        self.server.should_exit = True
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self._task = None
