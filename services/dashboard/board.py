"""The operator board: what the dashboard shows, computed from the platform's sources.

``OperatorBoard`` is the dashboard's domain object. ``snapshot()`` reads every source once and
returns a ``Board``: charts (PromQL range queries), the model versions with stage and traffic
share, live quality per version, drift state per signal, and the improvement loop's timeline.
A panel whose source is missing or not built yet says what it waits for (``status`` =
``waiting`` and a sentence), never an empty chart. The operator actions (pause/resume the
loop, roll back) forward the caller's bearer token to the component that checks it.

The HTTP transport (app.py) only converts: it serves these models as JSON, streams snapshots
as server-sent events and maps ``PlatformError`` to HTTP statuses.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

from google.protobuf.json_format import MessageToDict
from pydantic import BaseModel, Field

from services.dashboard.events import PlatformEvents
from services.dashboard.sources import JsonApi, PrometheusSource, RegistrySource, Sample
from services.shared.errors import NotFound, PlatformError, Unavailable
from services.shared.logging import get_logger
from services.shared.model_aliases import PRODUCTION
from services.shared.proto.mlops.v1 import models_pb2

log = get_logger("dashboard")

PanelStatus = Literal["ok", "empty", "waiting", "error"]


# ----------------------------------------------------------------------------- what is shown


class Series(BaseModel):
    name: str
    t: list[float] = Field(description="Sample times, epoch seconds.")
    y: list[float | None] = Field(description="Values; null is a gap (no data at that time).")


class Chart(BaseModel):
    id: str
    title: str
    unit: str
    status: PanelStatus
    message: str = Field("", description="What the panel waits for, or why it is empty.")
    series: list[Series] = Field(default_factory=list)
    queries: list[str] = Field(default_factory=list, description="The PromQL behind it.")


class VersionRow(BaseModel):
    version: int
    stage: str
    aliases: list[str]
    traffic_percent: int = Field(description="Share of traffic the registry routes to it.")
    observed_per_s: float | None = Field(
        None, description="Predictions per second it answered (Prometheus, last minute)."
    )
    threshold: float
    created_at: str
    run_id: str
    gate: str = Field(description="The evaluation gate's verdict and reason.")


class ModelsPanel(BaseModel):
    status: PanelStatus
    message: str = ""
    model_name: str
    production_version: int | None = None
    versions: list[VersionRow] = Field(default_factory=list)


class TablePanel(BaseModel):
    """A panel read from another service's JSON API, passed on as rows."""

    status: PanelStatus
    message: str = ""
    source: str = Field(description="The API the rows come from.")
    rows: list[dict[str, Any]] = Field(default_factory=list)


class TimelineStep(BaseModel):
    at: str = Field(description="When it happened (RFC 3339).")
    kind: str = Field(description="drift, retrain, gate, shadow, canary, promoted, ...")
    title: str
    source: str = Field(description="Which component said so.")
    evidence: dict[str, Any] = Field(default_factory=dict, description="Why, as recorded.")


class LoopPanel(BaseModel):
    status: PanelStatus
    message: str = ""
    state: str = Field("unknown", description="The autopilot's state, 'unknown' without it.")
    current: dict[str, Any] | None = None
    timeline: list[TimelineStep] = Field(default_factory=list, description="Newest first.")


class DriftPanel(BaseModel):
    status: PanelStatus
    message: str = ""
    signals: list[dict[str, Any]] = Field(
        default_factory=list, description="State per signal (monitoring's /api/v1/drift)."
    )
    events: list[dict[str, Any]] = Field(
        default_factory=list, description="Recent DriftEvents on monitoring.drift, newest first."
    )


class Board(BaseModel):
    generated_at: float = Field(description="Epoch seconds when the board was computed.")
    took_ms: float
    charts: list[Chart]
    models: ModelsPanel
    quality: TablePanel
    drift: DriftPanel
    loop: LoopPanel


class ActionResult(BaseModel):
    action: str
    ok: bool
    detail: dict[str, Any] = Field(default_factory=dict)


# ----------------------------------------------------------------------------- chart specs


@dataclass(frozen=True)
class Query:
    promql: str
    legend: str  # str.format over the series' labels, e.g. "p99 {view}"


@dataclass(frozen=True)
class ChartSpec:
    id: str
    title: str
    unit: str
    queries: tuple[Query, ...]
    empty: str  # what no data means here (said instead of showing an empty chart)


def chart_specs(rate: str) -> list[ChartSpec]:
    """The board's charts; ``rate`` is the window of rate() (e.g. "1m")."""
    answered = f'sum(rate(mlops_serving_predictions_total{{route!="shadow"}}[{rate}]))'
    errors = f"(sum(rate(mlops_serving_errors_total[{rate}])) or vector(0))"
    latency = (
        f'sum by (le) (rate(mlops_serving_prediction_seconds_bucket{{route!="shadow"}}[{rate}]))'
    )
    triton_requests = f"clamp_min(sum(rate(nv_inference_request_success[{rate}])), 1e-9)"
    freshness = (
        f'sum by (le, view) (rate(mlops_features_freshness_seconds_bucket{{basis="ingested"}}'
        f"[{rate}]))"
    )
    return [
        ChartSpec(
            "predict_rate",
            "Predict: answers per second by route",
            "req/s",
            (Query(f"sum by (route) (rate(mlops_serving_predictions_total[{rate}]))", "{route}"),),
            "no prediction in the window: is traffic flowing to serving?",
        ),
        ChartSpec(
            "predict_latency",
            "Predict: latency percentiles",
            "ms",
            tuple(
                Query(f"1000 * histogram_quantile({q}, {latency})", f"p{int(q * 100)}")
                for q in (0.5, 0.95, 0.99)
            ),
            "no answered prediction in the window",
        ),
        ChartSpec(
            "errors_degraded",
            "Predict: errors and degraded answers",
            "% of requests",
            (
                Query(
                    f"100 * {errors} / clamp_min({answered} + {errors}, 1e-9)",
                    "errors",
                ),
                Query(
                    f"100 * (sum(rate(mlops_serving_degraded_total[{rate}])) or vector(0)) "
                    f"/ clamp_min({answered}, 1e-9)",
                    "degraded (default features)",
                ),
            ),
            "no request in the window",
        ),
        ChartSpec(
            "triton_time",
            "Triton: queue and compute time per request",
            "ms",
            (
                Query(
                    f"sum(rate(nv_inference_queue_duration_us[{rate}])) / {triton_requests} / 1000",
                    "queue",
                ),
                Query(
                    f"sum(rate(nv_inference_compute_infer_duration_us[{rate}])) "
                    f"/ {triton_requests} / 1000",
                    "compute (infer)",
                ),
            ),
            "Triton served no inference in the window",
        ),
        ChartSpec(
            "triton_batch",
            "Triton: rows per model execution",
            "rows",
            (
                Query(
                    f"sum(rate(nv_inference_count[{rate}])) "
                    f"/ clamp_min(sum(rate(nv_inference_exec_count[{rate}])), 1e-9)",
                    "Triton (after dynamic batching)",
                ),
                Query(
                    f"sum(rate(mlops_serving_triton_batch_rows_sum[{rate}])) "
                    f"/ clamp_min(sum(rate(mlops_serving_triton_batch_rows_count[{rate}])), 1e-9)",
                    "serving's calls",
                ),
            ),
            "Triton served no inference in the window",
        ),
        ChartSpec(
            "ingestion",
            "Ingestion: events per second",
            "events/s",
            (
                Query(
                    f"sum by (topic) (rate(mlops_ingestion_events_in_total[{rate}]))", "in {topic}"
                ),
                Query(
                    f"sum by (topic) (rate(mlops_ingestion_events_out_total[{rate}]))",
                    "out {topic}",
                ),
            ),
            "no event ingested in the window",
        ),
        ChartSpec(
            "dead_letters",
            "Dead letters per second, by reason",
            "records/s",
            (
                Query(
                    f"sum by (reason_code) (rate(mlops_ingestion_events_rejected_total[{rate}]))",
                    "ingestion {reason_code}",
                ),
                Query(
                    f"sum by (reason_code) (rate(mlops_features_dead_letters_total[{rate}]))",
                    "features {reason_code}",
                ),
            ),
            "no dead letter so far: every event was valid",
        ),
        ChartSpec(
            "consumer_lag",
            "Consumer lag per service",
            "records",
            (
                Query(
                    'sum by (job, group) ({__name__=~"mlops_.+_consumer_lag_records"})',
                    "{job} ({group})",
                ),
            ),
            "no service reports its consumer lag yet",
        ),
        ChartSpec(
            "feature_freshness",
            "Feature freshness (ingested -> online store)",
            "s",
            tuple(
                Query(f"histogram_quantile({q}, {freshness})", f"p{int(q * 100)} {{view}}")
                for q in (0.5, 0.99)
            ),
            "no feature row was pushed in the window",
        ),
    ]


def _legend(template: str, labels: dict[str, str]) -> str:
    try:
        return template.format(**labels).strip() or "value"
    except (KeyError, IndexError, ValueError):
        return template


def _stage(stage: models_pb2.ModelStage.ValueType) -> str:
    return models_pb2.ModelStage.Name(stage).removeprefix("MODEL_STAGE_").lower()


def _timestamp(message: Any) -> str:
    return message.ToDatetime(tzinfo=UTC).isoformat() if message.seconds else ""


# ----------------------------------------------------------------------------- the board


class OperatorBoard:
    """Computes the board from the sources; the operator actions."""

    def __init__(
        self,
        prometheus: PrometheusSource,
        monitoring: JsonApi,
        autopilot: JsonApi,
        registry: RegistrySource,
        events: PlatformEvents,
        *,
        rate_window: str = "1m",
        window_s: int = 900,
        step_s: int = 5,
        registry_refresh_s: float = 2.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.prometheus = prometheus
        self.monitoring = monitoring
        self.autopilot = autopilot
        self.registry = registry
        self.events = events
        self.specs = chart_specs(rate_window)
        self.rate_window = rate_window
        self.window_s = window_s
        self.step_s = step_s
        self._registry_refresh_s = registry_refresh_s
        self._clock = clock
        self._versions: tuple[float, ModelsPanel] | None = None

    # --------------------------------------------------------------- snapshot
    async def snapshot(self) -> Board:
        started = time.perf_counter()
        now = self._clock()
        charts, models, quality, drift, loop = await asyncio.gather(
            asyncio.gather(*(self._chart(spec, now) for spec in self.specs)),
            self._models(),
            self._quality(),
            self._drift(),
            self._loop(),
        )
        return Board(
            generated_at=now,
            took_ms=round((time.perf_counter() - started) * 1000, 1),
            charts=list(charts),
            models=models,
            quality=quality,
            drift=drift,
            loop=loop,
        )

    async def _chart(self, spec: ChartSpec, now: float) -> Chart:
        chart = Chart(
            id=spec.id,
            title=spec.title,
            unit=spec.unit,
            status="ok",
            queries=[q.promql for q in spec.queries],
        )
        # points on a fixed grid (multiples of the step): between scrapes a refresh returns
        # the same series, and the page redraws nothing
        start = (now - self.window_s) // self.step_s * self.step_s
        try:
            results = await asyncio.gather(
                *(
                    self.prometheus.query_range(q.promql, start, now, self.step_s)
                    for q in spec.queries
                )
            )
        except PlatformError as exc:
            chart.status, chart.message = "waiting", f"waiting for Prometheus: {exc}"
            return chart
        for query, samples in zip(spec.queries, results, strict=True):
            chart.series += [_series(query.legend, s) for s in samples]
        chart.series = [s for s in chart.series if any(v is not None for v in s.y)]
        if not chart.series:
            chart.status, chart.message = "empty", spec.empty
        return chart

    async def _models(self) -> ModelsPanel:
        cached = self._versions
        if cached is not None and self._clock() - cached[0] < self._registry_refresh_s:
            panel = cached[1]
        else:
            panel = await self._read_models()
            self._versions = (self._clock(), panel)
        if panel.status == "ok":
            await self._observed_traffic(panel)
        return panel

    async def _read_models(self) -> ModelsPanel:
        name = self.registry.model_name
        try:
            versions = await self.registry.versions()
        except PlatformError as exc:
            last = self._versions[1] if self._versions is not None else None
            if last is not None and last.versions:  # keep showing what was known, say so
                return last.model_copy(
                    update={
                        "message": f"the registry did not answer the last refresh ({exc}); "
                        "versions as last read"
                    }
                )
            return ModelsPanel(
                status="waiting",
                message=f"waiting for the registry ({self.registry.settings.address}): {exc}",
                model_name=name,
            )
        rows = [
            VersionRow(
                version=v.version,
                stage=_stage(v.stage),
                aliases=list(v.aliases),
                traffic_percent=v.traffic_percent,
                threshold=round(v.threshold, 4),
                created_at=_timestamp(v.created_at),
                run_id=v.run_id,
                gate=(
                    ("passed" if v.gate.passed else "rejected") + (f": {v.gate.reason}")
                    if v.HasField("gate")
                    else "not gated"
                ),
            )
            for v in sorted(versions, key=lambda v: v.version, reverse=True)
        ]
        production = next((r.version for r in rows if PRODUCTION in r.aliases), None)
        if not rows:
            return ModelsPanel(
                status="empty",
                message=f"no version of {name} registered yet (make up bootstraps one)",
                model_name=name,
            )
        return ModelsPanel(
            status="ok", model_name=name, production_version=production, versions=rows
        )

    async def _observed_traffic(self, panel: ModelsPanel) -> None:
        query = (
            f"sum by (model_version) (rate(mlops_serving_predictions_total[{self.rate_window}]))"
        )
        try:
            samples = await self.prometheus.query(query)
        except PlatformError:
            return  # the chart panels already say Prometheus is missing
        rates = {s.labels.get("model_version", ""): s.points[0][1] for s in samples}
        for row in panel.versions:
            value = rates.get(str(row.version))
            row.observed_per_s = None if value is None else round(value, 3)

    async def _quality(self) -> TablePanel:
        source = f"{self.monitoring.url}/api/v1/quality"
        try:
            body = await self.monitoring.request("GET", "/api/v1/quality")
        except PlatformError as exc:
            return TablePanel(
                status="waiting",
                source=source,
                message=f"waiting for monitoring's quality API (GET {source}): {exc}",
            )
        rows = _rows(body, "versions", "quality", "models")
        if not rows:
            return TablePanel(
                status="empty",
                source=source,
                message="no labelled prediction yet: quality needs labels to arrive",
            )
        return TablePanel(status="ok", source=source, rows=rows)

    async def _drift(self) -> DriftPanel:
        events = [MessageToDict(e, preserving_proto_field_name=True) for e in self.events.drift()]
        source = f"{self.monitoring.url}/api/v1/drift"
        try:
            body = await self.monitoring.request("GET", "/api/v1/drift")
        except PlatformError as exc:
            return DriftPanel(
                status="waiting",
                message=f"waiting for monitoring's drift API (GET {source}): {exc}; "
                f"events on monitoring.drift are shown as they arrive",
                events=events,
            )
        signals = [
            {**s, "last_event": (s.get("last_event") or {}).get("detected_at")}
            if isinstance(s.get("last_event"), dict) or s.get("last_event") is None
            else s
            for s in _rows(body, "signals", "state")
        ]
        for event in _rows(body, "recent_events", "events"):
            if event.get("event_id") not in {e.get("event_id") for e in events}:
                events.append(event)
        status: PanelStatus = "ok" if signals or events else "empty"
        return DriftPanel(
            status=status,
            message="" if status == "ok" else "no drift detector reports yet",
            signals=signals,
            events=events,
        )

    async def _loop(self) -> LoopPanel:
        timeline = [_lifecycle_step(e) for e in self.events.lifecycle()]
        timeline += [_drift_step(e) for e in self.events.drift()]
        try:
            loop, history = await asyncio.gather(
                self.autopilot.request("GET", "/api/v1/loop"),
                self.autopilot.request("GET", "/api/v1/loop/history"),
            )
        except PlatformError as exc:
            timeline.sort(key=lambda s: s.at, reverse=True)
            return LoopPanel(
                status="waiting",
                message=f"waiting for the autopilot's loop API (GET {self.autopilot.url}"
                f"/api/v1/loop): {exc}; the registry's and monitoring's events are shown",
                timeline=timeline,
            )
        status = _as_dict(loop)
        state = str(status.get("state", status.get("phase", "unknown")))
        current = status.get("cycle")
        cycles = _rows(history, "cycles", "history")
        if isinstance(current, dict):
            cycles.append(current)
        for cycle in cycles:
            timeline += _cycle_steps(cycle)
        for event in _rows(status, "events"):  # the loop's own: paused, resumed, halted
            timeline.append(
                TimelineStep(
                    at=str(event.get("at", "")),
                    kind=str(event.get("kind", "loop")),
                    title=f"loop {event.get('kind', '')} by {event.get('actor', '?')}: "
                    f"{event.get('reason', '')}",
                    source="autopilot",
                    evidence=event,
                )
            )
        timeline.sort(key=lambda s: s.at, reverse=True)
        return LoopPanel(
            status="ok",
            state=state,
            current=current if isinstance(current, dict) else None,
            timeline=timeline,
        )

    # --------------------------------------------------------------- actions
    async def pause_loop(self, token: str, reason: str) -> ActionResult:
        return await self._loop_action("pause", token, reason)

    async def resume_loop(self, token: str, reason: str) -> ActionResult:
        return await self._loop_action("resume", token, reason)

    async def _loop_action(self, action: str, token: str, reason: str) -> ActionResult:
        try:
            body = await self.autopilot.request(
                "POST",
                f"/api/v1/loop/{action}",
                token=token,
                body={"reason": reason, "actor": "dashboard"},
            )
        except NotFound as exc:
            raise Unavailable(f"the autopilot cannot {action} the loop yet: {exc}") from None
        log.info("loop_action", action=action, reason=reason)
        return ActionResult(action=f"loop_{action}", ok=True, detail=_as_dict(body))

    async def rollback(self, token: str, reason: str) -> ActionResult:
        version = await self.registry.rollback(token, reason, actor="dashboard")
        self._versions = None  # re-read at the next snapshot
        log.info("rollback", version=version.version, reason=reason)
        return ActionResult(
            action="rollback",
            ok=True,
            detail={"production_version": version.version, "stage": _stage(version.stage)},
        )


def _series(legend: str, sample: Sample) -> Series:
    return Series(
        name=_legend(legend, sample.labels),
        t=[t for t, _ in sample.points],
        y=[None if v is None else round(v, 6) for _, v in sample.points],
    )


def _as_dict(body: Any) -> dict[str, Any]:
    return body if isinstance(body, dict) else {"answer": body}


def _rows(body: Any, *keys: str) -> list[dict[str, Any]]:
    """The list of objects in an API answer: the answer itself or under one of ``keys``."""
    if isinstance(body, list):
        return [r for r in body if isinstance(r, dict)]
    if isinstance(body, dict):
        for key in keys:
            value = body.get(key)
            if isinstance(value, list):
                return [r for r in value if isinstance(r, dict)]
            if isinstance(value, dict):  # keyed by name: name -> state
                return [
                    {"name": k, **v} if isinstance(v, dict) else {"name": k, "value": v}
                    for k, v in value.items()
                ]
    return []


_LIFECYCLE_KINDS = {
    models_pb2.MODEL_EVENT_TYPE_REGISTERED: "registered",
    models_pb2.MODEL_EVENT_TYPE_GATE_PASSED: "gate",
    models_pb2.MODEL_EVENT_TYPE_GATE_REJECTED: "gate",
    models_pb2.MODEL_EVENT_TYPE_PUBLISHED: "published",
    models_pb2.MODEL_EVENT_TYPE_ALIAS_SET: "alias",
    models_pb2.MODEL_EVENT_TYPE_PROMOTED: "promoted",
    models_pb2.MODEL_EVENT_TYPE_ROLLED_BACK: "rolled_back",
    models_pb2.MODEL_EVENT_TYPE_UNPUBLISHED: "unpublished",
    models_pb2.MODEL_EVENT_TYPE_ROUTING_ANNOUNCED: "routing",
}


def _lifecycle_step(event: models_pb2.ModelEvent) -> TimelineStep:
    kind = _LIFECYCLE_KINDS.get(event.type, "lifecycle")
    name = models_pb2.ModelEventType.Name(event.type).removeprefix("MODEL_EVENT_TYPE_")
    title = f"v{event.version} {name.lower().replace('_', ' ')}"
    if event.alias:
        title += f" ({event.alias}" + (
            f", {event.traffic_percent} %)" if event.traffic_percent else ")"
        )
    if event.reason:
        title += f": {event.reason}"
    return TimelineStep(
        at=_timestamp(event.occurred_at),
        kind=kind,
        title=title,
        source="registry (models.lifecycle)",
        evidence=MessageToDict(event, preserving_proto_field_name=True),
    )


def _drift_step(event: Any) -> TimelineStep:
    return TimelineStep(
        at=_timestamp(event.detected_at),
        kind="drift",
        title=f"drift on {event.signal} ({event.detector}): {event.statistic:.4g} "
        f"over threshold {event.threshold:.4g}",
        source="monitoring (monitoring.drift)",
        evidence=MessageToDict(event, preserving_proto_field_name=True),
    )


def _cycle_steps(cycle: dict[str, Any]) -> Sequence[TimelineStep]:
    """The steps of one autopilot cycle; a cycle without steps is one step."""
    steps = cycle.get("steps")
    cycle_id = str(cycle.get("cycle_id", cycle.get("id", "")))
    if isinstance(steps, list) and steps:
        return [
            TimelineStep(
                at=str(s.get("at", s.get("started_at", s.get("timestamp", "")))),
                kind=str(s.get("phase", s.get("state", s.get("kind", "step")))),
                title=f"cycle {cycle_id} ({cycle.get('trigger', '?')}): "
                + str(s.get("summary", s.get("phase", "step"))),
                source="autopilot",
                evidence=_as_dict(s.get("evidence", s)),
            )
            for s in steps
            if isinstance(s, dict)
        ]
    return [
        TimelineStep(
            at=str(cycle.get("started_at", cycle.get("at", ""))),
            kind=str(cycle.get("state", cycle.get("outcome", "cycle"))),
            title=f"cycle {cycle_id}: {cycle.get('outcome', cycle.get('state', ''))}",
            source="autopilot",
            evidence=cycle,
        )
    ]


def now_iso() -> str:
    return datetime.now(UTC).isoformat()
