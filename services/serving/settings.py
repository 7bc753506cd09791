"""Settings of the serving service (prefix ``MLOPS_SERVING_``)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from services.shared.settings import (
    FeastSettings,
    GrpcTlsSettings,
    RedisSettings,
    RegistryClientSettings,
    ServiceSettings,
    StorageSettings,
    TritonSettings,
)


class ServingSettings(ServiceSettings, GrpcTlsSettings):
    """The prediction API: where it listens, how it batches, how it degrades."""

    model_config = SettingsConfigDict(env_prefix="MLOPS_SERVING_", extra="ignore", frozen=True)

    host: str = Field("127.0.0.1", description="Address the gRPC server binds to.")
    port: int = Field(50051, description="gRPC port of mlops.v1.Predictor.")
    metrics_port: int = Field(9105, description="Port of /metrics.")

    workers: int = Field(
        1,
        ge=1,
        description="Serving processes sharing the gRPC port (SO_REUSEPORT), one per core "
        "worth using; with more than one, the started process supervises them and serves "
        "their summed metrics (services/serving/workers.py).",
    )
    worker_index: int = Field(
        -1, description="Set by the supervising process for each worker; -1: not a worker."
    )
    batch_max_size: int = Field(
        256, ge=1, description="Most requests coalesced into one feature read and Triton call."
    )
    max_batch_requests: int = Field(
        1000,
        ge=1,
        description="Most transactions one PredictBatch call may carry (more: "
        "INVALID_ARGUMENT naming requests); a gRPC message is at most 16 MiB on top.",
    )
    batch_max_delay_ms: float = Field(
        1.0,
        ge=0.0,
        description="Longest a request waits for others to join its batch (0: the same "
        "event-loop turn only).",
    )
    batch_max_in_flight: int = Field(
        1,
        ge=1,
        description="Batches scored at once; while they run, new requests gather into the "
        "next batch (bigger batches under load, fixed costs shared).",
    )
    default_timeout_ms: float = Field(
        1000.0, gt=0, description="Time budget of a call whose caller sets no deadline."
    )
    deadline_margin_ms: float = Field(
        5.0,
        ge=0,
        description="Kept back from the caller's deadline so that a dependency failure is "
        "answered (UNAVAILABLE) before the caller gives up: at least this much...",
    )
    deadline_margin_fraction: float = Field(
        0.05,
        ge=0,
        lt=1,
        description="...and at least this fraction of the caller's time (event-loop lag "
        "under load grows with the budget's scale).",
    )
    feature_timeout_ms: float = Field(
        50.0,
        gt=0,
        description="Longest an online-feature read may take before it counts as failed.",
    )
    feature_retry_interval_ms: float = Field(
        250.0,
        ge=0,
        description="After a failed online-feature read, how long requests use the defaults "
        "without trying Redis again (keeps latency flat while Redis is down).",
    )
    on_feature_store_unavailable: Literal["degrade", "fail"] = Field(
        "degrade",
        description="'degrade': answer with default features and degraded=true; 'fail': "
        "answer UNAVAILABLE.",
    )
    switch_wait_ms: float = Field(
        2000.0,
        ge=0,
        description="When Triton no longer serves the version a request was routed to while "
        "the routing table still names it (the registry is switching versions), how long the "
        "request may wait for the new table (never past its deadline).",
    )
    redis_pool_size: int = Field(8, ge=1, description="Redis connections kept open.")
    prediction_log_capacity: int = Field(
        20_000,
        ge=1,
        description="Prediction records buffered for predictions.log; beyond it they are "
        "dropped (and counted), never waited for.",
    )
    prediction_log_flush_ms: int = Field(
        250,
        ge=1,
        le=5000,
        description="How often buffered prediction records are sent to predictions.log: "
        "fewer, fuller record batches (at 3,000 Predict/s, about 190 records per partition "
        "each). Its readers (monitoring, the shadow judge) are not on a latency path; small "
        "batches cost the broker per batch (the local broker, whose fetches cost grows with "
        "the batches it holds, spent 0.4-0.7 cores serving monitoring at 20 ms).",
    )
    shadow_max_inflight: int = Field(
        8,
        ge=0,
        description="Shadow scoring batches in flight at once; beyond it shadow copies "
        "are skipped (and counted).",
    )
    shadow_replay_s: float = Field(
        600.0,
        ge=0,
        description="When a new shadow version is set, the answers of this many seconds before "
        "are scored on it too (from their logged model inputs; records marked replayed): its "
        "paired comparison need not wait a label delay for labels of transactions it scored "
        "live. Monitoring joins a replayed score only with a label that comes after it. "
        "0: off.",
    )
    shadow_replay_max_rows: int = Field(
        20_000,
        ge=0,
        description="At most this many recent answers are kept for a replay (the newest).",
    )
    health_interval_s: float = Field(
        1.0, gt=0, description="How often Triton is probed for the routed versions."
    )
    registry_retry_interval_s: float = Field(
        2.0, gt=0, description="Retry interval of the start-up routing read from the registry."
    )

    redis: RedisSettings = Field(default_factory=RedisSettings)
    triton: TritonSettings = Field(default_factory=TritonSettings)
    feast: FeastSettings = Field(default_factory=FeastSettings)
    storage: StorageSettings = Field(default_factory=StorageSettings)
    registry: RegistryClientSettings = Field(default_factory=RegistryClientSettings)
