"""HTTP transport of the dashboard: the page, its JSON API (OpenAPI at /openapi.json), the live
feed (server-sent events) and the operator actions. Routes only convert: the board
(board.py) computes, the tracer (services/shared/prediction_trace.py) traces, and
``PlatformError`` becomes its HTTP status here, in one handler.

Read-only by default: every GET reads; the actions (POST) need ``Authorization: Bearer
<registry token>``. When the dashboard knows the token it refuses a wrong one itself; either
way the component acting (registry, autopilot) checks it again.
"""

from __future__ import annotations

import asyncio
import hmac
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Annotated, Any

import plotly
from fastapi import Depends, FastAPI, Request
from fastapi import Path as PathParam
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CollectorRegistry, Counter, Histogram
from pydantic import BaseModel, Field

from services.dashboard.board import ActionResult, Board, ModelsPanel, OperatorBoard
from services.shared.errors import NotFound, PermissionDenied, PlatformError, Unauthenticated
from services.shared.logging import get_logger
from services.shared.prediction_trace import PredictionTrace, PredictionTracer

log = get_logger("dashboard")
STATIC = Path(__file__).parent / "static"
PLOTLY_JS = Path(plotly.__file__).parent / "package_data" / "plotly.min.js"
TRANSACTION_ID = r"^[A-Za-z0-9][A-Za-z0-9._:\-]{0,63}$"


class BoardFeed:
    """The latest board, recomputed at most once per interval whoever asks (the page's
    streams and the JSON API share one computation); nothing runs while nobody asks."""

    def __init__(self, board: OperatorBoard, interval_s: float, registry: CollectorRegistry):
        self.board = board
        self.interval_s = interval_s
        self._latest: Board | None = None
        self._lock = asyncio.Lock()
        self.subscribers = 0
        self._seconds = Histogram(
            "mlops_dashboard_board_seconds",
            "Time to compute the board from every source",
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
            registry=registry,
        )

    async def latest(self) -> Board:
        async with self._lock:
            if self._latest is None or time.time() - self._latest.generated_at >= self.interval_s:
                with self._seconds.time():
                    self._latest = await self.board.snapshot()
            return self._latest

    async def stream(self) -> AsyncIterator[str]:
        self.subscribers += 1
        try:
            while True:
                started = time.monotonic()
                board = await self.latest()
                yield f"event: board\ndata: {board.model_dump_json()}\n\n"
                await asyncio.sleep(max(0.05, self.interval_s - (time.monotonic() - started)))
        finally:
            self.subscribers -= 1


class ActionRequest(BaseModel):
    reason: str = Field(
        ..., min_length=1, max_length=500, description="Why (recorded with the action)."
    )


class Health(BaseModel):
    status: str
    events_connected: bool = Field(description="Following monitoring.drift/models.lifecycle.")
    page_streams: int = Field(description="Pages connected to the live feed now.")


class ErrorBody(BaseModel):
    error: str
    message: str


_bearer = HTTPBearer(auto_error=False, description="The registry token (actions only).")
Credentials = Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]


async def _caller_token(request: Request, credentials: Credentials) -> str:
    """The caller's bearer token, checked against the registry token the app was given ('':
    the acting component checks it). A dependency: a call without the token is refused (401)
    before its body is read, so such a caller learns nothing about the body (no 422)."""
    if credentials is None or not credentials.credentials:
        raise Unauthenticated("this action needs the registry token: Authorization: Bearer …")
    expected: str = request.app.state.action_token
    if expected and not hmac.compare_digest(credentials.credentials.encode(), expected.encode()):
        raise PermissionDenied("the bearer token is not the registry token")
    return credentials.credentials


Token = Annotated[str, Depends(_caller_token)]
_ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorBody, "description": "No bearer token."},
    403: {"model": ErrorBody, "description": "Wrong token."},
    409: {"model": ErrorBody, "description": "Not possible in the current state."},
    503: {"model": ErrorBody, "description": "The component acting cannot be reached."},
}


def create_app(
    board: OperatorBoard,
    tracer: PredictionTracer,
    *,
    token: str,
    interval_s: float,
    events_connected: Callable[[], bool] = lambda: False,
    metrics: CollectorRegistry | None = None,
) -> FastAPI:
    """``token``: the registry token the actions must carry ('' : the acting component
    alone checks it); ``metrics``: where the dashboard's own metrics go (served by main.py on
    its metrics port)."""
    metrics = metrics if metrics is not None else CollectorRegistry()
    feed = BoardFeed(board, interval_s, metrics)
    requests = Counter(
        "mlops_dashboard_requests_total",
        "Dashboard HTTP requests, by route and status",
        ["route", "status"],
        registry=metrics,
    )
    app = FastAPI(
        title="MLOps operator dashboard",
        version="1",
        description="What the operator page shows, as JSON; read-only except the actions, "
        "which need the registry token as a bearer token. The page's live feed is "
        "GET /api/v1/stream (server-sent events, one `board` event per refresh).",
    )

    @app.exception_handler(PlatformError)
    async def _platform_error(request: Request, exc: PlatformError) -> JSONResponse:
        status = exc.http_status if exc.http_status != 500 else 502  # a remote's failure
        log.warning("request_failed", path=request.url.path, error=exc.code, message=str(exc))
        return JSONResponse({"error": exc.code, "message": str(exc)}, status_code=status)

    @app.middleware("http")
    async def _count(request: Request, call_next):  # type: ignore[no-untyped-def]
        response = await call_next(request)
        route = request.scope.get("route")
        requests.labels(getattr(route, "path", "other"), str(response.status_code)).inc()
        return response

    # ----------------------------------------------------------------- the page
    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type="text/html")

    @app.get("/static/plotly.min.js", include_in_schema=False)
    async def plotly_js() -> FileResponse:
        return FileResponse(PLOTLY_JS, media_type="text/javascript")

    @app.get("/static/{name}", include_in_schema=False)
    async def static(name: str) -> FileResponse:
        path = STATIC / name
        if name not in {"dashboard.js", "dashboard.css"} or not path.is_file():
            raise NotFound(f"no static file {name!r}")
        media = "text/javascript" if name.endswith(".js") else "text/css"
        return FileResponse(path, media_type=media)

    @app.get("/api/v1/stream", include_in_schema=False)
    async def stream() -> StreamingResponse:
        return StreamingResponse(
            feed.stream(),
            media_type="text/event-stream",
            headers={"cache-control": "no-cache", "x-accel-buffering": "no"},
        )

    # ----------------------------------------------------------------- JSON API
    @app.get("/healthz", response_model=Health, tags=["health"])
    async def healthz() -> Health:
        return Health(
            status="ok", events_connected=bool(events_connected()), page_streams=feed.subscribers
        )

    @app.get("/api/v1/board", response_model=Board, tags=["board"])
    async def get_board() -> Board:
        """Everything the page shows, at most one refresh interval old."""
        return await feed.latest()

    @app.get("/api/v1/models", response_model=ModelsPanel, tags=["board"])
    async def get_models() -> ModelsPanel:
        """Model versions with stage, aliases, traffic share and observed answers."""
        return (await feed.latest()).models

    @app.get(
        "/api/v1/trace/{transaction_id}",
        response_model=PredictionTrace,
        tags=["trace"],
        responses={404: {"model": ErrorBody, "description": "No such prediction."}},
    )
    async def trace(
        transaction_id: Annotated[str, PathParam(pattern=TRANSACTION_ID)],
    ) -> PredictionTrace:
        """One prediction end to end: answer, version and route, the features serving used,
        the label, the version's lineage and an offline point-in-time recomputation of the
        features with every difference (training-serving skew for this request)."""
        return await tracer.trace(transaction_id)

    @app.post(
        "/api/v1/actions/loop/pause",
        response_model=ActionResult,
        tags=["actions"],
        responses=_ERRORS,
    )
    async def pause(token: Token, body: ActionRequest) -> ActionResult:
        """Pause the improvement loop (the autopilot stops starting new cycles)."""
        return await board.pause_loop(token, body.reason)

    @app.post(
        "/api/v1/actions/loop/resume",
        response_model=ActionResult,
        tags=["actions"],
        responses=_ERRORS,
    )
    async def resume(token: Token, body: ActionRequest) -> ActionResult:
        """Resume the improvement loop."""
        return await board.resume_loop(token, body.reason)

    @app.post(
        "/api/v1/actions/rollback", response_model=ActionResult, tags=["actions"], responses=_ERRORS
    )
    async def rollback(token: Token, body: ActionRequest) -> ActionResult:
        """Make the previous production version production again."""
        return await board.rollback(token, body.reason)

    app.state.feed = feed
    app.state.action_token = token
    return app
