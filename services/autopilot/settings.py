"""Settings of the autopilot (prefix ``MLOPS_AUTOPILOT_``)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from services.autopilot.judges import OperationalPolicy, PairedPolicy
from services.autopilot.loop import LoopPolicy
from services.shared.settings import RegistryClientSettings, ServiceSettings, StorageSettings


class AutopilotSettings(ServiceSettings):
    """The closed loop: when to retrain, how to judge a candidate live, when to stop."""

    model_config = SettingsConfigDict(env_prefix="MLOPS_AUTOPILOT_", extra="ignore", frozen=True)

    metrics_port: int = Field(
        9107, description="Port of /metrics and of the loop's JSON API (/api/v1/loop...)."
    )
    group_id: str = Field(
        "autopilot", description="Consumer group on monitoring.drift and models.lifecycle."
    )
    tick_s: float = Field(
        2.0, gt=0, description="How often timers, timeouts and the judges are looked at."
    )
    monitoring_url: str = Field(
        "http://127.0.0.1:9106",
        description="Monitoring's HTTP API (paired scores of shadow and production, live quality).",
    )
    prometheus_url: str = Field(
        "http://127.0.0.1:9090",
        description="Prometheus's HTTP API: serving's, monitoring's and Triton's metrics for "
        "the canary and the watch after a promotion, ingestion's label count.",
    )
    http_timeout_s: float = Field(5.0, gt=0, description="Timeout of each HTTP query.")
    state_file: Path | None = Field(
        None,
        description="Where the loop's state is persisted (default: "
        "<storage data dir>/autopilot/state.json).",
    )

    # triggers and guardrails
    drift_kinds: tuple[str, ...] = Field(
        ("concept", "data", "score"),
        description="Kinds of DriftEvent that ask for a retraining.",
    )
    schedule_interval_s: float = Field(
        0.0, ge=0, description="Retrain at least this often (seconds); 0 disables the schedule."
    )
    quality_floor: float = Field(
        0.0,
        ge=0,
        le=1,
        description="Retrain when production's live PR-AUC (monitoring) falls below this; "
        "0 disables the floor.",
    )
    quality_min_labelled: int = Field(
        200, ge=1, description="Labelled predictions a live PR-AUC needs before it counts."
    )
    cooldown_s: float = Field(
        900.0, ge=0, description="Least time between two retraining requests of the loop."
    )
    deferred_max_age_s: float = Field(
        3600.0,
        gt=0,
        description="A drift event held back (by the cooldown or a busy loop) is acted on "
        "later only if it is younger than this: one from before a long stop of the stack "
        "says nothing about today's traffic (monitoring raises a new one if the shift lasts).",
    )
    min_new_labels: int = Field(
        500,
        ge=0,
        description="Labelled outcomes archived since the last training before another is "
        "worth asking for (ingestion's count, through Prometheus).",
    )
    training_timeout_s: float = Field(
        1800.0, gt=0, description="A requested training that registers nothing by then failed."
    )
    max_training_attempts: int = Field(
        4,
        ge=1,
        description="Trainings one cycle may ask for when its candidates do not pass the gate "
        "(too little held-out data, or not shown better: a candidate trained on the shift's "
        "first minute), each once the outcomes labelled since the cycle began have doubled. "
        "The registry's gate splits its error rate over them (RetrainRequest.gate_tests), so "
        "a cycle's false-pass rate stays the gate's stated one.",
    )
    max_consecutive_rollbacks: int = Field(
        3,
        ge=1,
        description="Automatic rollbacks in a row after which the loop halts until an operator "
        "resumes it.",
    )

    # shadow: the paired live comparison
    shadow_percent: int = Field(100, ge=1, le=100, description="Traffic mirrored to the shadow.")
    judge_interval_s: float = Field(
        15.0, gt=0, description="Time between two looks of a judge (shadow, canary, watch)."
    )
    paired_metric: Literal["log_loss", "pr_auc"] = Field(
        "pr_auc",
        description="Metric of the paired comparison: pr_auc (the gate's: ranking, what a "
        "fraud threshold needs) or log_loss (more sample-efficient, but it prefers a constant "
        "to a sharp, badly calibrated model).",
    )
    paired_min_pairs: int = Field(
        300, ge=10, description="Labelled transactions both versions scored before a verdict."
    )
    paired_min_positives: int = Field(10, ge=1, description="Frauds among them before a verdict.")
    paired_alpha: float = Field(
        0.05,
        gt=0,
        lt=0.5,
        description="Chance of a false 'better' over all looks (each look: alpha/max_looks).",
    )
    paired_max_looks: int = Field(
        10, ge=1, description="Looks with enough data before an undecided shadow is withdrawn."
    )
    paired_margin: float = Field(
        0.0, ge=0, description="Improvement the interval's lower bound must clear."
    )
    paired_resamples: int = Field(1000, ge=100, description="Bootstrap resamples.")
    paired_look_new_positives: int = Field(
        5,
        ge=1,
        description="Labelled frauds a shadow look needs beyond the last counted look's (looks "
        "are spaced by evidence, so the max_looks budget is not spent on the same data).",
    )
    paired_fpr_tolerance: float = Field(
        0.05,
        ge=0,
        le=1,
        description="A candidate declining a larger share of legitimate payments than "
        "production counts as worse only when the share is significantly higher and higher by "
        "more than this (absolute). Training caps its own threshold at 2 % on validation; "
        "live, a candidate answering a new fraud pattern declined 1.4-4.5 % (production "
        "0-2.5 %) in the closed-loop runs of 2026-12-07: at 0.02 one of them, catching 93 % of "
        "the new frauds against production's 0 %, was withdrawn.",
    )
    paired_limit: int = Field(
        20_000, ge=100, description="Most recent paired transactions asked of monitoring."
    )
    shadow_timeout_s: float = Field(
        1800.0, gt=0, description="A shadow without a verdict by then is withdrawn."
    )

    # canary: what shadow cannot see
    canary_percent: int = Field(
        10, ge=1, le=50, description="Traffic answered by the canary (its least share)."
    )
    canary_max_percent: int = Field(
        50,
        ge=1,
        le=50,
        description="The canary's largest share: on thin traffic the share is raised so the "
        "minimum sample (canary_min_requests) arrives within canary_sample_s; a bad canary "
        "still gives at most that sample's answers before its verdict. Set it to "
        "canary_percent for a fixed share.",
    )
    canary_sample_s: float = Field(
        30.0,
        ge=0,
        description="The time the canary's share is sized for (its minimum sample at "
        "production's traffic of the shadow phase); 0: a fixed share.",
    )
    canary_min_requests: int = Field(
        200, ge=1, description="Answers of the canary (and of production) before a verdict."
    )
    canary_min_s: float = Field(30.0, ge=0, description="Shortest canary.")
    canary_alpha: float = Field(
        0.05,
        gt=0,
        lt=0.5,
        description="Chance of a false rollback over all checks and looks (Bonferroni).",
    )
    canary_max_looks: int = Field(20, ge=1, description="Looks the canary's alpha is split over.")
    canary_error_tolerance: float = Field(
        0.005, ge=0, description="Extra error rate tolerated (absolute)."
    )
    canary_latency_quantile: float = Field(
        0.95,
        gt=0,
        lt=1,
        description="Answers slower than production's bucket at this quantile count as slow.",
    )
    canary_latency_tolerance: float = Field(
        0.05, ge=0, description="Extra share of slow answers tolerated (absolute)."
    )
    canary_degraded_tolerance: float = Field(
        0.01, ge=0, description="Extra share of degraded answers tolerated (absolute)."
    )
    canary_timeout_s: float = Field(
        900.0, gt=0, description="A canary without enough data by then is withdrawn."
    )
    settle_s: float = Field(
        10.0,
        ge=0,
        description="Canary and watch figures are counted from this long after the switch "
        "(while serving moves traffic over, latency says nothing about the version).",
    )
    watch_s: float = Field(
        120.0,
        ge=0,
        description="After a promotion, how long production is compared with the previous "
        "version's canary-time figures (rolled back if worse).",
    )

    registry: RegistryClientSettings = Field(default_factory=RegistryClientSettings)
    storage: StorageSettings = Field(default_factory=StorageSettings)

    @property
    def state_path(self) -> Path:
        return self.state_file or self.storage.data_dir / "autopilot" / "state.json"

    def policy(self) -> LoopPolicy:
        return LoopPolicy(
            model_name=self.registry.model_name,
            drift_kinds=tuple(self.drift_kinds),
            schedule_interval_s=self.schedule_interval_s,
            quality_floor=self.quality_floor,
            quality_min_labelled=self.quality_min_labelled,
            cooldown_s=self.cooldown_s,
            deferred_max_age_s=self.deferred_max_age_s,
            min_new_labels=self.min_new_labels,
            training_timeout_s=self.training_timeout_s,
            max_training_attempts=self.max_training_attempts,
            max_consecutive_rollbacks=self.max_consecutive_rollbacks,
            shadow_percent=self.shadow_percent,
            shadow_timeout_s=self.shadow_timeout_s,
            paired_limit=self.paired_limit,
            judge_interval_s=self.judge_interval_s,
            canary_percent=self.canary_percent,
            canary_max_percent=self.canary_max_percent,
            canary_sample_s=self.canary_sample_s,
            canary_timeout_s=self.canary_timeout_s,
            watch_s=self.watch_s,
            settle_s=self.settle_s,
            paired=PairedPolicy(
                metric=self.paired_metric,
                min_pairs=self.paired_min_pairs,
                min_positives=self.paired_min_positives,
                alpha=self.paired_alpha,
                max_looks=self.paired_max_looks,
                margin=self.paired_margin,
                resamples=self.paired_resamples,
                look_new_positives=self.paired_look_new_positives,
                fpr_tolerance=self.paired_fpr_tolerance,
            ),
            operational=OperationalPolicy(
                min_requests=self.canary_min_requests,
                min_duration_s=self.canary_min_s,
                alpha=self.canary_alpha,
                max_looks=self.canary_max_looks,
                error_tolerance=self.canary_error_tolerance,
                latency_quantile=self.canary_latency_quantile,
                latency_tolerance=self.canary_latency_tolerance,
                degraded_tolerance=self.canary_degraded_tolerance,
            ),
        )
