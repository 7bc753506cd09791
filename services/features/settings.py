"""Settings of the features service (environment prefix ``MLOPS_FEATURES_``)."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from services.shared.settings import (
    FeastSettings,
    HeapSettings,
    RedisSettings,
    ServiceSettings,
    StorageSettings,
)
from services.shared.topics import Topics


class FeaturesSettings(ServiceSettings, HeapSettings):
    """The streaming features worker (faust) writing Feast's online and offline stores."""

    model_config = SettingsConfigDict(env_prefix="MLOPS_FEATURES_", extra="ignore", frozen=True)

    metrics_port: int = Field(9102, description="Port of /metrics (0: a free port).")
    redis: RedisSettings = Field(default_factory=RedisSettings)
    storage: StorageSettings = Field(default_factory=StorageSettings)
    feast: FeastSettings = Field(default_factory=FeastSettings)

    app_id: str = Field(
        "mlops-features",
        description="Faust application id: the consumer group, and the prefix of the service's "
        "changelog and internal topics (the Kafka topic prefix is prepended).",
    )
    allowed_lateness_s: float = Field(
        3600.0,
        ge=0,
        le=7 * 86400,
        description="How far behind an entity's latest event time an event may be and still "
        "count; older events are counted in a metric and dropped.",
    )
    batch_max_events: int = Field(
        1000, ge=1, description="Most events processed (and pushed to Feast) as one batch."
    )
    batch_within_ms: int = Field(
        50,
        ge=1,
        description="Longest wait for a batch to fill before it is processed. Most of the "
        "worker's costs are per batch (broker requests, pushes, faust's batching): at "
        "2,000 events/s, 60 ms instead of 20 ms measured 463 instead of 525-598 µs of CPU per "
        "event (loaded machine), for a longer wait in freshness.",
    )
    offline_flush_interval_s: float = Field(
        2.0,
        gt=0,
        description="Feature rows are written to the offline store as one Parquet file per "
        "view and event date at least this often; input offsets are committed only after.",
    )
    offline_flush_max_rows: int = Field(
        50_000, ge=1, description="Write the offline files early once this many rows wait."
    )
    max_user_facts: int = Field(
        10_000, ge=1, description="Cap on a user's retained transactions (oldest dropped)."
    )
    max_merchant_facts: int = Field(
        1_000_000,
        ge=1,
        description="Cap on a merchant's retained transactions and labels (oldest dropped).",
    )
    label_join_retention_s: float = Field(
        7 * 86400 + 3600,
        gt=0,
        description="How long (event time) a transaction's merchant is remembered for labels "
        "arriving later; older labels could only fall outside the 7-day fraud-rate window.",
    )
    label_hold_s: float = Field(
        86400.0,
        gt=0,
        description="How long (event time) a label that arrived before its transaction is "
        "held waiting for it.",
    )
    max_held_labels: int = Field(
        200_000, ge=1, description="Cap on labels waiting for their transaction (oldest dropped)."
    )
    expiry_interval_s: float = Field(
        30.0, gt=0, description="How often idle entities and old join entries are expired."
    )
    table_standby_replicas: int = Field(
        0, ge=0, description="Faust standby replicas of table state (0: one worker locally)."
    )
    web_port: int = Field(
        0,
        ge=0,
        description="Port of faust's own web server; 0 disables it (metrics are on metrics_port).",
    )
    registry_wait_s: float = Field(
        300.0,
        gt=0,
        description="How long to wait at start-up for the Feast registry (applied by the "
        "stack) to hold the push sources.",
    )

    @property
    def group_id(self) -> str:
        return f"{self.kafka.topic_prefix}{self.app_id}"

    @property
    def transaction_refs_topic(self) -> str:
        """Internal topic: transactions re-keyed by transaction_id (to meet their labels)."""
        return f"{self.group_id}.transaction-refs"

    @property
    def merchant_facts_topic(self) -> str:
        """Internal topic: transactions and joined labels re-keyed by merchant_id."""
        return f"{self.group_id}.merchant-facts"

    def input_topics(self) -> list[str]:
        """Every topic the service consumes: its group's lag over these is its backlog."""
        topics = Topics.from_settings(self.kafka)
        return [
            topics.validated,
            topics.validated_labels,
            self.transaction_refs_topic,
            self.merchant_facts_topic,
        ]
