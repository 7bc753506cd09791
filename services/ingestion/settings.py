"""Settings of the ingestion service (prefix ``MLOPS_INGESTION_``)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from services.shared.settings import HeapSettings, RedisSettings, ServiceSettings, StorageSettings


class IngestionSettings(ServiceSettings, HeapSettings):
    """Validation, duplicate detection and archiving of the product events."""

    model_config = SettingsConfigDict(env_prefix="MLOPS_INGESTION_", extra="ignore", frozen=True)

    metrics_port: int = Field(9101, description="Port of /metrics.")
    redis: RedisSettings = Field(
        default_factory=RedisSettings, description="Redis holding the duplicate-detection state."
    )
    storage: StorageSettings = Field(
        default_factory=StorageSettings, description="The offline store the archive writes to."
    )
    group_id: str = Field("ingestion", description="Consumer group of the validator.")
    batch_max_records: int = Field(
        1000, ge=1, description="Records the validator handles per batch (one Redis round trip)."
    )
    poll_timeout_ms: int = Field(200, ge=1, description="How long a poll waits for records.")
    dedup_namespace: str = Field(
        "mlops:ingestion",
        description="Prefix of the duplicate-detection hashes in Redis (<prefix>:claims:<bucket>).",
    )
    dedup_ttl_s: int = Field(
        8 * 24 * 3600,
        ge=60,
        description="How long an id is remembered at least (at most twice that): a re-sent "
        "event within it is a duplicate.",
    )
    role: Literal["all", "validator", "archive"] = Field(
        "all",
        description="What this process runs: 'all' (validator and archive consumers), or "
        "only one of them, to run them as separate processes (each its own core).",
    )
    archive_group_id: str = Field(
        "ingestion-archive", description="Consumer group of the archive consumer."
    )
    archive_max_rows: int = Field(
        50_000, ge=1, description="A Parquet file is written when it has this many rows..."
    )
    archive_max_age_s: float = Field(
        30.0, gt=0, description="...or when its first row has waited this long (seconds)."
    )
    retry_initial_s: float = Field(
        0.2, gt=0, description="First back-off when Kafka or Redis fails (doubles each time)."
    )
    retry_max_s: float = Field(10.0, gt=0, description="Longest back-off between retries.")
    lag_interval_s: float = Field(
        2.0, gt=0, description="How often the consumer lag gauges are refreshed (seconds)."
    )
