"""The registry's types as messages: what the transports send (the gRPC servicer to callers,
the lifecycle publisher to ``models.lifecycle``). Conversion only, no decisions."""

from __future__ import annotations

from collections.abc import Iterable

from google.protobuf.timestamp_pb2 import Timestamp

from services.registry.records import LifecycleEvent, LineageRecord, VersionRecord
from services.registry.routing import Route
from services.shared.model_aliases import alias_role
from services.shared.proto.mlops.v1 import models_pb2


def route_message(route: Route) -> models_pb2.ServedVersion:
    return models_pb2.ServedVersion(
        version=route.version,
        alias=route.alias,  # for consumers that read events written before `role`
        role=alias_role(route.alias),
        traffic_percent=route.traffic_percent,
        threshold=route.threshold,
        shadow=route.shadow,
    )


def routes_message(routes: Iterable[Route]) -> list[models_pb2.ServedVersion]:
    return [route_message(r) for r in routes]


def version_message(record: VersionRecord) -> models_pb2.ModelVersion:
    message = models_pb2.ModelVersion(
        model_name=record.model_name,
        version=record.version,
        stage=record.stage,
        aliases=list(record.aliases),
        traffic_percent=record.traffic_percent,
        run_id=record.run_id,
        artifact_sha256=record.artifact_sha256,
        metrics=dict(record.metrics),
        threshold=record.threshold,
        feature_names=list(record.feature_names),
        description=record.description,
    )
    if record.gate is not None:
        message.gate.CopyFrom(record.gate.to_proto())
    message.created_at.FromDatetime(record.created_at)
    return message


def lineage_message(record: LineageRecord) -> models_pb2.Lineage:
    return models_pb2.Lineage(
        model_name=record.model_name,
        version=record.version,
        run_id=record.run_id,
        experiment_id=record.experiment_id,
        dataset_snapshot_id=record.dataset_snapshot_id,
        dataset_sha256=record.dataset_sha256,
        feature_service=record.feature_service,
        feature_definitions_sha256=record.feature_definitions_sha256,
        code_commit=record.code_commit,
        params=dict(record.params),
        metrics=dict(record.metrics),
        artifact_sha256=record.artifact_sha256,
        training_request_id=record.training_request_id,
    )


def event_message(event: LifecycleEvent) -> models_pb2.ModelEvent:
    occurred = Timestamp()
    occurred.FromDatetime(event.occurred_at)
    message = models_pb2.ModelEvent(
        event_id=event.event_id,
        type=event.type,
        model_name=event.model_name,
        version=event.version,
        alias=event.alias,
        traffic_percent=event.traffic_percent,
        previous_version=event.previous_version,
        reason=event.reason,
        actor=event.actor,
        occurred_at=occurred,
        served=routes_message(event.served),
    )
    if event.gate is not None:
        message.gate.CopyFrom(event.gate.to_proto())
    return message
