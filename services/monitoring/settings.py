"""Settings of the monitoring service (prefix ``MLOPS_MONITORING_``)."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from services.shared.settings import ServiceSettings


class MonitoringSettings(ServiceSettings):
    """What the monitoring service reads and how often it reports."""

    model_config = SettingsConfigDict(env_prefix="MLOPS_MONITORING_", extra="ignore", frozen=True)

    metrics_port: int = Field(9106, description="Port of /metrics.")
    group_id: str = Field("monitoring", description="Consumer group on predictions.log.")
    poll_timeout_ms: int = Field(
        500, ge=1, description="How long a poll waits for records (also how soon a stop is seen)."
    )
    max_poll_records: int = Field(2000, ge=1, description="Records handled per poll.")
    lag_interval_s: float = Field(
        2.0, gt=0, description="How often the consumer lag gauges are refreshed (seconds)."
    )
    start_timeout_s: float = Field(
        60.0,
        gt=0,
        description="How long start-up waits for the broker before exiting (the supervisor "
        "then restarts the service).",
    )
