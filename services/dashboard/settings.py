"""Settings of the operator dashboard (prefix ``MLOPS_DASHBOARD_``)."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from services.shared.settings import (
    FeastSettings,
    RedisSettings,
    RegistryClientSettings,
    ServiceSettings,
    StorageSettings,
)


class DashboardSettings(ServiceSettings):
    """Where the dashboard listens, where it reads from, and how fresh it keeps its page."""

    model_config = SettingsConfigDict(env_prefix="MLOPS_DASHBOARD_", extra="ignore", frozen=True)

    host: str = Field("127.0.0.1", description="Address the page and its JSON API bind to.")
    port: int = Field(8080, description="Port of the page, its JSON API and /metrics.")
    metrics_port: int = Field(9108, description="Port of /metrics.")
    prometheus_url: str = Field(
        "http://127.0.0.1:9090", description="Prometheus' HTTP API (rates, latencies, lag)."
    )
    monitoring_api_url: str = Field(
        "http://127.0.0.1:9106",
        description="The monitoring service's JSON API (/api/v1/quality, /api/v1/drift).",
    )
    autopilot_api_url: str = Field(
        "http://127.0.0.1:9107",
        description="The autopilot's JSON API (/api/v1/loop, /api/v1/loop/history, pause/resume).",
    )
    refresh_interval_s: float = Field(
        1.0,
        gt=0,
        le=2.0,
        description="How often the board is recomputed while a page is open (the page is at "
        "most this plus one query old; the issue asks for 2 s at most).",
    )
    window_s: int = Field(
        900, ge=60, description="Time range the charts show (seconds back from now)."
    )
    step_s: int = Field(
        5, ge=1, description="Resolution of the charts (seconds; the scrape interval is enough)."
    )
    rate_window: str = Field(
        "1m", description="Window of rate() and histogram_quantile() in the charts' PromQL."
    )
    source_timeout_s: float = Field(
        2.0, gt=0, description="Timeout of one call to Prometheus, monitoring or the autopilot."
    )
    registry_refresh_s: float = Field(
        2.0, gt=0, description="How often the model versions are read from the registry."
    )
    registry_timeout_s: float = Field(
        5.0, gt=0, description="Timeout of one registry call (it reads MLflow behind)."
    )
    recent_events: int = Field(
        50, ge=1, description="Drift and lifecycle events kept for the page (most recent)."
    )
    trace_timeout_s: float = Field(
        60.0, gt=0, description="Longest time one trace of a prediction may take."
    )
    registry: RegistryClientSettings = Field(default_factory=RegistryClientSettings)
    redis: RedisSettings = Field(default_factory=RedisSettings)
    storage: StorageSettings = Field(default_factory=StorageSettings)
    feast: FeastSettings = Field(default_factory=FeastSettings)
