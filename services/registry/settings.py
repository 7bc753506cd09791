"""Settings of the model registry service (prefix ``MLOPS_REGISTRY_``)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, SecretStr
from pydantic_settings import SettingsConfigDict

from services.shared.settings import (
    GrpcTlsSettings,
    MlflowSettings,
    ObjectStorageSettings,
    ServiceSettings,
    TritonSettings,
)


class RegistrySettings(ServiceSettings, GrpcTlsSettings):
    """The registry: gRPC control plane over MLflow's model registry, publishing to Triton."""

    model_config = SettingsConfigDict(env_prefix="MLOPS_REGISTRY_", extra="ignore", frozen=True)

    host: str = Field("127.0.0.1", description="Address the gRPC server binds to.")
    port: int = Field(50052, description="gRPC port of mlops.v1.ModelRegistry.")
    metrics_port: int = Field(9104, description="Port of /metrics.")
    token: SecretStr = Field(
        SecretStr(""),
        description="Bearer token required on RegisterModelVersion, SetAlias and Rollback "
        "(MLOPS_REGISTRY_TOKEN). The service refuses to start without one.",
    )
    model_name: str = Field(
        "fraud_detector", description="The registered model the platform manages."
    )
    gate_metric: Literal["pr_auc", "log_loss"] = Field(
        "pr_auc",
        description="The gate's metric: the candidate's improvement over production in "
        "PR-AUC (candidate minus production) or in mean log-loss (production minus candidate) "
        "on the same held-out transactions, by a paired bootstrap.",
    )
    gate_metric_margin: float = Field(
        0.0,
        ge=0,
        description="The lower end of the improvement's confidence interval must exceed this "
        "(absolute, in the gate metric's units) for a candidate to pass the gate.",
    )
    gate_confidence: float = Field(
        0.95,
        gt=0.5,
        lt=1,
        description="Confidence of the gate's two-sided bootstrap interval of the improvement "
        "(its lower end is a one-sided bound at 1 - (1 - confidence) / 2: a candidate no "
        "better than production passes with probability at most about (1 - confidence) / 2).",
    )
    gate_resamples: int = Field(
        1000, ge=100, description="Bootstrap resamples of the gate's paired comparison."
    )
    gate_min_rows: int = Field(
        300,
        ge=1,
        description="Held-out transactions the gate needs to compare a candidate with "
        "production; fewer: 'insufficient data' (no verdict, the version stays a candidate).",
    )
    gate_min_positives: int = Field(
        20,
        ge=1,
        description="Frauds among the held-out transactions the gate needs to compare a "
        "candidate with production; fewer: 'insufficient data'.",
    )
    gate_calibration_tolerance: float = Field(
        0.02,
        ge=0,
        description="A candidate fails when its expected calibration error is shown (the "
        "paired bootstrap interval of production's minus the candidate's, at the gate's "
        "confidence, lies wholly below minus this) worse than production's by more than this.",
    )
    publish_passed_as: Literal["canary", "none"] = Field(
        "canary",
        description="What a registered candidate that passed the gate becomes while a "
        "production version exists: 'canary' (at default_canary_percent), or 'none': it stays "
        "a candidate until the autopilot (or an operator) puts it in shadow. The local stack "
        "and compose, which run the autopilot, set 'none'.",
    )
    default_canary_percent: int = Field(
        10, ge=1, le=100, description="Traffic share of a new canary unless the request sets one."
    )
    default_shadow_percent: int = Field(
        100, ge=1, le=100, description="Share of traffic mirrored to a shadow version."
    )
    reconcile_interval_s: float = Field(
        30.0,
        gt=0,
        description="How often Triton is checked against the aliases (and probed with a tiny "
        "inference; a version that fails is reloaded).",
    )
    retire_grace_s: float = Field(
        10.0,
        ge=0,
        description="How long a version that stops being served stays loaded in Triton after "
        "the lifecycle event announcing the switch was acknowledged, so every consumer "
        "(serving) has moved its traffic before Triton unloads it.",
    )
    publish_wait_s: float = Field(
        5.0,
        ge=0,
        description="How long a mutating call waits for its lifecycle events to be acknowledged "
        "before it answers; events not acknowledged by then are retried in the background, "
        "in order, until the broker takes them.",
    )
    publish_retry_s: float = Field(
        1.0,
        gt=0,
        description="First pause between attempts to publish a lifecycle event the broker "
        "refused (doubling up to 10 s).",
    )
    mlflow: MlflowSettings = Field(default_factory=MlflowSettings)
    triton: TritonSettings = Field(default_factory=TritonSettings)
    s3: ObjectStorageSettings = Field(default_factory=ObjectStorageSettings)
