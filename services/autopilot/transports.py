"""The autopilot's thin transports: the registry over gRPC, training.requests and the two
topics it follows over Kafka, monitoring's and Prometheus's HTTP APIs. Each converts messages
and errors (to the platform's ``PlatformError``s) and hands on to ``Autopilot``."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Any

import grpc
import httpx
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.errors import KafkaError
from google.protobuf.message import DecodeError

from services.autopilot.judges import VersionHealth
from services.autopilot.loop import ACTOR, Autopilot, PairedData
from services.shared.codecs import protobuf_headers
from services.shared.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    PlatformError,
    Unauthenticated,
    Unavailable,
)
from services.shared.kafka import create_consumer, create_producer
from services.shared.logging import get_logger
from services.shared.model_aliases import alias_role
from services.shared.proto.mlops.v1 import (
    models_pb2,
    monitoring_pb2,
    registry_pb2,
    registry_pb2_grpc,
)
from services.shared.settings import KafkaSettings, RegistryClientSettings
from services.shared.topics import Topics

log = get_logger("autopilot")

ACTOR_METADATA = "x-mlops-actor"  # the registry records it on its ModelEvents
_GRPC_ERRORS: dict[grpc.StatusCode, type[PlatformError]] = {
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPrecondition,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: Unavailable,
}


def _platform_error(exc: grpc.aio.AioRpcError) -> PlatformError:
    code, detail = exc.code(), exc.details() or exc.code().name
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return InvalidArgument("", detail)
    return _GRPC_ERRORS.get(code, PlatformError)(f"registry: {detail}")


class GrpcRegistry:
    """``mlops.v1.ModelRegistry`` as the autopilot uses it (actor ``autopilot``)."""

    def __init__(self, settings: RegistryClientSettings, *, timeout_s: float = 60.0) -> None:
        self.settings = settings
        self.timeout_s = timeout_s
        self._channel = grpc.aio.insecure_channel(settings.address)
        self._stub = registry_pb2_grpc.ModelRegistryStub(self._channel)

    async def close(self) -> None:
        await self._channel.close()

    def _metadata(self) -> list[tuple[str, str]]:
        token = self.settings.bearer_token()
        if not token:
            raise Unauthenticated(
                "no registry token (MLOPS_REGISTRY_CLIENT_TOKEN or its token file): the "
                "autopilot cannot move traffic"
            )
        return [(ACTOR_METADATA, ACTOR), ("authorization", f"Bearer {token}")]

    async def set_alias(
        self, alias: str, version: int, *, traffic_percent: int = 0, reason: str = ""
    ) -> None:
        try:
            await self._stub.SetAlias(
                registry_pb2.SetAliasRequest(
                    model_name=self.settings.model_name,
                    version=version,
                    alias=alias_role(alias),
                    traffic_percent=traffic_percent,
                    reason=reason,
                ),
                metadata=self._metadata(),
                timeout=self.timeout_s,
            )
        except grpc.aio.AioRpcError as exc:
            raise _platform_error(exc) from None

    async def rollback(self, reason: str) -> None:
        try:
            await self._stub.Rollback(
                registry_pb2.RollbackRequest(model_name=self.settings.model_name, reason=reason),
                metadata=self._metadata(),
                timeout=self.timeout_s,
            )
        except grpc.aio.AioRpcError as exc:
            raise _platform_error(exc) from None

    async def training_request_id(self, version: int) -> str:
        try:
            lineage = await self._stub.GetLineage(
                registry_pb2.GetLineageRequest(
                    model_name=self.settings.model_name, version=version
                ),
                timeout=self.timeout_s,
            )
        except grpc.aio.AioRpcError as exc:
            raise _platform_error(exc) from None
        return str(lineage.training_request_id)

    async def production_version(self) -> int:
        try:
            version = await self._stub.GetModelVersion(
                registry_pb2.GetModelVersionRequest(
                    model_name=self.settings.model_name, alias=models_pb2.MODEL_ALIAS_PRODUCTION
                ),
                timeout=self.timeout_s,
            )
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                return 0
            raise _platform_error(exc) from None
        return int(version.version)


class KafkaTrainingRequests:
    """RetrainRequests on training.requests, keyed by model name."""

    def __init__(self, kafka: KafkaSettings) -> None:
        self.topic = Topics.from_settings(kafka).training_requests
        self._producer: AIOKafkaProducer = create_producer(kafka, client_id=ACTOR, linger_ms=0)

    async def start(self) -> None:
        await self._producer.start()

    async def stop(self) -> None:
        await self._producer.stop()

    async def send(self, request: monitoring_pb2.RetrainRequest) -> None:
        try:
            await self._producer.send_and_wait(
                self.topic,
                request.SerializeToString(),
                key=request.model_name.encode(),
                headers=protobuf_headers(request),
            )
        except KafkaError as exc:
            raise Unavailable(f"training.requests: {exc}") from exc


class LiveEvidence:
    """Monitoring's JSON API and Prometheus's query API."""

    def __init__(
        self, monitoring_url: str, prometheus_url: str, model_name: str, *, timeout_s: float
    ) -> None:
        self.model_name = model_name
        self._monitoring = httpx.AsyncClient(base_url=monitoring_url, timeout=timeout_s)
        self._prometheus = httpx.AsyncClient(base_url=prometheus_url, timeout=timeout_s)

    async def close(self) -> None:
        await self._monitoring.aclose()
        await self._prometheus.aclose()

    async def _get(self, client: httpx.AsyncClient, path: str, params: dict[str, Any]) -> Any:
        try:
            response = await client.get(path, params=params)
        except httpx.HTTPError as exc:
            raise Unavailable(f"{client.base_url}{path}: {exc}") from exc
        if response.status_code != 200:
            raise Unavailable(
                f"{client.base_url}{path} answered {response.status_code}: {response.text[:200]}"
            )
        try:
            return response.json()
        except ValueError as exc:
            raise Unavailable(f"{client.base_url}{path}: not JSON") from exc

    async def paired(self, baseline: int, candidate: int, limit: int) -> PairedData:
        body = await self._get(
            self._monitoring,
            "/api/v1/paired",
            {
                "model_name": self.model_name,
                "baseline": baseline,
                "candidate": candidate,
                "limit": limit,
            },
        )
        try:
            labels = [float(v) for v in body["labels"]]
            base = [float(v) for v in body["baseline_scores"]]
            cand = [float(v) for v in body["candidate_scores"]]
            base_flagged = [bool(v) for v in body["baseline_flagged"]]
            cand_flagged = [bool(v) for v in body["candidate_flagged"]]
        except (KeyError, TypeError, ValueError) as exc:
            raise Unavailable(f"monitoring's paired answer is malformed: {exc}") from exc
        if not len(labels) == len(base) == len(cand) == len(base_flagged) == len(cand_flagged):
            raise Unavailable("monitoring's paired answer has lists of different lengths")
        return PairedData(labels, base, cand, base_flagged, cand_flagged)

    async def live_quality(self, version: int) -> dict[str, float] | None:
        body = await self._get(self._monitoring, "/api/v1/quality", {})
        rows = body.get("versions") if isinstance(body, dict) else None
        if not isinstance(rows, list):
            raise Unavailable("monitoring's quality answer has no 'versions' list")
        for row in rows:
            if (
                isinstance(row, dict)
                and row.get("model_name") == self.model_name
                and int(row.get("model_version", 0)) == version
                and row.get("route", "production") == "production"
            ):
                return {
                    k: float(v)
                    for k, v in row.items()
                    if isinstance(v, int | float) and not isinstance(v, bool)
                }
        return None

    async def _query(self, query: str) -> list[dict[str, Any]]:
        body = await self._get(self._prometheus, "/api/v1/query", {"query": query})
        if body.get("status") != "success":
            raise Unavailable(f"Prometheus: {body.get('error', body)}")
        return list(body["data"]["result"])

    @staticmethod
    def _window(since: datetime) -> str:
        seconds = max(1, int((datetime.now(UTC) - since).total_seconds()))
        return f"{seconds}s"

    async def new_labels_since(self, since: datetime) -> float | None:
        rows = await self._query(
            "sum(increase(mlops_ingestion_archive_rows_total"
            f'{{dataset="labels"}}[{self._window(since)}]))'
        )
        if not rows:
            return None
        return float(rows[0]["value"][1])

    async def health(self, versions: list[tuple[str, int]], since: datetime) -> list[VersionHealth]:
        w = self._window(since)
        model = self.model_name
        queries = {
            "requests": "sum by (model_version, route) "
            f"(increase(mlops_serving_predictions_total[{w}]))",
            "latency": "sum by (model_version, route, le) "
            f"(increase(mlops_serving_prediction_seconds_bucket[{w}]))",
            "errors": f"sum by (route) (increase(mlops_serving_triton_errors_total[{w}]))",
            "logged": "sum by (model_version) "
            f'(increase(mlops_monitoring_predictions_total{{model_name="{model}"}}[{w}]))',
            "degraded": "sum by (model_version) (increase("
            f'mlops_monitoring_degraded_predictions_total{{model_name="{model}"}}[{w}]))',
            "triton_ok": "sum by (version) "
            f'(increase(nv_inference_request_success{{model="{model}"}}[{w}]))',
            "triton_failed": "sum by (version) "
            f'(increase(nv_inference_request_failure{{model="{model}"}}[{w}]))',
        }
        names = list(queries)
        answers = await asyncio.gather(*(self._query(queries[n]) for n in names))
        results = dict(zip(names, answers, strict=True))

        def value(name: str, **labels: str) -> float:
            return sum(
                float(row["value"][1])
                for row in results[name]
                if all(row["metric"].get(k) == v for k, v in labels.items())
            )

        healths = []
        for route, version in versions:
            v = str(version)
            buckets: dict[float, float] = {}
            for row in results["latency"]:
                metric = row["metric"]
                if metric.get("model_version") == v and metric.get("route") == route:
                    le = float(metric["le"])
                    buckets[le] = buckets.get(le, 0.0) + float(row["value"][1])
            healths.append(
                VersionHealth(
                    requests=value("requests", model_version=v, route=route),
                    errors=value("errors", route=route),
                    latency_buckets=tuple(sorted(buckets.items())),
                    logged=value("logged", model_version=v),
                    degraded=value("degraded", model_version=v),
                    triton_requests=value("triton_ok", version=v),
                    triton_failures=value("triton_failed", version=v),
                )
            )
        return healths


class LoopEvents:
    """monitoring.drift, models.lifecycle and training.results, handed to the autopilot one at
    a time.

    A new consumer group starts at the end of both topics (the past is not a reason to act
    now; the autopilot learns production from the registry); offsets are committed after each
    handled batch, so a restart resumes where it stopped."""

    def __init__(self, kafka: KafkaSettings, group_id: str, autopilot: Autopilot) -> None:
        topics = Topics.from_settings(kafka)
        self.drift_topic = topics.drift
        self.lifecycle_topic = topics.lifecycle
        self.results_topic = topics.training_results
        self.autopilot = autopilot
        self._consumer: AIOKafkaConsumer = create_consumer(
            kafka,
            topics.drift,
            topics.lifecycle,
            topics.training_results,
            group_id=group_id,
            client_id=ACTOR,
            auto_offset_reset="latest",
            max_poll_records=100,
        )

    async def start(self) -> None:
        await self._consumer.start()

    async def stop(self) -> None:
        await self._consumer.stop()

    async def run(self, stop: asyncio.Event, lock: asyncio.Lock) -> None:
        while not stop.is_set():
            batches = await self._consumer.getmany(timeout_ms=500, max_records=100)
            for records in batches.values():
                for record in records:
                    async with lock:
                        await self._handle(record.topic, record.value or b"", record.offset)
            if batches:
                try:
                    await self._consumer.commit()
                except KafkaError as exc:
                    log.warning("commit_failed", error=repr(exc))

    async def _handle(self, topic: str, value: bytes, offset: int) -> None:
        try:
            if topic == self.drift_topic:
                drift = monitoring_pb2.DriftEvent()
                drift.ParseFromString(value)
                await self.autopilot.on_drift(drift)
            elif topic == self.lifecycle_topic:
                event = models_pb2.ModelEvent()
                event.ParseFromString(value)
                await self.autopilot.on_lifecycle(event)
            elif topic == self.results_topic:
                result = monitoring_pb2.TrainingResult()
                result.ParseFromString(value)
                await self.autopilot.on_training_result(result)
        except DecodeError as exc:
            log.warning("record_unreadable", topic=topic, offset=offset, error=str(exc))
        except PlatformError as exc:
            log.warning("record_not_handled", topic=topic, offset=offset, error=exc.message)
