"""The gRPC face of the registry: converts messages and calls ``ModelRegistryService``
(requests in, ``services/registry/views.py`` for the answers).

The domain is blocking (MLflow over HTTP, Triton, torch), so every call runs in a worker thread.
Mutations go through ``RegistryCoordinator`` (one change at a time; events published once the
change is durable, retried until acknowledged; retired versions unloaded after a grace period).
"""

from __future__ import annotations

import asyncio

import grpc

from services.registry.coordinator import RegistryCoordinator
from services.registry.service import ModelRegistryService, ReconcileReport
from services.registry.views import lineage_message, routes_message, version_message
from services.shared.model_aliases import checked_role
from services.shared.proto.mlops.v1 import models_pb2, registry_pb2, registry_pb2_grpc
from services.shared.registry_client import ACTOR_METADATA


def _actor(context: grpc.aio.ServicerContext) -> str:
    for key, value in context.invocation_metadata() or ():
        if key.lower() == ACTOR_METADATA:
            return value if isinstance(value, str) else value.decode()
    peer = context.peer() or "unknown"
    return f"grpc:{peer}"


class ModelRegistryServicer(registry_pb2_grpc.ModelRegistryServicer):
    def __init__(self, service: ModelRegistryService, coordinator: RegistryCoordinator) -> None:
        self.service = service
        self.coordinator = coordinator

    async def reconcile(self, *, announce: bool = False) -> ReconcileReport:
        return await self.coordinator.reconcile(announce=announce)

    async def ListModelVersions(
        self, request: registry_pb2.ListModelVersionsRequest, context: grpc.aio.ServicerContext
    ) -> registry_pb2.ListModelVersionsResponse:
        versions = await asyncio.to_thread(self.service.list_versions, request.model_name)
        return registry_pb2.ListModelVersionsResponse(versions=map(version_message, versions))

    async def GetModelVersion(
        self, request: registry_pb2.GetModelVersionRequest, context: grpc.aio.ServicerContext
    ) -> models_pb2.ModelVersion:
        alias = checked_role(request.alias) if request.HasField("alias") else ""
        version = request.version if request.HasField("version") else 0
        record = await asyncio.to_thread(
            self.service.get_version, request.model_name, version, alias
        )
        return version_message(record)

    async def RegisterModelVersion(
        self,
        request: registry_pb2.RegisterModelVersionRequest,
        context: grpc.aio.ServicerContext,
    ) -> models_pb2.ModelVersion:
        actor = _actor(context)
        record = await self.coordinator.mutate(
            lambda: self.service.register(
                request.model_name,
                request.run_id,
                request.artifact_sha256,
                description=request.description,
                canary_traffic_percent=request.canary_traffic_percent,
                actor=actor,
            )
        )
        return version_message(record)

    async def SetAlias(
        self, request: registry_pb2.SetAliasRequest, context: grpc.aio.ServicerContext
    ) -> models_pb2.ModelVersion:
        actor = _actor(context)
        alias = checked_role(request.alias)
        record = await self.coordinator.mutate(
            lambda: self.service.set_alias(
                request.model_name,
                alias,
                request.version,
                traffic_percent=request.traffic_percent,
                reason=request.reason,
                actor=actor,
            )
        )
        return version_message(record)

    async def Rollback(
        self, request: registry_pb2.RollbackRequest, context: grpc.aio.ServicerContext
    ) -> models_pb2.ModelVersion:
        actor = _actor(context)
        record = await self.coordinator.mutate(
            lambda: self.service.rollback(request.model_name, reason=request.reason, actor=actor)
        )
        return version_message(record)

    async def GetLineage(
        self, request: registry_pb2.GetLineageRequest, context: grpc.aio.ServicerContext
    ) -> models_pb2.Lineage:
        record = await asyncio.to_thread(self.service.lineage, request.model_name, request.version)
        return lineage_message(record)

    async def GetRoutingTable(
        self, request: registry_pb2.GetRoutingTableRequest, context: grpc.aio.ServicerContext
    ) -> registry_pb2.GetRoutingTableResponse:
        routes = await asyncio.to_thread(self.service.routing_table, request.model_name)
        return registry_pb2.GetRoutingTableResponse(
            model_name=self.service.model_name, routes=routes_message(routes)
        )
