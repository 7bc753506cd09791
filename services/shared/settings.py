"""Typed settings: the only place the platform reads its environment.

Each shared component (Kafka, Redis, Triton, MLflow, storage, the registry's address) has its
own settings class with its own prefix, so one variable (say ``MLOPS_KAFKA_BOOTSTRAP``)
configures every service. Each service composes them in its own settings class, which has
the service's prefix (``MLOPS_SERVING_...``) for what is its alone. Defaults are the contract
in docs/architecture.md.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Self

from pydantic import BaseModel, Field, SecretStr, field_validator, model_validator
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
    compat_dir: Path = Field(
        PROJECT_ROOT / "var" / "broker_compat",
        description="With broker_flavor 'tansu' only: where the workarounds keep what the "
        "local broker does not (the metadata of offset commits).",
    )
    request_timeout_ms: int = Field(15_000, description="Client request timeout.")
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = Field(
        "PLAINTEXT",
        description="How clients talk to the brokers: PLAINTEXT (the local stack), SSL (TLS, "
        "optionally with a client certificate), SASL_PLAINTEXT or SASL_SSL (user and password "
        "over TLS: Strimzi's SCRAM listener in the prod overlay).",
    )
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] = Field(
        "SCRAM-SHA-512", description="SASL mechanism (SASL_* protocols)."
    )
    sasl_username: str = Field("", description="SASL user name (SASL_* protocols).")
    sasl_password: SecretStr = Field(SecretStr(""), description="SASL password.")
    ssl_ca_file: Path | None = Field(
        None,
        description="CA bundle (PEM) that signed the brokers' certificates (SSL/SASL_SSL); "
        "unset: the system's trust store.",
    )
    ssl_cert_file: Path | None = Field(
        None, description="Client certificate (PEM) for brokers that require one (mTLS)."
    )
    ssl_key_file: Path | None = Field(None, description="Private key (PEM) of ssl_cert_file.")

    max_record_bytes: int = Field(
        1_000_000,
        ge=1024,
        description="Largest record (key, value and headers) the platform sends; a larger one "
        "is dead-lettered instead (services/shared/sender.py). Keep it under the broker's "
        "message.max.bytes (Kafka's default 1 MiB) less the record batch overhead.",
    )

    @property
    def uses_tls(self) -> bool:
        return self.security_protocol in ("SSL", "SASL_SSL")

    @property
    def uses_sasl(self) -> bool:
        return self.security_protocol.startswith("SASL_")


class RedisSettings(BaseSettings):
    """The Feast online store."""

    model_config = _config("MLOPS_REDIS_")

    host: str = Field(
        "127.0.0.1",
        description="Redis host (with cluster: any node, or a Service in front of them).",
    )
    port: int = Field(6379, description="Redis port.")
    cluster: bool = Field(
        False,
        description="Redis Cluster (Feast's redis_type redis_cluster): clients start from "
        "host:port and follow the cluster's slot map.",
    )
    username: str = Field("", description="ACL user name (empty: the default user).")
    password: SecretStr = Field(
        SecretStr(""),
        description="Password (requirepass or the ACL user's); must not contain a comma "
        "(Feast's connection string separates options with commas).",
    )
    ssl: bool = Field(False, description="Connect over TLS.")
    ssl_ca_file: Path | None = Field(
        None, description="CA bundle (PEM) of the server's certificate (unset: system roots)."
    )
    ssl_cert_file: Path | None = Field(
        None, description="Client certificate (PEM) for servers that require one."
    )
    ssl_key_file: Path | None = Field(None, description="Private key (PEM) of ssl_cert_file.")

    @field_validator("password")
    @classmethod
    def _no_comma(cls, value: SecretStr) -> SecretStr:
        if "," in value.get_secret_value():
            raise ValueError("the Redis password must not contain a comma")
        return value

    def client_options(self) -> dict[str, Any]:
        """redis-py's keyword arguments for credentials and TLS (not the address)."""
        options: dict[str, Any] = {}
        if self.username:
            options["username"] = self.username
        if self.password.get_secret_value():
            options["password"] = self.password.get_secret_value()
        if self.ssl:
            options["ssl"] = True
            if self.ssl_ca_file is not None:
                options["ssl_ca_certs"] = str(self.ssl_ca_file)
            if self.ssl_cert_file is not None:
                options["ssl_certfile"] = str(self.ssl_cert_file)
            if self.ssl_key_file is not None:
                options["ssl_keyfile"] = str(self.ssl_key_file)
        return options

    @property
    def connection_string(self) -> str:
        """Feast's form: ``host:port[,option=value...]`` (the options of client_options)."""
        options = [f"{name}={value}" for name, value in self.client_options().items()]
        return ",".join(
            [f"{self.host}:{self.port}", *(o.replace("=True", "=true") for o in options)]
        )

    @property
    def address(self) -> str:
        """host:port, for logs (never the credentials)."""
        return f"{self.host}:{self.port}"


class ObjectStorageSettings(BaseSettings):
    """An S3-compatible object store (AWS S3, MinIO, Ceph...): the model repository in
    production. Without keys, boto3's own chain applies (e.g. a pod's IAM role)."""

    model_config = _config("MLOPS_S3_")

    endpoint_url: str = Field(
        "", description="Endpoint of a non-AWS store, e.g. http://minio:9000; empty: AWS."
    )
    region: str = Field("us-east-1", description="Region of the buckets.")
    access_key_id: SecretStr = Field(SecretStr(""), description="Access key id.")
    secret_access_key: SecretStr = Field(SecretStr(""), description="Secret access key.")


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
    model_repository_url: str = Field(
        "",
        description="s3://bucket/prefix: the registry publishes the model repository to "
        "object storage (MLOPS_S3_*) instead of the model_repository directory; Triton must "
        "be started on the same location (Triton's form for a non-AWS endpoint: "
        "s3://host:port/bucket/prefix).",
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
    retry_attempts: int = Field(
        3,
        ge=1,
        description="Tries of a repeatable MLflow call whose transfer broke (MLflow's HTTP "
        "layer retries refused connections itself).",
    )
    retry_backoff_s: float = Field(
        0.5, ge=0, description="Pause after the first broken transfer, doubling per try."
    )


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


class ServingClientSettings(BaseSettings):
    """How clients (the traffic simulator) reach the prediction API; the same variables as
    the serving service's own address."""

    model_config = _config("MLOPS_SERVING_")

    host: str = Field("127.0.0.1", description="Serving host.")
    port: int = Field(50051, description="gRPC port of mlops.v1.Predictor.")

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


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
    tls_ca_file: Path | None = Field(
        None,
        description="CA bundle (PEM) that signed the registry's certificate: set it to talk "
        "TLS to a registry that serves TLS (MLOPS_REGISTRY_TLS_CERT_FILE).",
    )
    tls_cert_file: Path | None = Field(
        None, description="Client certificate (PEM), for a registry that requires one (mTLS)."
    )
    tls_key_file: Path | None = Field(None, description="Private key (PEM) of tls_cert_file.")
    tls_server_name: str = Field(
        "",
        description="Name to check the registry's certificate against when it differs from "
        "the address's host (e.g. connecting through a port-forward).",
    )

    def bearer_token(self) -> str:
        """The configured token, else the token file's content, else empty."""
        if self.token.get_secret_value():
            return self.token.get_secret_value()
        try:
            return self.token_file.read_text().strip()
        except OSError:
            return ""


class AutopilotClientSettings(BaseSettings):
    """How the CLI and the dashboard reach the autopilot's JSON API (its metrics port)."""

    model_config = _config("MLOPS_AUTOPILOT_CLIENT_")

    url: str = Field("http://127.0.0.1:9107", description="Base URL of the autopilot's API.")
    timeout_s: float = Field(5.0, gt=0, description="Timeout of each call.")


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


class GrpcTlsSettings(BaseModel):
    """TLS of a gRPC server (mixed into serving's and registry's settings). No certificate:
    plaintext, as the local stack runs."""

    tls_cert_file: Path | None = Field(
        None,
        description="Server certificate chain (PEM). Set with tls_key_file: the gRPC port "
        "speaks TLS only.",
    )
    tls_key_file: Path | None = Field(None, description="Private key (PEM) of tls_cert_file.")
    tls_client_ca_file: Path | None = Field(
        None,
        description="CA bundle (PEM) of client certificates: set, every client must present a "
        "certificate it signed (mutual TLS).",
    )
    health_port: int = Field(
        0,
        ge=0,
        description="A second, plaintext port serving only grpc.health.v1 (Kubernetes' gRPC "
        "probes cannot speak TLS); 0: none.",
    )

    @model_validator(mode="after")
    def _complete(self) -> Self:
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("tls_cert_file and tls_key_file are set together")
        if self.tls_client_ca_file is not None and self.tls_cert_file is None:
            raise ValueError("tls_client_ca_file (mutual TLS) needs tls_cert_file and tls_key_file")
        return self

    @property
    def tls_enabled(self) -> bool:
        return self.tls_cert_file is not None


class ServiceSettings(BaseSettings):
    """What every service has: a name, a metrics port and the shared components."""

    model_config = _config("MLOPS_")

    metrics_host: str = Field("127.0.0.1", description="Address /metrics binds to.")
    metrics_port: int = Field(0, description="Port of /metrics (0: a free port).")
    kafka: KafkaSettings = Field(default_factory=KafkaSettings)
    log: ObservabilitySettings = Field(default_factory=ObservabilitySettings)
