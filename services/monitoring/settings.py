"""Settings of the monitoring service (prefix ``MLOPS_MONITORING_``)."""

from __future__ import annotations

import json
from typing import Annotated

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from services.shared.settings import (
    FeastSettings,
    MlflowSettings,
    RedisSettings,
    ServiceSettings,
    StorageSettings,
)
from services.shared.usecase.features import MODEL_INPUTS

# Time-of-day inputs: any window of live traffic covers a few hours of the day while the
# training data covers all of them, so their distribution "drifts" every hour by design.
_SEASONAL_INPUTS = ("hour_sin", "hour_cos")
DEFAULT_DRIFT_INPUTS = tuple(name for name in MODEL_INPUTS if name not in _SEASONAL_INPUTS)
# Inputs with at most an hour of memory, or means: stationary once live traffic continues a
# history of an hour or more. The 24 h counts and sums (and is_first_seen_user) keep moving
# until the history spans a day, so a platform (or a test) whose history is shorter watches
# these (MLOPS_MONITORING_DRIFT_INPUTS).
_DAY_MEMORY_INPUTS = (
    "is_first_seen_user",
    "log_user_txn_count_24h",
    "log_user_amount_sum_24h",
    "user_distinct_merchants_24h",
    "log_merchant_txn_count_24h",
)
SHORT_MEMORY_DRIFT_INPUTS = tuple(n for n in DEFAULT_DRIFT_INPUTS if n not in _DAY_MEMORY_INPUTS)


class MonitoringSettings(ServiceSettings):
    """What the monitoring service reads, how it joins, measures and detects drift."""

    model_config = SettingsConfigDict(env_prefix="MLOPS_MONITORING_", extra="ignore", frozen=True)

    metrics_port: int = Field(
        9106, description="Port of /metrics and of the JSON API (/api/v1/quality, drift, paired)."
    )
    group_id: str = Field(
        "monitoring",
        description="Consumer group that reads predictions.log and events.validated.labels "
        "(commits up to what the join still needs; where counting stopped in the metadata).",
    )
    poll_timeout_ms: int = Field(
        500, ge=1, description="How long a poll waits for records (also how soon a stop is seen)."
    )
    max_poll_records: int = Field(2000, ge=1, description="Records handled per poll.")
    fetch_wait_ms: int = Field(
        500,
        ge=0,
        le=5000,
        description="How long a fetch of predictions.log and labels may wait to fill up "
        "(monitoring is not on a latency path; fewer, fuller fetches cost the broker less).",
    )
    lag_interval_s: float = Field(
        2.0, gt=0, description="How often the consumer lag gauges are refreshed (seconds)."
    )
    start_timeout_s: float = Field(
        60.0,
        gt=0,
        description="How long start-up waits for the broker before exiting (the supervisor "
        "then restarts the service).",
    )
    commit_interval_s: float = Field(
        1.0,
        gt=0,
        description="How often offsets are committed: up to the oldest prediction still waiting "
        "for its label (and the labels that may still meet it), so a restart re-reads them.",
    )
    tick_interval_s: float = Field(
        2.0, gt=0, description="How often the join expires, windows slide and gauges refresh."
    )
    # ---- the join
    join_max_wait_s: float = Field(
        1800.0,
        gt=0,
        description="How long a prediction waits for its label (stream time) before it counts "
        "as expired (unlabelled).",
    )
    join_max_pending: int = Field(
        500_000,
        ge=1,
        description="Most predictions waiting at once; beyond it the oldest are evicted (counted).",
    )
    label_linger_s: float = Field(
        60.0,
        ge=0,
        description="How long a label that found no prediction waits for one (a late shadow "
        "score) before it counts as unmatched.",
    )
    # ---- live quality
    window_s: float = Field(
        3600.0, gt=0, description="Sliding window of the quality figures (seconds of stream time)."
    )
    window_max: int = Field(
        50_000, ge=10, description="Most outcomes in one version's and route's window."
    )
    min_labelled: int = Field(
        200,
        ge=1,
        description="Fewer labelled outcomes than this in a window: the figures are "
        "'insufficient data'.",
    )
    min_positives: int = Field(
        5, ge=1, description="Fewer labelled frauds than this: 'insufficient data'."
    )
    paired_capacity: int = Field(
        100_000,
        ge=1,
        description="Labelled transactions kept per model with every version's score "
        "(/api/v1/paired).",
    )
    # ---- drift
    drift_inputs: Annotated[tuple[str, ...], NoDecode] = Field(
        DEFAULT_DRIFT_INPUTS,
        description="Model inputs watched for data drift (comma separated or a JSON list); by "
        "default all but the time-of-day ones, whose live window always differs from training.",
    )
    drift_false_alarms_per_million: float = Field(
        1.0,
        gt=0,
        description="False drift events per million events, all signals of a version together; "
        "every threshold is calibrated by simulation for its share of it.",
    )
    drift_input_shift: float = Field(
        0.5,
        gt=0,
        description="Per-input and score CUSUMs are tuned for shifts of this many reference "
        "standard deviations (k = half of it).",
    )
    drift_pooled_shift: float = Field(
        0.5,
        gt=0,
        description="The pooled (multivariate) CUSUM is tuned for shifts of this Mahalanobis "
        "length.",
    )
    drift_concept_shift: float = Field(
        0.5,
        gt=0,
        description="The concept CUSUM is tuned for a rise of the mean log loss by this "
        "fraction of its baseline.",
    )
    drift_concept_warmup: int = Field(
        2000,
        ge=50,
        description="Labelled outcomes of a new production version that set its log-loss "
        "baseline before concept drift is watched.",
    )
    drift_rank_shift: float = Field(
        1.0,
        gt=0,
        description="The fraud-rank CUSUM is tuned for a fall of the frauds' normal-scored rank "
        "among recent legitimate payments by this many standard deviations.",
    )
    drift_rank_warmup: int = Field(
        100,
        ge=30,
        description="Labelled frauds of a new production version that set its fraud-rank "
        "baseline before that signal is watched.",
    )
    drift_rank_window: int = Field(
        2000,
        ge=100,
        description="Recent legitimate labelled payments a fraud's score is ranked among.",
    )
    drift_data_warmup: int = Field(
        5000,
        ge=100,
        description="Live events that stand in for the reference of a version that has none.",
    )
    drift_calibration_events: int = Field(
        200_000,
        ge=10_000,
        description="Simulated events per threshold calibration (more: steadier thresholds, "
        "slower start).",
    )
    drift_moved_input_sd: float = Field(
        0.2,
        gt=0,
        description="A pooled data-drift event names the inputs whose mean normal score moved "
        "at least this far since the onset.",
    )
    drift_cooldown_s: float = Field(
        900.0,
        ge=0,
        description="After an event a signal raises no other for this long (stream time).",
    )
    drift_use_training_reference: bool = Field(
        True,
        description="Measure inputs and scores against the version's training data (its "
        "drift reference artifact); false: against its first live events.",
    )
    mlflow: MlflowSettings = Field(default_factory=MlflowSettings)

    @field_validator("drift_inputs", mode="before")
    @classmethod
    def _split(cls, value: object) -> object:
        if isinstance(value, str):
            if value.lstrip().startswith("["):
                return tuple(json.loads(value))
            return tuple(v.strip() for v in value.split(",") if v.strip())
        return value

    @field_validator("drift_inputs")
    @classmethod
    def _known(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        unknown = [v for v in value if v not in MODEL_INPUTS]
        if unknown:
            raise ValueError(f"not model inputs: {', '.join(unknown)}")
        if not value:
            raise ValueError("at least one input")
        return value


class SkewSettings(BaseSettings):
    """The sampled training-serving skew comparison (prefix ``MLOPS_MONITORING_SKEW_``)."""

    model_config = SettingsConfigDict(
        env_prefix="MLOPS_MONITORING_SKEW_", extra="ignore", frozen=True
    )

    enabled: bool = Field(True, description="Compare a sample of predictions continuously.")
    sample_rate: float = Field(
        0.01, ge=0, le=1, description="Share of transactions compared (by transaction id)."
    )
    interval_s: float = Field(
        120.0,
        gt=0,
        description="How often the waiting sample is compared (one Feast historical retrieval "
        "over the offline feature log per round: seconds of CPU on a large log).",
    )
    min_age_s: float = Field(
        30.0,
        ge=0,
        description="A prediction is compared once this old, so that the offline feature "
        "log (flushed every few seconds by the features service) holds its features.",
    )
    max_batch: int = Field(200, ge=1, description="Most predictions compared per round.")
    max_waiting: int = Field(
        2000, ge=1, description="Most sampled predictions held; beyond, dropped and counted."
    )
    tolerance: float = Field(
        1e-4, gt=0, description="Relative difference below which a model input is equal."
    )
    feast: FeastSettings = Field(default_factory=FeastSettings)
    redis: RedisSettings = Field(default_factory=RedisSettings)
    storage: StorageSettings = Field(default_factory=StorageSettings)
