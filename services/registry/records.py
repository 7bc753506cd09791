"""The registry's own types: what the domain (``ModelRegistryService``) returns.

Plain dataclasses; the transports turn them into messages (``services/registry/views.py``): the
gRPC servicer for callers, the lifecycle publisher for ``models.lifecycle``. Stages and event
kinds are the proto enums' values (the contract's vocabulary), not messages.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime

from services.registry.gate import GateDecision
from services.registry.routing import Route
from services.shared.proto.mlops.v1 import models_pb2

Stage = models_pb2.ModelStage
EventType = models_pb2.ModelEventType


def stage_name(stage: models_pb2.ModelStage.ValueType) -> str:
    """``MODEL_STAGE_CANARY`` -> ``CANARY`` (how the stage tag spells it)."""
    return Stage.Name(stage).removeprefix("MODEL_STAGE_")


def stage_value(name: str) -> models_pb2.ModelStage.ValueType:
    try:
        return Stage.Value(f"MODEL_STAGE_{name}")
    except ValueError:
        return Stage.MODEL_STAGE_UNSPECIFIED


@dataclass(frozen=True)
class VersionRecord:
    """One version of the model as the registry reports it."""

    model_name: str
    version: int
    stage: models_pb2.ModelStage.ValueType
    aliases: tuple[str, ...]
    traffic_percent: int
    run_id: str
    artifact_sha256: str
    metrics: Mapping[str, float]
    threshold: float
    feature_names: tuple[str, ...]
    gate: GateDecision | None
    created_at: datetime
    description: str


@dataclass(frozen=True)
class LineageRecord:
    """Where a version came from, from the version back to the code that built it."""

    model_name: str
    version: int
    run_id: str
    experiment_id: str
    dataset_snapshot_id: str
    dataset_sha256: str
    feature_service: str
    feature_definitions_sha256: str
    code_commit: str
    params: Mapping[str, str]
    metrics: Mapping[str, float]
    artifact_sha256: str
    training_request_id: str


@dataclass(frozen=True)
class LifecycleEvent:
    """One lifecycle transition, with the complete routing table after it (``served``)."""

    type: models_pb2.ModelEventType.ValueType
    model_name: str
    version: int
    served: tuple[Route, ...]
    alias: str = ""
    traffic_percent: int = 0
    previous_version: int = 0
    reason: str = ""
    actor: str = ""
    gate: GateDecision | None = None
    event_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    occurred_at: datetime = field(default_factory=lambda: datetime.now(UTC))
