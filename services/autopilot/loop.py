"""``Autopilot``: the platform's closed loop, as a state machine.

    watching --(drift | schedule | quality below the floor)--> retraining  (RetrainRequest)
    retraining --(REGISTERED, this request's run)--> gating
    gating --(GATE_REJECTED: insufficient data)--> retraining  (again, on more labels)
    gating --(GATE_REJECTED)--> watching                       outcome rejected_by_gate
    gating --(GATE_PASSED)--> shadow    (SetAlias shadow 100 %: both versions score every call)
    shadow --(paired test: better)--> canary   (SetAlias canary N %)
    shadow --(worse | no significant gain after the last look)--> watching  (shadow removed)
    canary --(errors, latency, degraded, Triton no worse)--> promoted  (SetAlias production)
    canary --(a check worse)--> watching                       (canary removed)
    promoted --(production degrades during the watch)--> watching   (Rollback)
    promoted --(watch over)--> watching                        outcome promoted

Guardrails: one cycle (so one training) at a time, a cooldown between retraining requests, a
minimum of new labelled outcomes since the last training, and a cap on consecutive automatic
rollbacks after which the loop halts until an operator resumes it. When the gate had too
little held-out data to judge (a drift-triggered training is judged on labelled traffic after
the onset, of which there is little at first), the cycle trains again once the outcomes
labelled since it began have doubled, up to ``max_training_attempts`` trainings; a drift
event held back by a busy loop or the cooldown is deferred, not dropped: the shift's one
event is not lost. A pause stops every automatic action (traffic stays where it is) until
resumed. "Insufficient data" is never a verdict: the judge waits, and at the phase's timeout
the candidate is withdrawn as inconclusive (production never changes on too little evidence).

Every transition is a registry call whose reason carries the evidence (the registry turns
it into a ModelEvent with actor "autopilot") and a step of the cycle, kept in the loop's
history. The class is pure logic over its ports (registry, training requests, evidence), so
unit tests drive it with fakes and a clock.
"""

from __future__ import annotations

import asyncio
import math
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

from google.protobuf.json_format import MessageToDict, ParseDict

from services.autopilot import metrics
from services.autopilot.judges import (
    OperationalPolicy,
    OperationalVerdict,
    PairedPolicy,
    VersionHealth,
    judge_operational,
    judge_paired,
)
from services.autopilot.state import (
    CANARY,
    GATING,
    HISTORY_LIMIT,
    OUTCOME_GATE_REJECTED,
    OUTCOME_INCONCLUSIVE,
    OUTCOME_PROMOTED,
    OUTCOME_ROLLED_BACK,
    OUTCOME_SUPERSEDED,
    OUTCOME_TRAINING_FAILED,
    PHASES,
    PROMOTED,
    RETRAINING,
    SHADOW,
    WATCHING,
    Cycle,
    LoopEvent,
    StateFile,
    Step,
)
from services.shared.errors import FailedPrecondition, PlatformError
from services.shared.logging import get_logger
from services.shared.model_aliases import PRODUCTION, served_alias
from services.shared.proto.mlops.v1 import models_pb2, monitoring_pb2

log = get_logger("autopilot")

ACTOR = "autopilot"
EventType = models_pb2.ModelEventType


# ----------------------------------------------------------------------------- ports


@dataclass(frozen=True)
class PairedData:
    """Labelled transactions both versions scored (monitoring's /api/v1/paired)."""

    labels: list[float]
    baseline_scores: list[float]
    candidate_scores: list[float]
    baseline_flagged: list[bool]  # each version's decision at its own threshold
    candidate_flagged: list[bool]


class Registry(Protocol):
    async def set_alias(
        self, alias: str, version: int, *, traffic_percent: int = 0, reason: str = ""
    ) -> None: ...

    async def rollback(self, reason: str) -> None: ...

    async def training_request_id(self, version: int) -> str: ...

    async def production_version(self) -> int: ...


class TrainingRequests(Protocol):
    async def send(self, request: monitoring_pb2.RetrainRequest) -> None: ...


class Evidence(Protocol):
    """Monitoring's and Prometheus's view of the live system."""

    async def paired(self, baseline: int, candidate: int, limit: int) -> PairedData: ...

    async def live_quality(self, version: int) -> dict[str, float] | None: ...

    async def new_labels_since(self, since: datetime) -> float | None: ...

    async def health(
        self, versions: list[tuple[str, int]], since: datetime
    ) -> list[VersionHealth]: ...


@dataclass(frozen=True)
class LoopPolicy:
    """The guardrails and timings (AutopilotSettings supplies them)."""

    model_name: str = "fraud_detector"
    drift_kinds: tuple[str, ...] = ("concept", "data", "score")
    schedule_interval_s: float = 0.0  # 0: no scheduled retraining
    quality_floor: float = 0.0  # live PR-AUC floor of production; 0: off
    quality_min_labelled: int = 200
    quality_check_interval_s: float = 60.0
    cooldown_s: float = 900.0
    deferred_max_age_s: float = 3600.0  # a held-back drift event older than this is dropped
    min_new_labels: int = 500
    training_timeout_s: float = 1800.0
    max_training_attempts: int = 4  # per cycle, when the gate had too little data to judge
    max_consecutive_rollbacks: int = 3
    shadow_percent: int = 100
    shadow_timeout_s: float = 1800.0
    paired_limit: int = 20_000
    judge_interval_s: float = 15.0
    canary_percent: int = 10  # the canary's share at least
    canary_max_percent: int = 50  # and at most, when production's traffic is thin
    canary_sample_s: float = 30.0  # the share is sized for the minimum sample in this time
    canary_timeout_s: float = 900.0
    watch_s: float = 120.0
    settle_s: float = 10.0
    paired: PairedPolicy = field(default_factory=PairedPolicy)
    operational: OperationalPolicy = field(default_factory=OperationalPolicy)


def _iso(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat()


def _parse(text: str) -> datetime | None:
    return datetime.fromisoformat(text) if text else None


def _answers_a_shift(cycle: Cycle) -> bool:
    """The cycle answers a concept shift or a drop of live quality: its candidate must
    decline more frauds than production, not only fewer legitimate payments."""
    if cycle.trigger == "quality":
        return True
    return cycle.trigger == "drift" and cycle.trigger_evidence.get("kind", "concept") == "concept"


# ----------------------------------------------------------------------------- the loop


class Autopilot:
    def __init__(
        self,
        policy: LoopPolicy,
        registry: Registry,
        training: TrainingRequests,
        evidence: Evidence,
        store: StateFile,
        *,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.policy = policy
        self.registry = registry
        self.training = training
        self.evidence = evidence
        self.store = store
        self.clock = clock
        self.state = store.load()
        self._last_quality_check: datetime | None = None
        self.recent_triggers: list[dict[str, Any]] = []
        self._export()

    # ------------------------------------------------------------------ reading

    @property
    def phase(self) -> str:
        return self.state.cycle.phase if self.state.cycle else WATCHING

    def status(self) -> dict[str, Any]:
        """What `mlops loop status` and the dashboard show."""
        state = self.state
        now = self.clock()
        cooldown_left = 0.0
        last = _parse(state.last_request_at)
        if last is not None:
            cooldown_left = max(0.0, self.policy.cooldown_s - (now - last).total_seconds())
        return {
            "model_name": self.policy.model_name,
            "state": "halted" if state.halted else "paused" if state.paused else self.phase,
            "phase": self.phase,
            "paused": state.paused,
            "halted": state.halted,
            "production_version": state.production_version,
            "consecutive_rollbacks": state.consecutive_rollbacks,
            "max_consecutive_rollbacks": self.policy.max_consecutive_rollbacks,
            "cooldown_left_s": round(cooldown_left, 1),
            "last_request_at": state.last_request_at,
            "last_training_at": state.last_training_at,
            "cycle": asdict(state.cycle) if state.cycle else None,
            "last_cycle": asdict(state.history[-1]) if state.history else None,
            "recent_triggers": self.recent_triggers[-10:],
            "deferred": state.deferred,
            "events": [asdict(e) for e in state.events[-10:]],
            "policy": _policy_summary(self.policy),
        }

    def history(self, limit: int = 20) -> list[dict[str, Any]]:
        cycles = self.state.history[-limit:] if limit > 0 else []
        return [asdict(c) for c in reversed(cycles)]

    # ------------------------------------------------------------------ bookkeeping

    def _save(self) -> None:
        self.store.save(self.state)
        self._export()

    def _export(self) -> None:
        for phase in PHASES:
            metrics.PHASE.labels(phase).set(1 if phase == self.phase else 0)
        metrics.PAUSED.set(1 if self.state.paused else 0)
        metrics.HALTED.set(1 if self.state.halted else 0)
        metrics.CONSECUTIVE_ROLLBACKS.set(self.state.consecutive_rollbacks)

    def _step(
        self, cycle: Cycle, phase: str, summary: str, evidence: dict[str, Any] | None = None
    ) -> None:
        now = self.clock()
        if phase != cycle.phase:
            cycle.phase_started_at = _iso(now)
            cycle.looks = 0
            cycle.last_look_at = ""
            metrics.TRANSITIONS.labels(phase).inc()
        cycle.phase = phase
        cycle.steps.append(Step(phase, _iso(now), summary, evidence or {}))
        log.info(
            "loop_step",
            cycle_id=cycle.cycle_id,
            phase=phase,
            candidate=cycle.candidate_version,
            production=cycle.production_version,
            summary=summary,
        )

    def _end(self, cycle: Cycle, outcome: str, summary: str, evidence: dict[str, Any]) -> None:
        now = self.clock()
        cycle.steps.append(Step(outcome, _iso(now), summary, evidence))
        cycle.outcome = outcome
        cycle.ended_at = _iso(now)
        cycle.phase = WATCHING
        self.state.history.append(cycle)
        del self.state.history[:-HISTORY_LIMIT]
        self.state.cycle = None
        metrics.CYCLES.labels(outcome).inc()
        log.info(
            "loop_cycle_ended",
            cycle_id=cycle.cycle_id,
            outcome=outcome,
            candidate=cycle.candidate_version,
            summary=summary,
        )
        if outcome == OUTCOME_ROLLED_BACK:
            self.state.consecutive_rollbacks += 1
            if self.state.consecutive_rollbacks >= self.policy.max_consecutive_rollbacks:
                self.state.halted = True
                reason = (
                    f"{self.state.consecutive_rollbacks} consecutive automatic rollbacks "
                    f"(cap {self.policy.max_consecutive_rollbacks}): the loop stops until an "
                    "operator resumes it (mlops loop resume)"
                )
                self.state.events.append(LoopEvent("halted", _iso(now), ACTOR, reason))
                log.error("loop_halted", reason=reason)
        elif outcome == OUTCOME_PROMOTED:
            self.state.consecutive_rollbacks = 0
        self._save()

    def _reason(self, cycle: Cycle, summary: str) -> str:
        return f"autopilot cycle {cycle.cycle_id} ({cycle.trigger}): {summary}"

    # ------------------------------------------------------------------ operator

    def pause(self, actor: str, reason: str = "") -> dict[str, Any]:
        if not self.state.paused:
            self.state.paused = True
            self.state.events.append(LoopEvent("paused", _iso(self.clock()), actor, reason))
            log.warning("loop_paused", actor=actor, reason=reason, phase=self.phase)
            self._save()
        return self.status()

    def resume(self, actor: str, reason: str = "") -> dict[str, Any]:
        if self.state.paused or self.state.halted:
            was = "halted" if self.state.halted else "paused"
            self.state.paused = False
            self.state.halted = False
            self.state.consecutive_rollbacks = 0
            self.state.events.append(
                LoopEvent("resumed", _iso(self.clock()), actor, reason or f"was {was}")
            )
            log.warning("loop_resumed", actor=actor, reason=reason, was=was)
            self._save()
        return self.status()

    @property
    def acting(self) -> bool:
        return not (self.state.paused or self.state.halted)

    # ------------------------------------------------------------------ triggers

    def _note_trigger(self, source: str, outcome: str, detail: str) -> None:
        metrics.TRIGGERS.labels(source, outcome).inc()
        self.recent_triggers.append(
            {"at": _iso(self.clock()), "source": source, "outcome": outcome, "detail": detail}
        )
        del self.recent_triggers[:-50]
        log.info("loop_trigger", source=source, outcome=outcome, detail=detail)

    async def trigger(
        self,
        source: str,
        evidence: dict[str, Any],
        drift: monitoring_pb2.DriftEvent | None = None,
    ) -> bool:
        """A reason to retrain: one RetrainRequest if every guardrail allows it."""
        now = self.clock()
        if self.state.halted:
            self._note_trigger(source, "halted", "the loop is halted (mlops loop resume)")
            return False
        if self.state.paused:
            self._note_trigger(source, "paused", "the loop is paused")
            return False
        if self.state.cycle is not None:
            self._note_trigger(
                source,
                "busy",
                f"cycle {self.state.cycle.cycle_id} is in {self.state.cycle.phase}"
                + ("; deferred until it ends" if drift is not None else ""),
            )
            self._defer(source, evidence, drift, "busy")
            return False
        last = _parse(self.state.last_request_at)
        if last is not None and (now - last).total_seconds() < self.policy.cooldown_s:
            left = self.policy.cooldown_s - (now - last).total_seconds()
            self._note_trigger(
                source,
                "cooldown",
                f"{left:.0f}s of cooldown left" + ("; deferred" if drift is not None else ""),
            )
            self._defer(source, evidence, drift, "cooldown")
            return False
        since = _parse(self.state.last_training_at) or _parse(self.state.last_request_at)
        if self.policy.min_new_labels > 0 and since is not None:
            try:
                labels = await self.evidence.new_labels_since(since)
            except PlatformError as exc:
                metrics.ACTION_FAILURES.labels("labels").inc()
                labels = None
                log.warning("label_count_failed", error=exc.message)
            if labels is None:
                self._note_trigger(source, "labels_unknown", "new labels cannot be counted now")
                return False
            if labels < self.policy.min_new_labels:
                self._note_trigger(
                    source,
                    "labels",
                    f"{labels:.0f} new labelled outcomes since the last training "
                    f"(needs {self.policy.min_new_labels})",
                )
                return False
            evidence = {**evidence, "new_labels": labels}
        if drift is not None and drift.HasField("onset_at") and self.policy.min_new_labels > 0:
            # a drift-triggered training splits around the onset: it needs outcomes labelled
            # (and archived) after it, or it fails on an empty post-onset set
            onset = drift.onset_at.ToDatetime(tzinfo=UTC)
            try:
                after = await self.evidence.new_labels_since(min(onset, now))
            except PlatformError as exc:
                metrics.ACTION_FAILURES.labels("labels").inc()
                log.warning("label_count_failed", error=exc.message)
                after = None
            if after is None or after < self.policy.min_new_labels:
                self._note_trigger(
                    source,
                    "onset_labels",
                    f"{after or 0:.0f} outcomes labelled since the onset (needs "
                    f"{self.policy.min_new_labels}); deferred",
                )
                self._defer(source, evidence, drift, "onset_labels")
                return False
            evidence = {**evidence, "labels_since_onset": after}
        cycle = Cycle(
            cycle_id=f"c-{uuid.uuid4().hex[:8]}",
            trigger=source,
            started_at=_iso(now),
            trigger_evidence=evidence,
            production_version=self.state.production_version,
        )
        try:
            await self._request_training(cycle, drift, now)
        except PlatformError as exc:
            metrics.ACTION_FAILURES.labels("retrain_request").inc()
            self._note_trigger(source, "send_failed", exc.message)
            return False
        self.state.cycle = cycle
        self.state.last_request_at = _iso(now)
        self._note_trigger(source, "requested", f"request {cycle.request_id}")
        self._step(
            cycle,
            RETRAINING,
            f"retraining requested ({source}): request {cycle.request_id}",
            evidence,
        )
        self._save()
        return True

    def _defer(
        self,
        source: str,
        evidence: dict[str, Any],
        drift: monitoring_pb2.DriftEvent | None,
        why: str,
    ) -> None:
        """Keep the newest drift event a busy loop or the cooldown held back (monitoring
        raises one event per shift and signal, then stays quiet for its own cooldown)."""
        if drift is None:
            return  # a schedule or a quality floor asks again by itself
        self.state.deferred = {
            "source": source,
            "evidence": evidence,
            "held_back": why,
            "at": _iso(self.clock()),
            "checked_at": _iso(self.clock()),
        }
        self._save()

    async def _deferred_trigger(self, now: datetime) -> bool:
        """Act on a held-back drift event once the loop is free; True if it is still waiting."""
        deferred = self.state.deferred
        evidence = dict(deferred.get("evidence") or {})
        version = int(evidence.get("model_version") or 0)
        if version and version != self.state.production_version:
            log.info(
                "deferred_drift_dropped", about=version, production=self.state.production_version
            )
            self.state.deferred = {}
            self._save()
            return False
        held_since = _parse(str(deferred.get("at") or ""))
        if held_since is not None:
            age = (now - held_since).total_seconds()
            if age > self.policy.deferred_max_age_s:
                self._note_trigger(
                    str(deferred.get("source") or "drift"),
                    "expired",
                    f"a drift event held back {age:.0f}s ago (more than "
                    f"{self.policy.deferred_max_age_s:.0f}s): dropped, monitoring raises a new "
                    "one if the shift lasts",
                )
                self.state.deferred = {}
                self._save()
                return False
        last = _parse(self.state.last_request_at)
        if last is not None and (now - last).total_seconds() < self.policy.cooldown_s:
            return True
        checked = _parse(str(deferred.get("checked_at") or ""))
        if checked is not None and (now - checked).total_seconds() < self.policy.judge_interval_s:
            return True
        self.state.deferred = {}
        self._save()
        drift = ParseDict(evidence, monitoring_pb2.DriftEvent(), ignore_unknown_fields=True)
        evidence["deferred"] = {k: v for k, v in deferred.items() if k != "evidence"}
        await self.trigger(str(deferred.get("source") or "drift"), evidence, drift)
        return True

    async def _request_training(
        self, cycle: Cycle, drift: monitoring_pb2.DriftEvent | None, now: datetime
    ) -> None:
        """Send one RetrainRequest for ``cycle`` (raises PlatformError when it cannot)."""
        request = monitoring_pb2.RetrainRequest(
            request_id=f"autopilot-{uuid.uuid4().hex[:12]}",
            model_name=self.policy.model_name,
            reason=cycle.trigger,
            requested_by=ACTOR,
            # every attempt may end in a rejection and another attempt: the gate splits
            # its error rate over all the cycle may spend
            gate_tests=self.policy.max_training_attempts,
        )
        request.requested_at.FromDatetime(now)
        if drift is not None:
            request.drift.CopyFrom(drift)
        await self.training.send(request)
        cycle.request_id = request.request_id
        cycle.requested_at = _iso(now)
        cycle.attempts += 1

    async def _labels_since_start(self, cycle: Cycle) -> float | None:
        try:
            return await self.evidence.new_labels_since(_parse(cycle.started_at) or self.clock())
        except PlatformError as exc:
            metrics.ACTION_FAILURES.labels("labels").inc()
            log.warning("label_count_failed", error=exc.message)
            return None

    async def _retry_training(self, cycle: Cycle, now: datetime) -> None:
        """The gate had too little data: train again once the outcomes labelled since the
        cycle began have doubled (and grown by ``min_new_labels``), so that a few trainings
        cover a long wait for labels."""
        last_look = _parse(cycle.last_look_at)
        if (
            last_look is not None
            and (now - last_look).total_seconds() < self.policy.judge_interval_s
        ):
            return
        cycle.last_look_at = _iso(now)
        labels = await self._labels_since_start(cycle)
        needed = max(2 * cycle.retry_labels, cycle.retry_labels + self.policy.min_new_labels)
        if labels is None or labels < needed:
            return
        drift = None
        if cycle.trigger == "drift":
            drift = ParseDict(
                cycle.trigger_evidence, monitoring_pb2.DriftEvent(), ignore_unknown_fields=True
            )
        try:
            await self._request_training(cycle, drift, now)
        except PlatformError as exc:
            metrics.ACTION_FAILURES.labels("retrain_request").inc()
            log.warning("retrain_request_failed", error=exc.message, note="retried next tick")
            return
        cycle.retry_after = ""
        self.state.last_request_at = _iso(now)
        self._step(
            cycle,
            RETRAINING,
            f"retraining requested again (training {cycle.attempts} of at most "
            f"{self.policy.max_training_attempts}): {labels:.0f} outcomes labelled since the "
            "cycle began"
            + (
                f", {cycle.retry_labels:.0f} when the last one gave no candidate"
                if cycle.retry_labels
                else ""
            )
            + f"; request {cycle.request_id}",
            {"labels_since_start": labels, "labels_at_gate": cycle.retry_labels},
        )
        self._save()

    async def on_training_result(self, result: monitoring_pb2.TrainingResult) -> None:
        """A training ended (training.results): the failure of the one this cycle waits for
        is acted on at once; before, it showed only as no candidate after
        ``training_timeout_s`` (30 minutes by default)."""
        if result.model_name and result.model_name != self.policy.model_name:
            return
        cycle = self.state.cycle
        if (
            cycle is None
            or cycle.phase != RETRAINING
            or cycle.retry_after
            or result.request_id != cycle.request_id
            or result.status != monitoring_pb2.TRAINING_STATUS_FAILED
        ):
            return
        await self._no_candidate(
            cycle,
            f"training {result.request_id} failed ({result.error_code}): {result.error}",
            {"request_id": result.request_id, "error_code": result.error_code,
             "error": result.error, "seconds": round(result.seconds, 1)},
        )  # fmt: skip

    async def _no_candidate(self, cycle: Cycle, why: str, evidence: dict[str, Any]) -> None:
        """The training this cycle asked for gave no candidate (it failed, or none came in
        time): train again once the outcomes labelled since the cycle began have doubled (a
        drift-triggered training fails when too few transactions after the onset are
        labelled yet), or end the cycle after ``max_training_attempts``."""
        if self._trainings_left(cycle):
            labels = await self._labels_since_start(cycle) or 0.0
            self._train_again(
                cycle,
                labels,
                f"{why}; training again once the outcomes labelled since the cycle began "
                f"({labels:.0f}) have doubled (training {cycle.attempts} of at "
                f"most {self.policy.max_training_attempts})",
                evidence,
            )
            return
        self._end(cycle, OUTCOME_TRAINING_FAILED, why, evidence)

    def _trainings_left(self, cycle: Cycle) -> bool:
        """The loop asked for this cycle's training and may ask for another."""
        return bool(cycle.request_id) and cycle.attempts < self.policy.max_training_attempts

    def _train_again(
        self, cycle: Cycle, retry_labels: float, summary: str, evidence: dict[str, Any]
    ) -> None:
        """Back to retraining without a candidate: ``_retry_training`` asks for the next
        training once the outcomes labelled since the cycle began reach
        ``max(2 x retry_labels, retry_labels + min_new_labels)``."""
        cycle.retry_after = _iso(self.clock())
        cycle.retry_labels = retry_labels
        cycle.candidate_version, cycle.gate_passed, cycle.look_positives = 0, False, 0
        self._step(cycle, RETRAINING, summary, evidence)
        self._save()

    async def on_drift(self, event: monitoring_pb2.DriftEvent) -> None:
        if event.model_name and event.model_name != self.policy.model_name:
            return
        production = self.state.production_version
        if event.model_version and production and event.model_version != production:
            return  # about a shadow or canary version: not a reason to retrain production
        kind = event.kind or "concept"
        if kind not in self.policy.drift_kinds:
            self._note_trigger("drift", "ignored_kind", f"{kind} drift is not a trigger")
            return
        evidence = MessageToDict(event, preserving_proto_field_name=True)
        await self.trigger("drift", evidence, drift=event)

    # ------------------------------------------------------------------ lifecycle

    async def on_lifecycle(self, event: models_pb2.ModelEvent) -> None:
        """Follow the registry: candidates, and what operators do meanwhile."""
        if event.model_name and event.model_name != self.policy.model_name:
            return
        production = next((s.version for s in event.served if served_alias(s) == PRODUCTION), 0)
        if production and production != self.state.production_version:
            self.state.production_version = production
            self._save()
        cycle = self.state.cycle
        if event.type == EventType.MODEL_EVENT_TYPE_REGISTERED:
            self.state.last_training_at = _iso(self.clock())
            if (
                cycle is not None
                and cycle.phase == RETRAINING
                and await self._is_ours(cycle, event.version)
            ):
                cycle.candidate_version = event.version
                self._step(
                    cycle,
                    GATING,
                    f"training registered v{event.version}; the registry's gate judges it",
                )
            self._save()
        elif event.type == EventType.MODEL_EVENT_TYPE_GATE_REJECTED:
            if cycle is not None and cycle.candidate_version == event.version:
                # each of the cycle's trainings may be judged (the gate splits its error rate
                # over them): one trained on the shift's first minute may lose or be undecided
                # where one trained on more of the new pattern wins
                if self._trainings_left(cycle):
                    labels = await self._labels_since_start(cycle) or 0.0
                    said = (
                        event.reason
                        if event.gate.outcome == models_pb2.GATE_OUTCOME_INSUFFICIENT_DATA
                        else f"rejected v{event.version}: {event.reason}"
                    )
                    self._train_again(
                        cycle,
                        labels,
                        f"gate: {said}; training again once the outcomes labelled "
                        f"since the cycle began ({labels:.0f}) have doubled "
                        f"(training {cycle.attempts} of at most "
                        f"{self.policy.max_training_attempts})",
                        _gate_evidence(event),
                    )
                    return
                self._end(cycle, OUTCOME_GATE_REJECTED, event.reason, _gate_evidence(event))
        elif event.type == EventType.MODEL_EVENT_TYPE_GATE_PASSED:
            await self._gate_passed(event)
        elif event.actor != ACTOR and cycle is not None:
            self._check_superseded(cycle, event)

    async def _is_ours(self, cycle: Cycle, version: int) -> bool:
        try:
            return await self.registry.training_request_id(version) == cycle.request_id
        except PlatformError as exc:
            metrics.ACTION_FAILURES.labels("lineage").inc()
            log.warning("lineage_failed", version=version, error=exc.message)
            return False

    async def _gate_passed(self, event: models_pb2.ModelEvent) -> None:
        cycle = self.state.cycle
        version = event.version
        if event.HasField("gate") and event.gate.baseline_version == 0:
            # the first model: the registry makes it production (nothing to compare with)
            log.info("first_model_not_judged", version=version)
            return
        if cycle is None:
            if not self.acting:
                log.info("candidate_not_adopted", version=version, reason="loop paused or halted")
                return
            # a training somebody else asked for (mlops train): judged like the loop's own
            now = self.clock()
            cycle = Cycle(
                cycle_id=f"c-{uuid.uuid4().hex[:8]}",
                trigger="registered",
                started_at=_iso(now),
                trigger_evidence={"actor": event.actor, "version": version},
                candidate_version=version,
                production_version=self.state.production_version,
            )
            self.state.cycle = cycle
        elif cycle.phase == RETRAINING and await self._is_ours(cycle, version):
            cycle.candidate_version = version
        elif cycle.candidate_version != version or cycle.phase not in (RETRAINING, GATING):
            log.info(
                "candidate_waiting",
                version=version,
                reason=f"cycle {cycle.cycle_id} is busy with v{cycle.candidate_version}",
            )
            return
        cycle.gate_passed = True
        self._step(
            cycle, GATING, f"v{version} passed the gate: {event.reason}", _gate_evidence(event)
        )
        self._save()
        await self._enter_shadow(cycle)

    async def _enter_shadow(self, cycle: Cycle) -> None:
        if not self.acting:
            return
        cycle.production_version = self.state.production_version
        summary = (
            f"v{cycle.candidate_version} in shadow at {self.policy.shadow_percent}% beside "
            f"production v{cycle.production_version}: paired live comparison"
        )
        try:
            await self.registry.set_alias(
                "shadow",
                cycle.candidate_version,
                traffic_percent=self.policy.shadow_percent,
                reason=self._reason(cycle, summary),
            )
        except FailedPrecondition as exc:
            self._end(cycle, OUTCOME_SUPERSEDED, f"the registry refused shadow: {exc.message}", {})
            return
        except PlatformError as exc:
            metrics.ACTION_FAILURES.labels("set_shadow").inc()
            log.warning("set_shadow_failed", error=exc.message, note="retried on the next tick")
            return
        self._step(cycle, SHADOW, summary)
        self._save()

    def _check_superseded(self, cycle: Cycle, event: models_pb2.ModelEvent) -> None:
        """An operator (or another tool) moved traffic: the loop steps aside for this cycle."""
        served = {served_alias(s): s.version for s in event.served}
        expected = {
            SHADOW: ("shadow", cycle.candidate_version),
            CANARY: ("canary", cycle.candidate_version),
            PROMOTED: ("production", cycle.candidate_version),
        }.get(cycle.phase)
        if expected is None:
            return
        alias, version = expected
        if served.get(alias) != version:
            self._end(
                cycle,
                OUTCOME_SUPERSEDED,
                f"{event.actor or 'someone'} changed the routing "
                f"({models_pb2.ModelEventType.Name(event.type)}: {event.reason}); the loop "
                f"leaves v{cycle.candidate_version} as it is",
                {"event_id": event.event_id, "served": served},
            )

    # ------------------------------------------------------------------ the clock

    async def tick(self) -> None:
        """Periodic work: schedule, quality floor, timeouts, judges."""
        cycle = self.state.cycle
        if not self.acting:
            return
        now = self.clock()
        if cycle is None:
            await self._watch(now)
            return
        elapsed = (now - (_parse(cycle.phase_started_at) or now)).total_seconds()
        if cycle.phase in (RETRAINING, GATING):
            if cycle.gate_passed:
                await self._enter_shadow(cycle)
                return
            if cycle.retry_after:
                await self._retry_training(cycle, now)
                if cycle.retry_after:
                    waiting = (now - (_parse(cycle.retry_after) or now)).total_seconds()
                    if waiting > self.policy.training_timeout_s:
                        self._end(
                            cycle,
                            OUTCOME_GATE_REJECTED,
                            f"the gate had too little data and no {self.policy.min_new_labels} "
                            f"new labelled outcomes came within {waiting:.0f}s",
                            {},
                        )
                return
            requested = _parse(cycle.requested_at) or _parse(cycle.started_at) or now
            if (now - requested).total_seconds() <= self.policy.training_timeout_s:
                return
            if cycle.phase == RETRAINING:
                await self._no_candidate(
                    cycle,
                    f"no candidate {self.policy.training_timeout_s:.0f}s after request "
                    f"{cycle.request_id} (the training is stuck or its result was lost: see "
                    "the training service's log)",
                    {},
                )
            else:
                self._end(
                    cycle,
                    OUTCOME_TRAINING_FAILED,
                    f"no gate verdict on v{cycle.candidate_version} "
                    f"{self.policy.training_timeout_s:.0f}s after the request (see the "
                    "registry's log)",
                    {},
                )
            return
        last_look = _parse(cycle.last_look_at)
        if (
            last_look is not None
            and (now - last_look).total_seconds() < self.policy.judge_interval_s
        ):
            return
        if cycle.phase == SHADOW:
            await self._judge_shadow(cycle, now, elapsed)
        elif cycle.phase == CANARY:
            await self._judge_canary(cycle, now, elapsed)
        elif cycle.phase == PROMOTED:
            await self._watch_promotion(cycle, now, elapsed)

    async def _watch(self, now: datetime) -> None:
        policy = self.policy
        if self.state.deferred and await self._deferred_trigger(now):
            return
        if policy.schedule_interval_s > 0:
            last = _parse(self.state.last_request_at) or _parse(self.state.last_training_at)
            if last is None:
                self.state.last_training_at = _iso(now)  # the schedule counts from here
                self._save()
            elif (now - last).total_seconds() >= policy.schedule_interval_s:
                await self.trigger("schedule", {"interval_s": policy.schedule_interval_s})
                return
        if policy.quality_floor > 0 and self.state.production_version:
            checked = self._last_quality_check
            if (
                checked is None
                or (now - checked).total_seconds() >= policy.quality_check_interval_s
            ):
                self._last_quality_check = now
                try:
                    quality = await self.evidence.live_quality(self.state.production_version)
                except PlatformError as exc:
                    metrics.ACTION_FAILURES.labels("quality").inc()
                    log.warning("quality_unavailable", error=exc.message)
                    return
                if (
                    quality
                    and quality.get("n_labelled", 0) >= policy.quality_min_labelled
                    and quality.get("pr_auc", 1.0) < policy.quality_floor
                ):
                    await self.trigger(
                        "quality",
                        {**quality, "floor": policy.quality_floor, "metric": "pr_auc"},
                    )

    async def _withdraw(
        self, cycle: Cycle, alias: str, outcome: str, summary: str, evidence: dict[str, Any]
    ) -> None:
        try:
            await self.registry.set_alias(alias, 0, reason=self._reason(cycle, summary))
        except PlatformError as exc:
            metrics.ACTION_FAILURES.labels(f"remove_{alias}").inc()
            log.warning(f"remove_{alias}_failed", error=exc.message, note="retried next tick")
            return
        self._end(cycle, outcome, summary, evidence)

    async def _withdraw_shadow(
        self, cycle: Cycle, outcome: str, summary: str, evidence: dict[str, Any]
    ) -> None:
        """The shadow judge withdraws the candidate. In a cycle the loop trained for, with
        trainings left, that is not the cycle's end: a drift-triggered training on the shift's
        first labels may rank better and still decline no more of the new frauds, and one on
        more of them may (seen in the closed-loop benchmark). The loop trains again at once:
        the shadow phase brought the labels the next training learns from. Each
        candidate still has to pass the gate, whose alpha is split over the cycle's
        trainings, and its own shadow: a candidate that is no better is promoted with a
        chance of at most ``alpha`` (the shadow's) and the cycle's chance stays within the
        gate's ``alpha`` over all its trainings."""
        if not self._trainings_left(cycle):
            await self._withdraw(cycle, "shadow", outcome, summary, evidence)
            return
        try:
            await self.registry.set_alias("shadow", 0, reason=self._reason(cycle, summary))
        except PlatformError as exc:
            metrics.ACTION_FAILURES.labels("remove_shadow").inc()
            log.warning("remove_shadow_failed", error=exc.message, note="retried next tick")
            return
        self._train_again(
            cycle,
            0.0,  # the next tick asks (after min_new_labels, long since there)
            f"{summary}; v{cycle.candidate_version} withdrawn, training again on the outcomes "
            f"labelled since (training {cycle.attempts + 1} of at most "
            f"{self.policy.max_training_attempts})",
            evidence,
        )

    async def _judge_shadow(self, cycle: Cycle, now: datetime, elapsed: float) -> None:
        try:
            data = await self.evidence.paired(
                cycle.production_version, cycle.candidate_version, self.policy.paired_limit
            )
        except PlatformError as exc:
            metrics.ACTION_FAILURES.labels("paired").inc()
            log.warning("paired_unavailable", error=exc.message)
            return
        cycle.last_look_at = _iso(now)
        positives = int(sum(data.labels))
        needed = cycle.look_positives + self.policy.paired.look_new_positives
        if cycle.looks > 0 and positives < needed:
            # no new evidence worth a look (the budget of looks is spent on information)
            if elapsed > self.policy.shadow_timeout_s:
                await self._withdraw(
                    cycle,
                    "shadow",
                    OUTCOME_INCONCLUSIVE,
                    f"shadow: no verdict within {self.policy.shadow_timeout_s:.0f}s ({positives} "
                    f"labelled frauds, look {cycle.looks}/{self.policy.paired.max_looks}); "
                    "shadow removed, production unchanged",
                    {},
                )
            return
        look = cycle.looks + 1
        verdict = await asyncio.to_thread(  # a bootstrap: seconds of CPU, off the event loop
            judge_paired,
            data.labels,
            data.baseline_scores,
            data.candidate_scores,
            data.baseline_flagged,
            data.candidate_flagged,
            policy=self.policy.paired,
            look=look,
            seed=look,
            require_recall=_answers_a_shift(cycle),
        )
        metrics.VERDICTS.labels("shadow", verdict.outcome).inc()
        evidence = verdict.evidence()
        log.info(
            "shadow_verdict",
            cycle_id=cycle.cycle_id,
            outcome=verdict.outcome,
            summary=verdict.summary,
        )
        if verdict.outcome != "insufficient_data":
            cycle.looks = look  # only looks with enough data spend the error budget
            cycle.look_positives = verdict.positives
        if verdict.outcome == "better":
            share, sizing = await self._canary_share(cycle, now)
            summary = (
                f"shadow: v{cycle.candidate_version} better than v{cycle.production_version} "
                f"({verdict.summary}); canary at {share}% ({sizing})"
            )
            try:
                await self.registry.set_alias(
                    "canary",
                    cycle.candidate_version,
                    traffic_percent=share,
                    reason=self._reason(cycle, summary),
                )
            except PlatformError as exc:
                metrics.ACTION_FAILURES.labels("set_canary").inc()
                log.warning("set_canary_failed", error=exc.message)
                self._save()
                return
            self._step(cycle, CANARY, summary, {"shadow": evidence})
        elif verdict.outcome == "worse":
            await self._withdraw_shadow(
                cycle,
                OUTCOME_ROLLED_BACK,
                f"shadow: v{cycle.candidate_version} worse than production "
                f"v{cycle.production_version} ({verdict.summary}); shadow removed",
                {"shadow": evidence},
            )
            return
        elif verdict.outcome == "undecided" and look >= self.policy.paired.max_looks:
            await self._withdraw_shadow(
                cycle,
                OUTCOME_INCONCLUSIVE,
                f"shadow: no significant improvement after {look} looks ({verdict.summary}); "
                "shadow removed, production unchanged",
                {"shadow": evidence},
            )
            return
        elif elapsed > self.policy.shadow_timeout_s:
            await self._withdraw_shadow(
                cycle,
                OUTCOME_INCONCLUSIVE,
                f"shadow: no verdict within {self.policy.shadow_timeout_s:.0f}s "
                f"({verdict.summary}); shadow removed, production unchanged",
                {"shadow": evidence},
            )
            return
        else:
            cycle.steps.append(Step(SHADOW, _iso(now), verdict.summary, {"shadow": evidence}))
        self._save()

    async def _canary_share(self, cycle: Cycle, now: datetime) -> tuple[int, str]:
        """The canary's share: ``canary_percent``, raised (up to ``canary_max_percent``) so
        that the canary's minimum sample arrives within ``canary_sample_s`` at production's
        traffic over the shadow phase. What a bad canary can do is bounded by the answers it
        gives before its verdict (the minimum sample), not by the share: a larger share on
        thin traffic exposes no more answers, it only gets them sooner. Shadow has already
        shown the candidate better on labels; the canary checks what it cannot see."""
        policy = self.policy
        floor = policy.canary_percent
        if policy.canary_max_percent <= floor or policy.canary_sample_s <= 0:
            return floor, "fixed share"
        since = _parse(cycle.phase_started_at) or now
        seconds = (now - since).total_seconds()
        try:
            [production] = await self.evidence.health(
                [("production", cycle.production_version)], since
            )
        except PlatformError as exc:
            metrics.ACTION_FAILURES.labels("health").inc()
            log.warning("canary_sizing_unavailable", error=exc.message)
            return floor, "production's traffic unknown"
        if seconds <= 0 or production.requests <= 0:
            return floor, "production's traffic unknown"
        rate = production.requests / seconds
        needed = 100.0 * policy.operational.min_requests / (rate * policy.canary_sample_s)
        share = max(floor, min(policy.canary_max_percent, math.ceil(needed)))
        return share, (
            f"production answers {rate:.1f}/s: {policy.operational.min_requests} canary "
            f"answers in about {policy.operational.min_requests / (rate * share / 100):.0f}s"
        )

    async def _operational(
        self,
        judge: str,
        candidate: tuple[str, int],
        baseline: tuple[str, int] | VersionHealth,
        since: datetime,
        elapsed: float,
    ) -> tuple[OperationalVerdict, VersionHealth, VersionHealth] | None:
        wanted = [candidate] if isinstance(baseline, VersionHealth) else [candidate, baseline]
        try:
            healths = await self.evidence.health(wanted, since)
        except PlatformError as exc:
            metrics.ACTION_FAILURES.labels("health").inc()
            log.warning("health_unavailable", judge=judge, error=exc.message)
            return None
        base = baseline if isinstance(baseline, VersionHealth) else healths[1]
        verdict = judge_operational(
            healths[0],
            base,
            policy=self.policy.operational,
            elapsed_s=elapsed,
            latency=judge != "watch",  # the watch's baseline is another period's
        )
        metrics.VERDICTS.labels(judge, verdict.outcome).inc()
        log.info(
            "operational_verdict", judge=judge, outcome=verdict.outcome, summary=verdict.summary
        )
        return verdict, healths[0], base

    def _window(self, cycle: Cycle, now: datetime) -> tuple[datetime, float] | None:
        """The evidence window of canary and watch: from ``settle_s`` after the switch (its
        first seconds, while serving moves over, say nothing about the version), or None."""
        start = (_parse(cycle.phase_started_at) or now) + timedelta(seconds=self.policy.settle_s)
        if now <= start:
            return None
        return start, (now - start).total_seconds()

    async def _judge_canary(self, cycle: Cycle, now: datetime, elapsed: float) -> None:
        window = self._window(cycle, now)
        if window is None:
            return
        since, measured = window
        judged = await self._operational(
            "canary",
            ("canary", cycle.candidate_version),
            ("production", cycle.production_version),
            since,
            measured,
        )
        if judged is None:
            return
        verdict, _, baseline = judged
        cycle.last_look_at = _iso(now)
        evidence = {"canary": verdict.evidence()}
        if verdict.outcome != "insufficient_data":
            cycle.looks += 1
        if verdict.outcome == "fail":
            await self._withdraw(
                cycle,
                "canary",
                OUTCOME_ROLLED_BACK,
                f"canary: v{cycle.candidate_version} {verdict.summary}; canary removed",
                evidence,
            )
            return
        if verdict.outcome == "pass":
            shadow = next(
                (
                    s.evidence["shadow"].get("summary", "")
                    for s in cycle.steps
                    if s.phase == CANARY and "shadow" in s.evidence
                ),
                "",
            )
            summary = (
                f"promoted v{cycle.candidate_version} to production: shadow {shadow}; "
                f"canary {verdict.summary}"
            )
            try:
                await self.registry.set_alias(
                    "production", cycle.candidate_version, reason=self._reason(cycle, summary)
                )
            except PlatformError as exc:
                metrics.ACTION_FAILURES.labels("promote").inc()
                log.warning("promote_failed", error=exc.message)
                self._save()
                return
            cycle.baseline_health = baseline.as_dict()
            self.state.production_version = cycle.candidate_version
            self._step(cycle, PROMOTED, summary, evidence)
        elif elapsed > self.policy.canary_timeout_s:
            await self._withdraw(
                cycle,
                "canary",
                OUTCOME_INCONCLUSIVE,
                f"canary: {verdict.summary} after {self.policy.canary_timeout_s:.0f}s; canary "
                "removed, production unchanged",
                evidence,
            )
            return
        else:
            cycle.steps.append(Step(CANARY, _iso(now), verdict.summary, evidence))
        self._save()

    async def _watch_promotion(self, cycle: Cycle, now: datetime, elapsed: float) -> None:
        baseline = VersionHealth.from_dict(cycle.baseline_health) if cycle.baseline_health else None
        if baseline is None or baseline.requests <= 0:
            if elapsed >= self.policy.watch_s:
                self._end(cycle, OUTCOME_PROMOTED, "promoted (no production baseline to watch)", {})
            return
        window = self._window(cycle, now)
        if window is None:
            return
        since, measured = window
        judged = await self._operational(
            "watch", ("production", cycle.candidate_version), baseline, since, measured
        )
        if judged is None:
            return
        verdict, _, _ = judged
        cycle.last_look_at = _iso(now)
        evidence = {"watch": verdict.evidence()}
        if verdict.outcome == "fail":
            summary = (
                f"production v{cycle.candidate_version} degraded after its promotion: "
                f"{verdict.summary}; rolled back to v{cycle.production_version}"
            )
            try:
                await self.registry.rollback(self._reason(cycle, summary))
            except PlatformError as exc:
                metrics.ACTION_FAILURES.labels("rollback").inc()
                log.warning("rollback_failed", error=exc.message)
                self._save()
                return
            self.state.production_version = cycle.production_version
            self._end(cycle, OUTCOME_ROLLED_BACK, summary, evidence)
            return
        if elapsed >= self.policy.watch_s:
            self._end(
                cycle,
                OUTCOME_PROMOTED,
                f"v{cycle.candidate_version} kept in production after a "
                f"{self.policy.watch_s:.0f}s watch: {verdict.summary}",
                evidence,
            )
            return
        self._save()

    async def start(self) -> None:
        """Learn production from the registry (the lifecycle topic is read from now on)."""
        try:
            production = await self.registry.production_version()
        except PlatformError as exc:
            log.warning("production_unknown", error=exc.message)
            return
        if production and production != self.state.production_version:
            self.state.production_version = production
            self._save()


def _gate_evidence(event: models_pb2.ModelEvent) -> dict[str, Any]:
    if not event.HasField("gate"):
        return {}
    return {"gate": MessageToDict(event.gate, preserving_proto_field_name=True)}


def _policy_summary(policy: LoopPolicy) -> dict[str, Any]:
    summary = asdict(policy)
    summary["drift_kinds"] = list(policy.drift_kinds)
    return summary
