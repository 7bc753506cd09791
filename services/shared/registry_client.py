"""A blocking client of the registry's gRPC API (the trainer and the CLI use it).

Mutating calls carry ``authorization: Bearer <token>`` from ``RegistryClientSettings``; gRPC
errors come back as the platform's own errors (the status code picks the class), so callers
handle one hierarchy whether the failure was local or remote.
"""

from __future__ import annotations

from types import TracebackType

import grpc

from services.shared.errors import (
    AlreadyExists,
    DeadlineExceeded,
    FailedPrecondition,
    IntegrityError,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    PlatformError,
    Unauthenticated,
    Unavailable,
)
from services.shared.model_aliases import alias_role
from services.shared.proto.mlops.v1 import models_pb2, registry_pb2, registry_pb2_grpc
from services.shared.settings import RegistryClientSettings
from services.shared.tls import registry_channel

ACTOR_METADATA = "x-mlops-actor"  # who asks (recorded on ModelEvents); informational only
_ERRORS: dict[grpc.StatusCode, type[PlatformError]] = {
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.ALREADY_EXISTS: AlreadyExists,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPrecondition,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    grpc.StatusCode.DATA_LOSS: IntegrityError,
}


def platform_error(exc: grpc.RpcError) -> PlatformError:
    # the RpcError a call raises is also a grpc.Call (code, details)
    code = exc.code()
    detail = exc.details() or code.name
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return InvalidArgument("", detail)
    return _ERRORS.get(code, PlatformError)(detail)


class RegistryClient:
    """``mlops.v1.ModelRegistry`` over one channel."""

    def __init__(
        self, settings: RegistryClientSettings, *, actor: str = "", timeout_s: float = 30.0
    ) -> None:
        self.settings = settings
        self.actor = actor
        self.timeout_s = timeout_s
        self._channel = registry_channel(settings)  # TLS when a CA is configured
        self._stub = registry_pb2_grpc.ModelRegistryStub(self._channel)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> RegistryClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _auth(self) -> list[tuple[str, str]]:
        token = self.settings.bearer_token()
        metadata = [(ACTOR_METADATA, self.actor)] if self.actor else []
        return [*metadata, ("authorization", f"Bearer {token}")] if token else metadata

    @property
    def model_name(self) -> str:
        return self.settings.model_name

    def list_versions(self) -> list[models_pb2.ModelVersion]:
        try:
            response = self._stub.ListModelVersions(
                registry_pb2.ListModelVersionsRequest(model_name=self.model_name),
                timeout=self.timeout_s,
            )
        except grpc.RpcError as exc:
            raise platform_error(exc) from None
        return list(response.versions)

    def get_version(self, version: int = 0, alias: str = "") -> models_pb2.ModelVersion:
        request = registry_pb2.GetModelVersionRequest(model_name=self.model_name)
        if alias:
            request.alias = alias_role(alias)
        else:
            request.version = version
        try:
            result: models_pb2.ModelVersion = self._stub.GetModelVersion(
                request, timeout=self.timeout_s
            )
        except grpc.RpcError as exc:
            raise platform_error(exc) from None
        return result

    def register(
        self,
        run_id: str,
        artifact_sha256: str,
        *,
        description: str = "",
        canary_traffic_percent: int = 0,
        timeout_s: float | None = None,
    ) -> models_pb2.ModelVersion:
        try:
            result: models_pb2.ModelVersion = self._stub.RegisterModelVersion(
                registry_pb2.RegisterModelVersionRequest(
                    model_name=self.model_name,
                    run_id=run_id,
                    artifact_sha256=artifact_sha256,
                    description=description,
                    canary_traffic_percent=canary_traffic_percent,
                ),
                metadata=self._auth(),
                timeout=timeout_s or self.timeout_s,
            )
        except grpc.RpcError as exc:
            raise platform_error(exc) from None
        return result

    def set_alias(
        self, alias: str, version: int, *, traffic_percent: int = 0, reason: str = ""
    ) -> models_pb2.ModelVersion:
        try:
            result: models_pb2.ModelVersion = self._stub.SetAlias(
                registry_pb2.SetAliasRequest(
                    model_name=self.model_name,
                    version=version,
                    alias=alias_role(alias),
                    traffic_percent=traffic_percent,
                    reason=reason,
                ),
                metadata=self._auth(),
                timeout=self.timeout_s,
            )
        except grpc.RpcError as exc:
            raise platform_error(exc) from None
        return result

    def rollback(self, reason: str = "") -> models_pb2.ModelVersion:
        try:
            result: models_pb2.ModelVersion = self._stub.Rollback(
                registry_pb2.RollbackRequest(model_name=self.model_name, reason=reason),
                metadata=self._auth(),
                timeout=self.timeout_s,
            )
        except grpc.RpcError as exc:
            raise platform_error(exc) from None
        return result

    def routing_table(self) -> list[models_pb2.ServedVersion]:
        """The registry's routing table now (production first; empty without production)."""
        try:
            response = self._stub.GetRoutingTable(
                registry_pb2.GetRoutingTableRequest(model_name=self.model_name),
                timeout=self.timeout_s,
            )
        except grpc.RpcError as exc:
            raise platform_error(exc) from None
        return list(response.routes)

    def lineage(self, version: int) -> models_pb2.Lineage:
        try:
            result: models_pb2.Lineage = self._stub.GetLineage(
                registry_pb2.GetLineageRequest(model_name=self.model_name, version=version),
                timeout=self.timeout_s,
            )
        except grpc.RpcError as exc:
            raise platform_error(exc) from None
        return result
