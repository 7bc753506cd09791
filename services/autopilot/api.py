"""The loop's JSON API on the autopilot's metrics port (beside /metrics):

    GET  /api/v1/loop               the current state, the cycle in progress, the guardrails
    GET  /api/v1/loop/history       past cycles, newest first (?limit=N), with their evidence
    POST /api/v1/loop/pause         stop every automatic action      (Bearer registry token)
    POST /api/v1/loop/resume        carry on (also after a halt)     (Bearer registry token)

``mlops loop`` and the operator dashboard read it. Pause and resume take an optional JSON
body ``{"actor": ..., "reason": ...}``; both are recorded in the loop's events.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Annotated, Any

from fastapi import Body, FastAPI, Header, Query

from services.autopilot.loop import Autopilot
from services.shared.http_api import api_app, check_bearer


def build_api(autopilot: Autopilot, lock: asyncio.Lock, token: Callable[[], str]) -> FastAPI:
    app = api_app("mlops autopilot")

    @app.get("/api/v1/loop")
    async def loop_status() -> dict[str, Any]:
        return autopilot.status()

    @app.get("/api/v1/loop/history")
    async def loop_history(
        limit: Annotated[int, Query(ge=1, le=100)] = 20,
    ) -> dict[str, Any]:
        return {"cycles": autopilot.history(limit)}

    @app.post("/api/v1/loop/pause")
    async def pause(
        authorization: Annotated[str | None, Header()] = None,
        body: Annotated[dict[str, str] | None, Body()] = None,
    ) -> dict[str, Any]:
        check_bearer(authorization, token())
        async with lock:
            return autopilot.pause(_actor(body), (body or {}).get("reason", ""))

    @app.post("/api/v1/loop/resume")
    async def resume(
        authorization: Annotated[str | None, Header()] = None,
        body: Annotated[dict[str, str] | None, Body()] = None,
    ) -> dict[str, Any]:
        check_bearer(authorization, token())
        async with lock:
            return autopilot.resume(_actor(body), (body or {}).get("reason", ""))

    return app


def _actor(body: dict[str, str] | None) -> str:
    return (body or {}).get("actor", "") or "operator"
