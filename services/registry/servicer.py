"""The gRPC face of the registry: converts messages and calls ``ModelRegistryService``.

The domain is blocking (MLflow over HTTP, Triton, torch), so every call runs in a worker thread;
mutations (and the reconcile loop) hold one lock, so the registry changes one thing at a time.
A mutation's ModelEvents are published after the domain call returned, i.e. once the change is
durable in MLflow and Triton.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Protocol

import grpc
from aiokafka.errors import KafkaError

from services.registry.client import ACTOR_METADATA
from services.registry.service import ModelRegistryService, ReconcileReport, Transition
from services.shared.errors import Unavailable
from services.shared.logging import get_logger
from services.shared.proto.mlops.v1 import models_pb2, registry_pb2, registry_pb2_grpc

log = get_logger("registry.servicer")


class EventSink(Protocol):
    async def publish(self, events: Sequence[models_pb2.ModelEvent]) -> None: ...


def _actor(context: grpc.aio.ServicerContext) -> str:
    for key, value in context.invocation_metadata() or ():
        if key.lower() == ACTOR_METADATA:
            return value if isinstance(value, str) else value.decode()
    peer = context.peer() or "unknown"
    return f"grpc:{peer}"


class ModelRegistryServicer(registry_pb2_grpc.ModelRegistryServicer):
    def __init__(self, service: ModelRegistryService, events: EventSink) -> None:
        self.service = service
        self.events = events
        self.lock = asyncio.Lock()

    async def _mutate(self, call: Callable[[], Transition]) -> models_pb2.ModelVersion:
        async with self.lock:
            transition = await asyncio.to_thread(call)
            try:
                await self.events.publish(transition.events)
            except KafkaError as exc:
                # the change is durable (MLflow, Triton); only its announcement failed
                ids = ",".join(e.event_id for e in transition.events)
                log.error("lifecycle_publish_failed", event_ids=ids, error=str(exc))
                raise Unavailable(
                    f"v{transition.version.version}: the change was applied but its lifecycle "
                    f"events could not be published ({exc}); consumers see it on the next event"
                ) from exc
        return transition.version

    async def reconcile(self) -> ReconcileReport:
        async with self.lock:
            return await asyncio.to_thread(self.service.reconcile)

    async def ListModelVersions(
        self, request: registry_pb2.ListModelVersionsRequest, context: grpc.aio.ServicerContext
    ) -> registry_pb2.ListModelVersionsResponse:
        versions = await asyncio.to_thread(self.service.list_versions, request.model_name)
        return registry_pb2.ListModelVersionsResponse(versions=versions)

    async def GetModelVersion(
        self, request: registry_pb2.GetModelVersionRequest, context: grpc.aio.ServicerContext
    ) -> models_pb2.ModelVersion:
        return await asyncio.to_thread(
            self.service.get_version,
            request.model_name,
            request.version if request.HasField("version") else 0,
            request.alias if request.HasField("alias") else "",
        )

    async def RegisterModelVersion(
        self,
        request: registry_pb2.RegisterModelVersionRequest,
        context: grpc.aio.ServicerContext,
    ) -> models_pb2.ModelVersion:
        actor = _actor(context)
        return await self._mutate(
            lambda: self.service.register(
                request.model_name,
                request.run_id,
                request.artifact_sha256,
                description=request.description,
                canary_traffic_percent=request.canary_traffic_percent,
                actor=actor,
            )
        )

    async def SetAlias(
        self, request: registry_pb2.SetAliasRequest, context: grpc.aio.ServicerContext
    ) -> models_pb2.ModelVersion:
        actor = _actor(context)
        return await self._mutate(
            lambda: self.service.set_alias(
                request.model_name,
                request.alias,
                request.version,
                traffic_percent=request.traffic_percent,
                reason=request.reason,
                actor=actor,
            )
        )

    async def Rollback(
        self, request: registry_pb2.RollbackRequest, context: grpc.aio.ServicerContext
    ) -> models_pb2.ModelVersion:
        actor = _actor(context)
        return await self._mutate(
            lambda: self.service.rollback(request.model_name, reason=request.reason, actor=actor)
        )

    async def GetLineage(
        self, request: registry_pb2.GetLineageRequest, context: grpc.aio.ServicerContext
    ) -> models_pb2.Lineage:
        return await asyncio.to_thread(self.service.lineage, request.model_name, request.version)
