"""HTTP transport of the monitoring service: a JSON API beside /metrics, on the metrics port.

    GET /api/v1/quality   latest live quality per model version and route
    GET /api/v1/drift     drift state per signal, the versions watched, recent DriftEvents
    GET /api/v1/paired?model_name=M&baseline=V&candidate=W&limit=N
                          the latest labelled transactions both versions scored
    GET /metrics          Prometheus

Read-only (no token needed: nothing changes); handlers only read ``LiveMonitor``'s state on
the event loop that feeds it, so they see a consistent snapshot.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Query

from services.monitoring.monitor import LiveMonitor
from services.shared.http_api import api_app


def create_app(monitor: LiveMonitor) -> FastAPI:
    """The JSON API on the platform's shared HTTP app (with /metrics and the error mapping)."""
    app = api_app("mlops monitoring")

    @app.get("/api/v1/quality")
    def quality() -> dict[str, Any]:
        """Per model version and route: the sliding window's PR-AUC, precision and recall at
        the version's threshold, log loss, ECE, label coverage, and what they rest on."""
        return {
            "window_s": monitor.config.window_s,
            "min_labelled": monitor.config.min_labelled,
            "min_positives": monitor.config.min_positives,
            "join": {
                "joined": monitor.join.counts.joined,
                "expired": monitor.join.counts.expired,
                "evicted": monitor.join.counts.evicted,
                "label_unmatched": monitor.join.counts.label_unmatched,
                "replayed_unused": monitor.join.counts.replayed_unused,
                "pending": monitor.join.pending,
            },
            "versions": [f.as_dict() for f in monitor.quality_figures()],
        }

    @app.get("/api/v1/drift")
    def drift() -> dict[str, Any]:
        """Per signal: detector, statistic, threshold, drifting, last event; recent events."""
        return monitor.drift_report()

    @app.get("/api/v1/paired")
    def paired(
        model_name: str = Query(..., min_length=1, description="The model."),
        baseline: int = Query(..., ge=1, description="The baseline version (production)."),
        candidate: int = Query(..., ge=1, description="The candidate version (shadow/canary)."),
        limit: int = Query(10_000, ge=1, le=1_000_000, description="At most this many."),
    ) -> dict[str, Any]:
        """The most recent labelled transactions that both versions scored, oldest first."""
        return monitor.pairs.paired(model_name, baseline, candidate, limit)

    return app
