"""Serving's health: SERVING only while a version is routable and Triton scores it.

Every ``interval_s`` the versions that answer callers (production, and a canary if any) get a
one-row inference. Readiness endpoints are not enough: Triton keeps reporting a model ready
after its Python-backend stub died, and only an inference shows that.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from services.serving.predictor import Predictor
from services.shared.logging import get_logger
from services.shared.retry import pause

log = get_logger("serving.health")


class ServingHealth:
    def __init__(
        self,
        predictor: Predictor,
        publish: Callable[[bool], Awaitable[None]],
        *,
        interval_s: float = 1.0,
        probe_timeout_s: float = 1.0,
    ) -> None:
        self._predictor = predictor
        self._publish = publish
        self._interval_s = interval_s
        self._probe_timeout_s = probe_timeout_s
        self.serving: bool | None = None

    async def check(self) -> bool:
        table = self._predictor.router.table
        if table is None:
            return await self._set(False, "no routable model version")
        for model in table.answering():
            error = await self._predictor.probe(model, self._probe_timeout_s)
            if error is not None:
                return await self._set(False, f"{model.alias} v{model.version}: {error.message}")
        return await self._set(True, table.describe())

    async def _set(self, serving: bool, reason: str) -> bool:
        if serving != self.serving:
            await self._publish(serving)
            log.info("health_changed", serving=serving, reason=reason)
            self.serving = serving
        return serving

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            await self.check()
            await pause(stop, self._interval_s)
