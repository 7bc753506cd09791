"""Wires the registry from its settings: MLflow store, Triton repository, domain service,
Kafka lifecycle publisher, the coordinator (one change at a time, events retried until
acknowledged, retired versions unloaded after their grace period), gRPC server with
bearer-token auth, and the reconcile loop."""

from __future__ import annotations

import asyncio

from services.registry.coordinator import RegistryCoordinator
from services.registry.lifecycle import LifecycleEventPublisher
from services.registry.mlflow_store import MlflowModelStore
from services.registry.s3_repository import open_model_repository
from services.registry.service import ModelRegistryService
from services.registry.servicer import ModelRegistryServicer
from services.registry.settings import RegistrySettings
from services.shared.errors import FailedPrecondition, PlatformError
from services.shared.grpc_server import BearerTokenAuth, GrpcServer
from services.shared.kafka import ensure_topics
from services.shared.logging import get_logger
from services.shared.proto.mlops.v1 import registry_pb2, registry_pb2_grpc
from services.shared.retry import ticks
from services.shared.runtime import run_service, set_ready
from services.shared.topics import Topics

log = get_logger("registry")

SERVICE_NAME = registry_pb2.DESCRIPTOR.services_by_name["ModelRegistry"].full_name
MUTATING_METHODS = ("RegisterModelVersion", "SetAlias", "Rollback")


class RegistryApp:
    """The registry process's parts, started and stopped in order."""

    def __init__(self, settings: RegistrySettings) -> None:
        token = settings.token.get_secret_value()
        if not token:
            raise FailedPrecondition(
                "MLOPS_REGISTRY_TOKEN is not set: the registry refuses to start without a "
                "bearer token for its mutating calls"
            )
        self.settings = settings
        self.service = ModelRegistryService(
            settings,
            MlflowModelStore(settings.mlflow),
            open_model_repository(settings.triton, settings.s3, settings.model_name),
        )
        self.events = LifecycleEventPublisher(settings.kafka)
        self.coordinator = RegistryCoordinator(
            self.service,
            self.events,
            publish_wait_s=settings.publish_wait_s,
            retry_s=settings.publish_retry_s,
        )
        self.servicer = ModelRegistryServicer(self.service, self.coordinator)
        self.server = GrpcServer(
            host=settings.host,
            port=settings.port,
            service_names=[SERVICE_NAME],
            auth=BearerTokenAuth(token, MUTATING_METHODS),
            tls=settings,
        )
        registry_pb2_grpc.add_ModelRegistryServicer_to_server(self.servicer, self.server.server)
        self._reconciler: asyncio.Task[None] | None = None
        self._announced = False  # the routing table was announced since this process started
        self._stop = asyncio.Event()

    @property
    def port(self) -> int:
        return self.server.port

    async def start(self) -> None:
        await ensure_topics(
            self.settings.kafka, [Topics.from_settings(self.settings.kafka).lifecycle]
        )
        await self.events.start()
        await self.coordinator.start()
        # after a Triton restart nothing is loaded: serve first; then tell consumers the
        # routing table (events of the previous process may have been lost)
        await self.reconcile_once()
        await self.server.start()
        self._reconciler = asyncio.create_task(self._reconcile_loop())

    async def reconcile_once(self) -> None:
        """One pass; until one succeeded, it also announces the routing table."""
        try:
            report = await self.servicer.reconcile(announce=not self._announced)
        except PlatformError as exc:
            log.warning("reconcile_failed", error=type(exc).__name__, detail=exc.message)
            return
        except Exception as exc:  # the loop must outlive any one failure
            log.exception("reconcile_crashed", error=type(exc).__name__)
            return
        self._announced = True
        if report.published or report.reloaded or report.retiring:
            log.info(
                "reconciled",
                desired=",".join(map(str, report.desired)),
                ready_before=",".join(map(str, report.ready_before)),
                reloaded=",".join(map(str, report.reloaded)),
                retiring=",".join(str(r.version) for r in report.retiring),
            )

    async def _reconcile_loop(self) -> None:
        async for _ in ticks(self._stop, self.settings.reconcile_interval_s):
            await self.reconcile_once()

    async def stop(self) -> None:
        self._stop.set()
        if self._reconciler is not None:
            await self._reconciler
        await self.coordinator.stop_retiring()
        await self.server.stop()
        await self.coordinator.stop()
        await self.events.stop()


async def serve(settings: RegistrySettings, stop: asyncio.Event) -> None:
    app = RegistryApp(settings)
    await app.start()
    set_ready("registry", True)
    log.info("registry_ready", port=app.port, model=settings.model_name)
    try:
        await stop.wait()
    finally:
        set_ready("registry", False)
        await app.stop()


def main() -> int:
    settings = RegistrySettings()
    return run_service("registry", settings, lambda stop: serve(settings, stop))
