"""Where the dashboard reads from: Prometheus' HTTP API, the JSON APIs of monitoring and the
autopilot, and the registry's gRPC API. Each source turns its failures into the platform's
``Unavailable`` (or the error the remote side gave), so the board can say per panel what it
waits for instead of failing as a whole.
"""

from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass
from typing import Any

import httpx
from pydantic import SecretStr

from services.shared.errors import (
    InvalidArgument,
    NotFound,
    PermissionDenied,
    PlatformError,
    Unauthenticated,
    Unavailable,
)
from services.shared.proto.mlops.v1 import models_pb2
from services.shared.registry_client import RegistryClient
from services.shared.settings import RegistryClientSettings


@dataclass(frozen=True)
class Sample:
    """One series of a range query: its labels and (epoch seconds, value) points."""

    labels: dict[str, str]
    points: list[tuple[float, float | None]]


def _number(text: str) -> float | None:
    value = float(text)
    return value if math.isfinite(value) else None  # NaN (0/0 rates) and Inf: a gap


class PrometheusSource:
    """Range and instant queries against Prometheus' HTTP API."""

    def __init__(self, client: httpx.AsyncClient, url: str) -> None:
        self._client = client
        self._url = url.rstrip("/")

    async def _get(self, path: str, params: dict[str, str]) -> Any:
        try:
            response = await self._client.get(f"{self._url}{path}", params=params)
        except httpx.HTTPError as exc:
            raise Unavailable(f"Prometheus at {self._url}: {exc!r}") from None
        try:
            body = response.json()
        except ValueError:
            raise Unavailable(
                f"Prometheus at {self._url} answered {response.status_code} without JSON"
            ) from None
        if body.get("status") != "success":
            raise InvalidArgument(
                "promql", f"{body.get('errorType', 'error')}: {body.get('error', body)}"
            )
        return body["data"]

    async def query_range(self, promql: str, start: float, end: float, step: float) -> list[Sample]:
        data = await self._get(
            "/api/v1/query_range",
            {"query": promql, "start": f"{start:.3f}", "end": f"{end:.3f}", "step": f"{step:g}"},
        )
        return [
            Sample(dict(r["metric"]), [(float(t), _number(v)) for t, v in r["values"]])
            for r in data["result"]
        ]

    async def query(self, promql: str) -> list[Sample]:
        data = await self._get("/api/v1/query", {"query": promql})
        if data["resultType"] != "vector":
            raise InvalidArgument("promql", f"expected a vector, got {data['resultType']}")
        return [
            Sample(dict(r["metric"]), [(float(r["value"][0]), _number(r["value"][1]))])
            for r in data["result"]
        ]

    async def metric_names(self) -> set[str]:
        data = await self._get("/api/v1/label/__name__/values", {})
        return set(data)


class JsonApi:
    """GET/POST against a service's JSON API (monitoring's, the autopilot's)."""

    def __init__(self, client: httpx.AsyncClient, url: str, name: str) -> None:
        self._client = client
        self.url = url.rstrip("/")
        self.name = name

    async def request(
        self, method: str, path: str, *, token: str = "", body: dict[str, Any] | None = None
    ) -> Any:
        headers = {"authorization": f"Bearer {token}"} if token else {}
        try:
            response = await self._client.request(
                method, f"{self.url}{path}", headers=headers, json=body
            )
        except httpx.HTTPError as exc:
            raise Unavailable(f"{self.name} API at {self.url}: {exc!r}") from None
        if response.status_code == 404:
            raise NotFound(f"{self.name} API at {self.url} has no {path} (not built yet?)")
        if response.status_code == 401:
            raise Unauthenticated(f"{self.name}: {response.text[:200]}")
        if response.status_code == 403:
            raise PermissionDenied(f"{self.name}: {response.text[:200]}")
        if response.status_code >= 400:
            raise PlatformError(
                f"{self.name} API answered {response.status_code} to {method} {path}: "
                f"{response.text[:200]}"
            )
        try:
            return response.json()
        except ValueError:
            raise Unavailable(f"{self.name} API answered {path} without JSON") from None


class RegistrySource:
    """The registry's versions (blocking gRPC client, run in a thread)."""

    def __init__(self, settings: RegistryClientSettings, timeout_s: float) -> None:
        self.settings = settings
        self._timeout_s = timeout_s
        self._client = RegistryClient(settings, actor="dashboard", timeout_s=timeout_s)

    def close(self) -> None:
        self._client.close()

    @property
    def model_name(self) -> str:
        return self.settings.model_name

    async def versions(self) -> list[models_pb2.ModelVersion]:
        return await asyncio.to_thread(self._client.list_versions)

    async def lineage(self, version: int) -> models_pb2.Lineage:
        return await asyncio.to_thread(self._client.lineage, version)

    async def rollback(self, token: str, reason: str, actor: str) -> models_pb2.ModelVersion:
        """Rollback with the caller's token (the registry decides whether it is valid)."""
        settings = self.settings.model_copy(update={"token": SecretStr(token)})

        def call() -> models_pb2.ModelVersion:
            with RegistryClient(settings, actor=actor, timeout_s=self._timeout_s) as client:
                return client.rollback(reason)

        return await asyncio.to_thread(call)
