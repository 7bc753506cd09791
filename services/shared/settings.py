"""Typed settings: the only place the platform reads its environment.

Each shared component (Kafka, Redis, Triton, MLflow, storage, the registry's address) has its
own settings class with its own prefix, so one variable (say ``MLOPS_KAFKA_BOOTSTRAP``)
configures every service. Each service composes them in its own settings class, which has
the service's prefix (``MLOPS_SERVING_...``) for what is its alone. Defaults are the contract
of DESIGN.md.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

PROJECT_ROOT = Path(__file__).resolve().parents[2]


def _config(prefix: str) -> SettingsConfigDict:
    return SettingsConfigDict(env_prefix=prefix, extra="ignore", frozen=True)


class KafkaSettings(BaseSettings):
    """How to reach the Kafka cluster."""

    model_config = _config("MLOPS_KAFKA_")

    bootstrap: str = Field("127.0.0.1:9092", description="Bootstrap servers, comma separated.")
    topic_prefix: str = Field(
        "", description="Prepended to every topic name (tests isolate themselves with it)."
    )
    partitions: int = Field(
        4, ge=1, description="Partitions for topics the platform creates at start-up."
    )
    replication_factor: int = Field(1, ge=1, description="Replication factor of created topics.")
    enable_idempotence: bool = Field(
        False,
        description="Idempotent producer. On for Apache Kafka; the local Tansu broker cannot "
        "(delivery is at-least-once with idempotent consumers either way).",
    )
    broker_flavor: Literal["kafka", "tansu"] = Field(
        "kafka",
        description="'tansu' switches on the client-side workarounds for the local Tansu "
        "broker (services/shared/broker_compat.py). Never set it against Apache Kafka.",
    )
    session_timeout_ms: int = Field(
        10_000, description="Consumer group session timeout (Tansu holds JoinGroup for half)."
    )
    request_timeout_ms: int = Field(15_000, description="Client request timeout.")


class RedisSettings(BaseSettings):
    """The Feast online store."""

    model_config = _config("MLOPS_REDIS_")

    host: str = Field("127.0.0.1", description="Redis host.")
    port: int = Field(6379, description="Redis port.")

    @property
    def connection_string(self) -> str:
        return f"{self.host}:{self.port}"


class TritonSettings(BaseSettings):
    """The Triton inference server and its model repository."""

    model_config = _config("MLOPS_TRITON_")

    host: str = Field("127.0.0.1", description="Triton host.")
    http_port: int = Field(8000, description="Triton HTTP port.")
    grpc_port: int = Field(8001, description="Triton gRPC port.")
    metrics_port: int = Field(8002, description="Triton metrics port.")
    model_repository: Path = Field(
        PROJECT_ROOT / "var" / "data" / "triton_models",
        description="The model repository Triton serves and the registry publishes to.",
    )
    instance_kind: Literal["KIND_CPU", "KIND_GPU"] = Field(
        "KIND_CPU", description="Where Triton runs model instances (KIND_GPU on GPU hosts)."
    )

    @property
    def grpc_url(self) -> str:
        return f"{self.host}:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"{self.host}:{self.http_port}"


class MlflowSettings(BaseSettings):
    """The MLflow tracking server (runs and the model registry's metadata)."""

    model_config = _config("MLOPS_MLFLOW_")

    tracking_uri: str = Field("http://127.0.0.1:5000", description="MLflow tracking URI.")
    experiment: str = Field("fraud-detection", description="Experiment training runs go to.")


class StorageSettings(BaseSettings):
    """Where the platform keeps data on disk: the offline store, snapshots, Feast's registry."""

    model_config = _config("MLOPS_STORAGE_")

    data_dir: Path = Field(
        PROJECT_ROOT / "var" / "data", description="Root of every on-disk store of the platform."
    )

    @field_validator("data_dir")
    @classmethod
    def _absolute(cls, value: Path) -> Path:
        return value.expanduser().resolve()

    @property
    def offline_dir(self) -> Path:
        """Archived validated events and feature logs (Parquet, partitioned by event date)."""
        return self.data_dir / "offline"

    @property
    def snapshots_dir(self) -> Path:
        """Dataset snapshot manifests (the data versions lineage refers to)."""
        return self.data_dir / "snapshots"

    @property
    def feast_registry_path(self) -> Path:
        return self.data_dir / "feast" / "registry.db"


class FeastSettings(BaseSettings):
    """The Feast feature store of the use case."""

    model_config = _config("MLOPS_FEAST_")

    repo_path: Path = Field(
        PROJECT_ROOT / "feature_repo", description="The Feast feature repository (definitions)."
    )
    project: str = Field("mlops", description="Feast project name.")
    feature_service: str = Field("fraud_model_v1", description="The model's feature service.")


class RegistryClientSettings(BaseSettings):
    """How services and the CLI reach the model registry."""

    model_config = _config("MLOPS_REGISTRY_CLIENT_")

    address: str = Field("127.0.0.1:50052", description="Registry gRPC address.")
    token: SecretStr = Field(
        SecretStr(""),
        description="Bearer token for mutating registry calls (overrides token_file).",
    )
    token_file: Path = Field(
        PROJECT_ROOT / "var" / "secrets" / "registry.token",
        description="File holding the bearer token; the local stack generates it on first start.",
    )
    model_name: str = Field("fraud_detector", description="The model the platform manages.")

    def bearer_token(self) -> str:
        """The configured token, else the token file's content, else empty."""
        if self.token.get_secret_value():
            return self.token.get_secret_value()
        try:
            return self.token_file.read_text().strip()
        except OSError:
            return ""


class ObservabilitySettings(BaseSettings):
    """Logging."""

    model_config = _config("MLOPS_LOG_")

    level: str = Field("INFO", description="Log level.")
    format: Literal["logfmt", "json"] = Field("logfmt", description="Log line format.")


class HeapSettings(BaseModel):
    """The garbage-collector policy of a service with a large long-lived heap
    (services/shared/heap.py); mixed into that service's settings."""

    gc_freeze_interval_s: float = Field(
        1.0,
        ge=0,
        description="How often objects that survived a young collection are frozen out of "
        "the collector's scans (services/shared/heap.py): full collections over long-lived, "
        "acyclic objects found nothing and paused the service (the features worker 200-400 "
        "ms every few seconds, ingestion ~50 ms twice a second); 0 leaves Python's default "
        "collector alone.",
    )
    gc_full_interval_s: float = Field(
        3600.0,
        gt=0,
        description="How often one full collection (frozen objects included) runs anyway, "
        "reclaiming reference cycles that died after they were frozen.",
    )


class ServiceSettings(BaseSettings):
    """What every service has: a name, a metrics port and the shared components."""

    model_config = _config("MLOPS_")

    metrics_host: str = Field("127.0.0.1", description="Address /metrics binds to.")
    metrics_port: int = Field(0, description="Port of /metrics (0: a free port).")
    kafka: KafkaSettings = Field(default_factory=KafkaSettings)
    log: ObservabilitySettings = Field(default_factory=ObservabilitySettings)
