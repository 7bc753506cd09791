"""``LiveMonitor``: the monitoring service's domain object.

The Kafka transport hands it decoded predictions (predictions.log) and validated labels
(events.validated.labels); it joins them (``OutcomeJoin``), measures live quality per version
and route (``LiveQuality``), keeps paired scores (``PairedScores``), runs the drift detectors
of each model's production version (``drift.py``) and returns the ``DriftEvent``s to publish.
The HTTP transport reads its state (``quality``, ``drift``, ``paired``). Pure logic: no I/O,
no clock of its own (times are the records' own), so tests and replays drive it exactly.

Per model, the production version is the one whose records carry route production; when
another version shows up there, its detectors start afresh: the data detectors from that
version's reference (``request_reference`` asks the transport to fetch it from the model's
artifacts; ``install_data_detectors`` puts them in place once built off the event loop),
or from its first ``data_warmup`` live events when it has none; the concept detector from its
first ``concept_warmup`` labelled outcomes.
"""

from __future__ import annotations

import math
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from google.protobuf.timestamp_pb2 import Timestamp

from services.monitoring.drift import (
    ConceptDetector,
    DataDetectors,
    Detection,
    DriftConfig,
    FraudRankDetector,
    SignalState,
    data_detectors_from_reference,
    data_detectors_from_warmup,
    signal_count,
)
from services.monitoring.live_metrics import LiveMetrics
from services.monitoring.outcomes import Outcome, OutcomeJoin, Prediction
from services.monitoring.quality import LiveQuality, PairedScores, QualityFigures
from services.shared.drift_reference import DriftReference
from services.shared.logging import get_logger
from services.shared.model_aliases import ROUTE_NAMES
from services.shared.proto.mlops.v1 import monitoring_pb2

log = get_logger("monitoring")


@dataclass(frozen=True)
class MonitorConfig:
    drift: DriftConfig
    join_max_wait_s: float = 1800.0
    join_max_pending: int = 500_000
    label_linger_s: float = 60.0
    window_s: float = 3600.0
    window_max: int = 50_000
    min_labelled: int = 200
    min_positives: int = 5
    paired_capacity: int = 100_000
    cooldown_s: float = 900.0
    recent_events: int = 100


@dataclass
class _ProductionVersion:
    """The detectors of one model's current production version."""

    model_name: str
    version: int
    since: float
    concept: ConceptDetector
    ranks: FraudRankDetector
    data: DataDetectors | None = None
    reference: str = "pending"  # pending | training | warmup | building
    warmup_inputs: list[np.ndarray] = field(default_factory=list)
    warmup_scores: list[np.ndarray] = field(default_factory=list)
    warmup_rows: int = 0
    unwatched: int = 0  # production predictions seen before the data detectors were ready


@dataclass(frozen=True)
class BuildJob:
    """Data detectors to build off the event loop (a few seconds of calibration)."""

    model_name: str
    version: int
    build: Callable[[], DataDetectors]


class LiveMonitor:
    def __init__(self, config: MonitorConfig, metrics: LiveMetrics) -> None:
        self.config = config
        self.metrics = metrics
        self.join = OutcomeJoin(
            max_wait_s=config.join_max_wait_s,
            max_pending=config.join_max_pending,
            label_linger_s=config.label_linger_s,
        )
        self.quality = LiveQuality(
            window_s=config.window_s,
            window_max=config.window_max,
            min_labelled=config.min_labelled,
            min_positives=config.min_positives,
        )
        self.pairs = PairedScores(config.paired_capacity)
        self.production: dict[str, _ProductionVersion] = {}
        self.events: deque[monitoring_pb2.DriftEvent] = deque(maxlen=config.recent_events)
        self._last_event: dict[tuple[str, str, str], float] = {}  # (model, kind, signal) -> t
        self._reference_requests: list[tuple[str, int]] = []
        self._jobs: list[BuildJob] = []

    # ------------------------------------------------------------------ input

    def add_predictions(
        self, records: list[tuple[monitoring_pb2.PredictionRecord, int, int]]
    ) -> list[monitoring_pb2.DriftEvent]:
        """Decoded predictions.log records with their (partition, offset); returns the drift
        events to publish."""
        names = self.config.drift.inputs
        by_version: dict[tuple[str, int], list[tuple[list[float], float, float]]] = {}
        events: list[monitoring_pb2.DriftEvent] = []
        for record, partition, offset in records:
            at = record.predicted_at.seconds + record.predicted_at.nanos / 1e9
            prediction = Prediction(
                record.transaction.transaction_id,
                record.model_name,
                record.model_version,
                ROUTE_NAMES.get(record.route, "unspecified"),
                record.fraud_probability,
                record.flagged,
                at,
                partition,
                offset,
                record.replayed,
            )
            joined, dropped = self.join.add_prediction(prediction)
            events += self._outcomes(joined)
            for lost in dropped:
                self.quality.add_unlabelled(lost, self.join.stream_time)
            if record.route == monitoring_pb2.ROUTE_PRODUCTION and not record.degraded:
                # degraded answers used default features: not the inputs' distribution
                features = record.features
                row = [features.get(n, math.nan) for n in names]
                by_version.setdefault((record.model_name, record.model_version), []).append(
                    (row, record.fraud_probability, at)
                )
        for (model_name, version), rows in by_version.items():
            events += self._data(model_name, version, rows)
        return events

    def add_labels(
        self, labels: list[tuple[str, bool, float, int, int]]
    ) -> list[monitoring_pb2.DriftEvent]:
        """Validated labels as (transaction_id, is_fraud, time, partition, offset)."""
        events: list[monitoring_pb2.DriftEvent] = []
        for transaction_id, is_fraud, at, partition, offset in labels:
            events += self._outcomes(
                self.join.add_label(transaction_id, is_fraud, at, partition, offset)
            )
        return events

    def tick(self) -> None:
        """Expire what waited too long and slide the windows (stream time)."""
        for lost in self.join.expire():
            self.quality.add_unlabelled(lost, self.join.stream_time)
        self.quality.slide(self.join.stream_time)
        self.metrics.report_join(self.join)
        for key in self.quality.versions():
            self.metrics.report_quality(self.quality.figures(key))
        self.metrics.report_drift(self.drift_states())

    # ------------------------------------------------------------------ outcomes and drift

    def _outcomes(self, outcomes: list[Outcome]) -> list[monitoring_pb2.DriftEvent]:
        events: list[monitoring_pb2.DriftEvent] = []
        for outcome in outcomes:
            self.quality.add_outcome(outcome)
            self.pairs.add(outcome)
            p = outcome.prediction
            if p.route != "production":
                continue
            current = self.production.get(p.model_name)
            if current is None or current.version != p.model_version:
                continue  # a label for a version no longer (or not yet seen) in production
            # the concept detectors' clock is when the transaction was scored: a run's onset
            # then names when the traffic changed, not when its labels began to arrive a label
            # delay later (a drift-triggered training splits its data at the onset by the
            # transactions' time: with the labels' time it found none after it)
            for detector in (current.concept, current.ranks):
                detection = detector.update(p.score, outcome.is_fraud, p.at)
                if detection is not None:
                    events += self._emit(current, detection, outcome.labelled_at)
        return events

    def _version(self, model_name: str, version: int, at: float) -> _ProductionVersion:
        current = self.production.get(model_name)
        if current is None or current.version != version:
            if current is not None and version < current.version and at < current.since:
                return current  # a late record of the previous production version
            current = _ProductionVersion(
                model_name,
                version,
                at,
                ConceptDetector(self.config.drift, signal_count(self.config.drift)),
                FraudRankDetector(self.config.drift, signal_count(self.config.drift)),
            )
            self.production[model_name] = current
            self._reference_requests.append((model_name, version))
            log.info("production_version_watched", model=model_name, version=version)
        return current

    def _data(
        self, model_name: str, version: int, rows: list[tuple[list[float], float, float]]
    ) -> list[monitoring_pb2.DriftEvent]:
        current = self._version(model_name, version, rows[0][2])
        inputs = np.asarray([r[0] for r in rows], dtype=np.float64)
        scores = np.asarray([r[1] for r in rows], dtype=np.float64)
        times = np.asarray([r[2] for r in rows], dtype=np.float64)
        if current.data is None:
            current.unwatched += len(rows)
            if current.reference == "warmup-collecting":
                current.warmup_inputs.append(inputs)
                current.warmup_scores.append(scores)
                current.warmup_rows += len(rows)
                if current.warmup_rows >= self.config.drift.data_warmup:
                    self._queue_warmup_build(current)
            return []
        events: list[monitoring_pb2.DriftEvent] = []
        muted = self._cooling(model_name, float(times[0]))
        for detection in current.data.update(inputs, scores, times, self.config.drift, muted):
            events += self._emit(current, detection, float(times[-1]))
        return events

    def _queue_warmup_build(self, current: _ProductionVersion) -> None:
        inputs = np.concatenate(current.warmup_inputs)
        scores = np.concatenate(current.warmup_scores)
        current.warmup_inputs, current.warmup_scores = [], []
        current.reference = "building"
        config = self.config.drift
        self._jobs.append(
            BuildJob(
                current.model_name,
                current.version,
                lambda: data_detectors_from_warmup(config, np.nan_to_num(inputs), scores),
            )
        )

    def _cooling(self, model_name: str, now: float) -> set[str]:
        """The data and score signals of ``model_name`` still in their cooldown at ``now``."""
        return {
            key[2]
            for key in self._last_event
            if key[0] == model_name and key[1] in ("data", "score") and self._in_cooldown(key, now)
        }

    def _in_cooldown(self, key: tuple[str, str, str], now: float) -> bool:
        """Whether the signal ``(model, kind, signal)`` raised an event within its cooldown."""
        last = self._last_event.get(key)
        return last is not None and now - last < self.config.cooldown_s

    def _emit(
        self, current: _ProductionVersion, d: Detection, now: float
    ) -> list[monitoring_pb2.DriftEvent]:
        key = (current.model_name, d.kind, d.signal)
        if self._in_cooldown(key, now):
            self.metrics.drift_suppressed.labels(current.model_name, d.kind, d.signal).inc()
            return []
        self._last_event[key] = now
        event = monitoring_pb2.DriftEvent(
            event_id=f"drift-{uuid.uuid4().hex[:16]}",
            detector=d.detector,
            signal=d.signal,
            model_name=current.model_name,
            model_version=current.version,
            statistic=d.statistic,
            threshold=d.threshold,
            reference_value=d.reference_value,
            current_value=d.current_value,
            detected_at=_timestamp(now),
            kind=d.kind,
            onset_at=_timestamp(d.onset_at),
            samples=d.samples,
            inputs=list(d.inputs),
        )
        self.events.append(event)
        self.metrics.drift_events.labels(current.model_name, d.kind, d.signal).inc()
        log.warning(
            "drift_detected",
            event_id=event.event_id,
            model=current.model_name,
            version=current.version,
            kind=d.kind,
            signal=d.signal,
            detector=d.detector,
            statistic=f"{d.statistic:.3f}",
            threshold=f"{d.threshold:.3f}",
            reference_value=f"{d.reference_value:.4g}",
            current_value=f"{d.current_value:.4g}",
            samples=d.samples,
            inputs=",".join(d.inputs),
        )
        return [event]

    # ------------------------------------------------------------------ references

    def reference_requests(self) -> list[tuple[str, int]]:
        """Versions whose reference the transport should fetch (each asked once)."""
        requests, self._reference_requests = self._reference_requests, []
        return requests

    def reference_loaded(
        self, model_name: str, version: int, reference: DriftReference | None
    ) -> None:
        """The fetched reference (None: the version has none, or it could not be read)."""
        current = self.production.get(model_name)
        if current is None or current.version != version or current.data is not None:
            return
        if reference is None:
            current.reference = "warmup-collecting"
            log.info("drift_reference_from_warmup", model=model_name, version=version,
                     events=self.config.drift.data_warmup)  # fmt: skip
            return
        current.reference = "building"
        config = self.config.drift
        self._jobs.append(
            BuildJob(model_name, version, lambda: data_detectors_from_reference(config, reference))
        )

    def build_jobs(self) -> list[BuildJob]:
        jobs, self._jobs = self._jobs, []
        return jobs

    def detectors_failed(self, model_name: str, version: int, error: str) -> None:
        """The data detectors could not be built (a degenerate reference): data and score
        drift stay unwatched for this version, and ``/api/v1/drift`` says so."""
        current = self.production.get(model_name)
        if current is not None and current.version == version:
            current.reference = "failed"
        log.error("drift_detectors_failed", model=model_name, version=version, error=error)

    def install_data_detectors(
        self, model_name: str, version: int, detectors: DataDetectors
    ) -> None:
        current = self.production.get(model_name)
        if current is None or current.version != version:
            return
        current.data = detectors
        current.reference = detectors.reference
        log.info(
            "drift_detectors_ready",
            model=model_name,
            version=version,
            reference=detectors.reference,
            inputs=len(detectors.names),
            **{f"threshold_{k}": f"{c.threshold:.2f}" for k, c in detectors.calibrations.items()},
            unwatched=current.unwatched,
        )

    # ------------------------------------------------------------------ queries

    def quality_figures(self) -> list[QualityFigures]:
        return [self.quality.figures(key) for key in self.quality.versions()]

    def drift_states(self) -> list[tuple[_ProductionVersion, SignalState, bool]]:
        out = []
        now = self.join.stream_time
        for current in self.production.values():
            states = current.data.states() if current.data else []
            states += [current.concept.state(), current.ranks.state()]
            for state in states:
                drifting = self._in_cooldown((current.model_name, state.kind, state.signal), now)
                out.append((current, state, drifting))
        return out

    def drift_report(self) -> dict[str, Any]:
        signals = []
        last_by_key: dict[tuple[str, str, str], monitoring_pb2.DriftEvent] = {}
        for event in self.events:
            last_by_key[(event.model_name, event.kind, event.signal)] = event
        for current, state, drifting in self.drift_states():
            last = last_by_key.get((current.model_name, state.kind, state.signal))
            signals.append(
                {
                    "model_name": current.model_name,
                    "model_version": current.version,
                    "kind": state.kind,
                    "signal": state.signal,
                    "detector": state.detector,
                    "statistic": state.statistic,
                    "threshold": None if math.isnan(state.threshold) else state.threshold,
                    "drifting": drifting,
                    "reference": state.reference or current.reference,
                    "last_event": event_dict(last) if last is not None else None,
                }
            )
        return {
            "false_alarms_per_million": self.config.drift.false_alarms_per_million,
            "cooldown_s": self.config.cooldown_s,
            "signals": signals,
            "versions": [
                {
                    "model_name": c.model_name,
                    "model_version": c.version,
                    "reference": c.reference,
                    "concept_ready": c.concept.ready,
                    "fraud_rank_ready": c.ranks.ready,
                    "unwatched_predictions": c.unwatched,
                }
                for c in self.production.values()
            ],
            "recent_events": [event_dict(e) for e in reversed(self.events)],
        }


def _timestamp(epoch_s: float) -> Timestamp:
    seconds = int(epoch_s)
    return Timestamp(seconds=seconds, nanos=int((epoch_s - seconds) * 1e9))


def event_dict(event: monitoring_pb2.DriftEvent) -> dict[str, Any]:
    return {
        "event_id": event.event_id,
        "kind": event.kind,
        "signal": event.signal,
        "detector": event.detector,
        "model_name": event.model_name,
        "model_version": event.model_version,
        "statistic": event.statistic,
        "threshold": event.threshold,
        "reference_value": event.reference_value,
        "current_value": event.current_value,
        "samples": event.samples,
        "inputs": list(event.inputs),
        "onset_at": event.onset_at.ToDatetime().isoformat() + "Z",
        "detected_at": event.detected_at.ToDatetime().isoformat() + "Z",
    }
