"""Prometheus metrics of live model quality, the prediction-label join and drift.

Gauges hold the latest figures (refreshed by ``LiveMonitor.tick``); counters count events.
A figure with too little data behind it is absent (the series is removed), never a guess.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Gauge

from services.monitoring.outcomes import OutcomeJoin
from services.monitoring.quality import QualityFigures

if TYPE_CHECKING:
    from services.monitoring.drift import SignalState

QUALITY_FIGURES = ("pr_auc", "precision", "recall", "log_loss", "ece", "label_coverage")


class LiveMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        key = ["model_name", "model_version", "route"]
        self.quality = Gauge(
            "mlops_monitoring_quality",
            "Live quality of a model version on a route over the sliding window: pr_auc, "
            "precision and recall at the version's threshold, log_loss, ece, label_coverage",
            [*key, "metric"],
            registry=registry,
        )
        self.labelled = Gauge(
            "mlops_monitoring_window_labelled_outcomes",
            "Labelled outcomes the window's quality figures rest on",
            key,
            registry=registry,
        )
        self.window_frauds = Gauge(
            "mlops_monitoring_window_frauds",
            "Labelled frauds in the window",
            key,
            registry=registry,
        )
        self.joined = Gauge(
            "mlops_monitoring_outcomes_joined_total",
            "Predictions joined with their label (since start)",
            registry=registry,
        )
        self.unmatched = Gauge(
            "mlops_monitoring_outcomes_unmatched_total",
            "What left the join without a partner (since start), by reason: expired (no "
            "label within the wait), evicted (the state was full), label_unmatched (a label no "
            "prediction came for), label_duplicate, replayed_unused (a replayed shadow "
            "score of an answer no longer waiting for its label: never joined)",
            ["reason"],
            registry=registry,
        )
        self.pending = Gauge(
            "mlops_monitoring_outcomes_pending",
            "Predictions waiting for their label",
            registry=registry,
        )
        self.drift_statistic = Gauge(
            "mlops_monitoring_drift_statistic",
            "A drift detector's current statistic (an event when it exceeds the threshold)",
            ["model_name", "model_version", "kind", "signal", "detector"],
            registry=registry,
        )
        self.drift_threshold = Gauge(
            "mlops_monitoring_drift_threshold",
            "A drift detector's calibrated threshold",
            ["model_name", "model_version", "kind", "signal", "detector"],
            registry=registry,
        )
        self.drifting = Gauge(
            "mlops_monitoring_drifting",
            "1 while a signal is drifting (an event within its cooldown), else 0",
            ["model_name", "model_version", "kind", "signal"],
            registry=registry,
        )
        self.drift_events = Counter(
            "mlops_monitoring_drift_events_total",
            "DriftEvents published on monitoring.drift",
            ["model_name", "kind", "signal"],
            registry=registry,
        )
        self.drift_suppressed = Counter(
            "mlops_monitoring_drift_suppressed_total",
            "Detections not published because the signal was in its cooldown",
            ["model_name", "kind", "signal"],
            registry=registry,
        )

    def report_join(self, join: OutcomeJoin) -> None:
        c = join.counts
        self.joined.set(c.joined)
        self.unmatched.labels("expired").set(c.expired)
        self.unmatched.labels("evicted").set(c.evicted)
        self.unmatched.labels("label_unmatched").set(c.label_unmatched)
        self.unmatched.labels("label_duplicate").set(c.label_duplicates)
        self.unmatched.labels("replayed_unused").set(c.replayed_unused)
        self.pending.set(join.pending)

    def report_quality(self, figures: QualityFigures) -> None:
        key = (figures.model_name, str(figures.model_version), figures.route)
        self.labelled.labels(*key).set(figures.n_labelled)
        self.window_frauds.labels(*key).set(figures.positives)
        values: dict[str, Any] = figures.as_dict()
        for metric in QUALITY_FIGURES:
            value = values.get(metric)
            if value is None:
                with contextlib.suppress(KeyError):  # never set: nothing to remove
                    self.quality.remove(*key, metric)
            else:
                self.quality.labels(*key, metric).set(value)

    def report_drift(self, states: Iterable[tuple[Any, SignalState, bool]]) -> None:
        for current, state, drifting in states:
            labels = (current.model_name, str(current.version), state.kind, state.signal)
            self.drift_statistic.labels(*labels, state.detector).set(state.statistic)
            self.drift_threshold.labels(*labels, state.detector).set(state.threshold)
            self.drifting.labels(*labels).set(1 if drifting else 0)
