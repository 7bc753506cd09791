"""Where the local stack keeps its files and which ports it uses."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from services.shared.errors import FailedPrecondition
from services.shared.settings import PROJECT_ROOT

# Every supervised process carries these two environment markers (inherited by its children):
# the stack's var directory and its program's name (services/cli/localstack/processes.py).
STACK_MARKER = "MLOPS_LOCAL_STACK"
PROGRAM_MARKER = "MLOPS_LOCAL_STACK_PROGRAM"


class StackSettings(BaseSettings):
    """Where the local stack keeps its files and which ports it uses (defaults: the contract,
    docs/architecture.md). A service's ports are named after it: ``<service>_metrics_port``,
    ``<service>_grpc_port`` for a gRPC API, ``<service>_port`` for an HTTP one
    (services/cli/localstack/components.py reads them by these names)."""

    model_config = SettingsConfigDict(env_prefix="MLOPS_STACK_", extra="ignore", frozen=True)

    var_dir: Path = Field(
        PROJECT_ROOT / "var",
        description="Root of the stack's files: run/ (configs, socket), log/, data/, secrets/.",
    )
    host: str = Field("127.0.0.1", description="Address every component binds to.")
    kafka_port: int = Field(9092, description="Kafka-protocol broker (Tansu).")
    redis_port: int = Field(6379, description="Redis, the Feast online store.")
    triton_http_port: int = Field(8000, description="Triton HTTP.")
    triton_grpc_port: int = Field(8001, description="Triton gRPC.")
    triton_metrics_port: int = Field(8002, description="Triton Prometheus metrics.")
    prometheus_port: int = Field(9090, description="Prometheus.")
    mlflow_port: int = Field(5000, description="MLflow tracking server.")
    serving_grpc_port: int = Field(50051, description="serving: mlops.v1.Predictor.")
    registry_grpc_port: int = Field(50052, description="registry: mlops.v1.ModelRegistry.")
    ingestion_metrics_port: int = Field(9101, description="ingestion /metrics.")
    features_metrics_port: int = Field(9102, description="features /metrics.")
    training_metrics_port: int = Field(9103, description="training /metrics.")
    registry_metrics_port: int = Field(9104, description="registry /metrics.")
    serving_metrics_port: int = Field(9105, description="serving /metrics.")
    monitoring_metrics_port: int = Field(9106, description="monitoring /metrics.")
    autopilot_metrics_port: int = Field(
        9107, description="autopilot /metrics and its JSON API (/api/v1/loop)."
    )
    dashboard_port: int = Field(8080, description="dashboard: the operator page and JSON API.")
    dashboard_metrics_port: int = Field(9108, description="dashboard /metrics.")
    scrape_interval_s: int = Field(5, ge=1, description="Prometheus scrape interval.")
    startup_timeout_s: float = Field(
        300.0, description="How long `up` waits for every component to be healthy."
    )

    @field_validator("var_dir")
    @classmethod
    def _absolute(cls, value: Path) -> Path:
        return value.expanduser().resolve()

    def metrics_port(self, service: str) -> int:
        return int(getattr(self, f"{service}_metrics_port"))

    def grpc_port(self, service: str) -> int:
        return int(getattr(self, f"{service}_grpc_port"))

    def http_port(self, service: str) -> int:
        return int(getattr(self, f"{service}_port"))


class StackError(FailedPrecondition):
    """The local stack cannot do what was asked; the message says why and what to do."""

    code = "local_stack"
