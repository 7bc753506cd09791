"""Settings of the training service (prefix ``MLOPS_TRAINING_``) and its hyperparameters."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from services.shared.settings import (
    FeastSettings,
    MlflowSettings,
    RedisSettings,
    RegistryClientSettings,
    ServiceSettings,
    StorageSettings,
)


class TrainingParams(BaseSettings):
    """Hyperparameters of a training run (prefix ``MLOPS_TRAINING_PARAM_``).

    Every field is logged to MLflow as a run parameter; ``from_logged`` reads them back, which
    is how ``mlops models reproduce`` retrains with exactly the same ones.
    """

    model_config = SettingsConfigDict(
        env_prefix="MLOPS_TRAINING_PARAM_", extra="ignore", frozen=True
    )

    seed: int = Field(42, description="Seed of every random choice (torch, shuffling, baseline).")
    epochs: int = Field(40, ge=1, description="Maximum epochs.")
    patience: int = Field(6, ge=1, description="Epochs without a better validation PR-AUC.")
    batch_size: int = Field(256, ge=8, description="Mini-batch size.")
    learning_rate: float = Field(2e-3, gt=0, description="Adam learning rate.")
    weight_decay: float = Field(1e-4, ge=0, description="Adam weight decay.")
    hidden: Annotated[tuple[int, ...], NoDecode] = Field(
        (64, 32), description="Hidden layer widths ('64,32')."
    )
    dropout: float = Field(0.1, ge=0, lt=1, description="Dropout after each hidden layer.")
    imbalance: Literal["pos_weight", "none"] = Field(
        "none",
        description="Class imbalance handling: 'none' (plain log-loss: probabilities calibrated "
        "as they are; measured better on PR-AUC than 'pos_weight' and at least as good as the "
        "gradient-boosting baseline), or 'pos_weight': frauds weighed by negatives/positives in "
        "the loss (the output is then prior-corrected so probabilities stay calibrated).",
    )
    validation_fraction: float = Field(
        0.15, gt=0, lt=0.5, description="Share of rows (by event time) for validation."
    )
    test_fraction: float = Field(
        0.2, gt=0, lt=0.5, description="Share of rows (the latest) held out for testing."
    )
    torch_threads: int = Field(
        1, ge=1, description="CPU threads; fixed so that results are bit-identical run to run."
    )
    baseline_max_iter: int = Field(200, ge=1, description="Boosting rounds of the baseline.")
    max_false_positive_rate: float = Field(
        0.02,
        gt=0,
        le=1,
        description="The decision threshold maximises F1 on the validation period among "
        "thresholds that flag at most this share of its legitimate transactions (both the "
        "model's and the baseline's).",
    )
    drift_onset: datetime | None = Field(
        None,
        description="When the shift this run answers began (the drift event's onset_at; the "
        "training service sets it from a drift-triggered RetrainRequest). None: no shift, the "
        "oldest-to-newest split of the whole snapshot. Set: the recency split of "
        "services/training/window.py (the drift_* parameters).",
    )
    drift_window_days: float = Field(
        0.0,
        ge=0,
        description="Drift runs: days of history before the onset to train on (0: all of it).",
    )
    drift_post_onset_weight: float = Field(
        10.0,
        ge=1,
        description="Drift runs: training weight of a row after the onset relative to one "
        "before it (post-onset emphasis; 1: none).",
    )
    drift_validation_fraction: float = Field(
        0.2,
        gt=0,
        lt=0.5,
        description="Drift runs: share of the labelled rows after the onset used for "
        "validation (early stopping, threshold): the period just before the test rows.",
    )
    drift_test_fraction: float = Field(
        0.4,
        gt=0,
        lt=0.7,
        description="Drift runs: share of the labelled rows after the onset held out for "
        "testing and for the registry's gate: the most recent ones.",
    )

    @field_validator("hidden", mode="before")
    @classmethod
    def _parse_hidden(cls, value: Any) -> Any:
        if isinstance(value, str):
            text = value.strip().strip("[]()")
            return tuple(int(part) for part in text.split(",") if part.strip())
        return value

    def as_logged(self) -> dict[str, str]:
        """The parameters as MLflow stores them (strings; None as empty)."""
        logged: dict[str, str] = {}
        for name, value in self.model_dump().items():
            if value is None:
                logged[name] = ""
            elif isinstance(value, tuple):
                logged[name] = ",".join(str(v) for v in value)
            elif isinstance(value, datetime):
                logged[name] = value.isoformat()
            else:
                logged[name] = str(value)
        return logged

    @classmethod
    def from_logged(cls, logged: dict[str, str]) -> TrainingParams:
        known = {k: v for k, v in logged.items() if k in cls.model_fields and v != ""}
        return cls.model_validate(known)


class TrainingSettings(ServiceSettings):
    """The training service: consumes training.requests, trains, tracks and registers."""

    model_config = SettingsConfigDict(env_prefix="MLOPS_TRAINING_", extra="ignore", frozen=True)

    metrics_port: int = Field(9103, description="Port of /metrics.")
    consumer_group: str = Field("training", description="Kafka consumer group.")
    code_commit: str = Field(
        "",
        description="The code version recorded with every run (set it in containers without "
        "a git checkout); empty: the checkout's `git rev-parse HEAD` plus a dirty flag.",
    )
    register_models: bool = Field(
        True, description="Register finished runs with the model registry over gRPC."
    )
    registry_timeout_s: float = Field(
        300.0, description="Deadline of RegisterModelVersion (it runs the evaluation gate)."
    )
    params: TrainingParams = Field(default_factory=TrainingParams)
    storage: StorageSettings = Field(default_factory=StorageSettings)
    feast: FeastSettings = Field(default_factory=FeastSettings)
    redis: RedisSettings = Field(default_factory=RedisSettings)
    mlflow: MlflowSettings = Field(default_factory=MlflowSettings)
    registry: RegistryClientSettings = Field(default_factory=RegistryClientSettings)
