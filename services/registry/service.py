"""The model registry's domain logic: versions, the evaluation gate, aliases, rollback, lineage.

``ModelRegistryService`` is blocking (MLflow over HTTP, Triton's model control, torch for the
gate); ``RegistryCoordinator`` runs it in a worker thread, one change at a time. It returns the
registry's own types (``records.py``; the transports convert them, ``views.py``). Every change
returns the ``LifecycleEvent``s it caused, which the coordinator publishes on
``models.lifecycle`` *after* the method returned, i.e. after the change is durable. Its parts:
``registration.py`` (what a run must be to become a version), ``gate.py`` (the evaluation
gate), ``publication.py`` (Triton's repository and loading), ``retirement.py`` (grace periods),
``routing.py`` (the routing rules).

A change that moves traffic is zero-gap (serving routes by the lifecycle events, so it keeps
naming the old versions until the event reaches it):

1. Triton serves the union of the old and the new versions: new versions' files are written
   (sha256 verified), config.pbtxt lists both sets, Triton loads them. If Triton refuses,
   nothing else changes and the previous configuration is restored.
2. MLflow: aliases, then version tags and the production history (durable from here on).
3. The events, each carrying the new complete routing table (``served``).
4. Versions that left the routing table are *retiring*: once the events announcing the switch
   were acknowledged (``start_grace``) and ``retire_grace_s`` has passed (``retire_due``),
   Triton serves exactly the routing table and each gets an UNPUBLISHED event.

Retiring versions are tracked (``RetirementSchedule``), so the reconcile pass keeps them
loaded. Versions loaded
in Triton that are neither routed nor retiring (the process died during a grace period or in
the middle of a switch) are retired the same way by ``reconcile``, after an announcement of
the current routing table, never unloaded at once.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field

import numpy as np

from services.registry.gate import (
    GateDecision,
    GatePolicy,
    HeldOutSet,
    decide,
    read_held_out_set,
    score_torchscript,
)
from services.registry.mlflow_store import (
    TAG_FEATURE_NAMES,
    TAG_GATE,
    TAG_SHA256,
    TAG_STAGE,
    TAG_STAGE_REASON,
    TAG_THRESHOLD,
    TAG_TRAFFIC,
    MlflowModelStore,
    VersionView,
)
from services.registry.publication import TritonPublication
from services.registry.records import (
    EventType,
    LifecycleEvent,
    LineageRecord,
    Stage,
    VersionRecord,
    stage_name,
    stage_value,
)
from services.registry.registration import (
    Candidate,
    candidate_of,
    checked_registration,
    verified_run,
)
from services.registry.retirement import Retirement, RetirementSchedule
from services.registry.routing import Route, routing_table
from services.registry.settings import RegistrySettings
from services.registry.triton_repository import TritonModelRepository
from services.shared import run_contract as rc
from services.shared.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
)
from services.shared.logging import get_logger
from services.shared.mlflow_client import RunView
from services.shared.model_aliases import ALIASES, CANARY, PRODUCTION, SHADOW, alias_role
from services.shared.proto.mlops.v1 import models_pb2

log = get_logger("registry")

_STAGE_OF_ALIAS = {
    PRODUCTION: Stage.MODEL_STAGE_PRODUCTION,
    CANARY: Stage.MODEL_STAGE_CANARY,
    SHADOW: Stage.MODEL_STAGE_SHADOW,
}


@dataclass
class Transition:
    """The result of a mutation: the version it concerns, the events to publish, and the
    versions whose grace period starts once those events are acknowledged."""

    version: VersionRecord
    events: list[LifecycleEvent] = field(default_factory=list)
    retiring: list[Retirement] = field(default_factory=list)


@dataclass(frozen=True)
class ReconcileReport:
    desired: list[int]
    ready_before: list[int]
    reloaded: list[int]  # versions whose probe failed and were unloaded + loaded
    published: bool  # config rewritten and loaded because Triton differed from the aliases
    # the routing table announced (start-up, or loaded versions nothing routes to were found)
    events: list[LifecycleEvent] = field(default_factory=list)
    retiring: list[Retirement] = field(default_factory=list)  # found loaded, routed nowhere


def _gate_tests(run: RunView) -> int:
    """Gate tests the run's requester may spend on its shift (1 when it does not say)."""
    try:
        return max(1, int(run.tags.get(rc.TAG_GATE_TESTS, "1")))
    except ValueError:
        return 1


def assemble_lineage(model_name: str, version: VersionView, run: RunView) -> LineageRecord:
    """Version -> run -> dataset snapshot -> feature definitions -> code (pure)."""
    tags = run.tags
    return LineageRecord(
        model_name=model_name,
        version=version.version,
        run_id=run.run_id,
        experiment_id=run.experiment_id,
        dataset_snapshot_id=tags.get(rc.TAG_SNAPSHOT_ID, ""),
        dataset_sha256=tags.get(rc.TAG_SNAPSHOT_SHA256, ""),
        feature_service=tags.get(rc.TAG_FEATURE_SERVICE, ""),
        feature_definitions_sha256=tags.get(rc.TAG_FEATURE_DEFINITIONS_SHA256, ""),
        code_commit=tags.get(rc.TAG_CODE_COMMIT, ""),
        params=dict(run.params),
        metrics=dict(run.metrics),
        artifact_sha256=version.tags.get(TAG_SHA256, ""),
        training_request_id=tags.get(rc.TAG_REQUEST_ID, ""),
    )


class ModelRegistryService:
    """One registered model in MLflow, served by Triton, gated on held-out data."""

    def __init__(
        self,
        settings: RegistrySettings,
        store: MlflowModelStore,
        triton: TritonModelRepository,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self.model_name = settings.model_name
        self.store = store
        self.triton = triton
        self.publication = TritonPublication(self.model_name, store, triton)
        self.policy = GatePolicy.from_settings(settings)
        self._retirements = RetirementSchedule(settings.retire_grace_s, clock)

    # ------------------------------------------------------------------ reading

    def _check_name(self, model_name: str) -> None:
        if model_name and model_name != self.model_name:
            raise NotFound(
                f"model {model_name!r} is not managed here (this registry manages "
                f"{self.model_name!r})"
            )

    def _aliases(self) -> dict[str, int]:
        try:
            return {a: v for a, v in self.store.aliases(self.model_name).items() if a in ALIASES}
        except NotFound:
            return {}

    def _record(
        self,
        view: VersionView,
        aliases: Mapping[str, int],
        served: list[Route],
        metrics: Mapping[str, float],
    ) -> VersionRecord:
        held = sorted(alias for alias, version in aliases.items() if version == view.version)
        stage = stage_value(view.tags.get(TAG_STAGE, "CANDIDATE"))
        for alias in ALIASES:  # the aliases are authoritative for what serves
            if alias in held:
                stage = _STAGE_OF_ALIAS[alias]
                break
        else:
            if stage in _STAGE_OF_ALIAS.values():
                stage = Stage.MODEL_STAGE_ARCHIVED
        return VersionRecord(
            model_name=self.model_name,
            version=view.version,
            stage=stage,
            aliases=tuple(held),
            traffic_percent=next(
                (s.traffic_percent for s in served if s.version == view.version), 0
            ),
            run_id=view.run_id,
            artifact_sha256=view.tags.get(TAG_SHA256, ""),
            metrics=dict(metrics),
            threshold=float(view.tags.get(TAG_THRESHOLD, "0") or 0),
            feature_names=tuple(json.loads(view.tags.get(TAG_FEATURE_NAMES, "[]"))),
            gate=GateDecision.from_json(view.tags[TAG_GATE]) if TAG_GATE in view.tags else None,
            created_at=view.created_at,
            description=view.description,
        )

    def _run_metrics(self, run_id: str) -> dict[str, float]:
        try:
            return dict(self.store.run(run_id).metrics)
        except NotFound:
            return {}

    def _version(self, version: int) -> VersionRecord:
        view = self.store.version(self.model_name, version)
        aliases = self._aliases()
        return self._record(view, aliases, self._routing(aliases), self._run_metrics(view.run_id))

    def list_versions(self, model_name: str = "") -> list[VersionRecord]:
        self._check_name(model_name)
        try:
            views = self.store.versions(self.model_name)
        except NotFound:
            return []
        aliases = self._aliases()
        by_version = {v.version: v for v in views}
        served = routing_table(
            aliases, {v: by_version[v].tags for v in aliases.values() if v in by_version}
        )
        return [self._record(v, aliases, served, self._run_metrics(v.run_id)) for v in views]

    def get_version(self, model_name: str = "", version: int = 0, alias: str = "") -> VersionRecord:
        self._check_name(model_name)
        if alias:
            alias_role(alias)  # InvalidArgument unless it is one
            target = self._aliases().get(alias)
            if target is None:
                raise NotFound(f"{self.model_name} has no {alias} version")
            return self._version(target)
        if version <= 0:
            raise InvalidArgument("version", "a positive version or an alias is required")
        return self._version(version)

    def lineage(self, model_name: str, version: int) -> LineageRecord:
        self._check_name(model_name)
        if version <= 0:
            raise InvalidArgument("version", "must be positive")
        view = self.store.version(self.model_name, version)
        return assemble_lineage(self.model_name, view, self.store.run(view.run_id))

    def _routing(self, aliases: Mapping[str, int]) -> list[Route]:
        tags = {v: self.store.version(self.model_name, v).tags for v in set(aliases.values())}
        return routing_table(aliases, tags)

    def routing(self) -> list[Route]:
        """The complete routing table as the aliases and version tags say now."""
        return self._routing(self._aliases())

    def routing_table(self, model_name: str = "") -> list[Route]:
        """``routing`` for a caller that names the model (``GetRoutingTable``)."""
        self._check_name(model_name)
        return self.routing()

    # ------------------------------------------------------------------ events

    def _event(
        self,
        kind: models_pb2.ModelEventType.ValueType,
        version: int,
        *,
        alias: str = "",
        traffic_percent: int = 0,
        previous_version: int = 0,
        reason: str = "",
        actor: str = "",
        gate: GateDecision | None = None,
        served: list[Route] | None = None,
    ) -> LifecycleEvent:
        return LifecycleEvent(
            type=kind,
            model_name=self.model_name,
            version=version,
            served=tuple(served or ()),
            alias=alias,
            traffic_percent=traffic_percent,
            previous_version=previous_version,
            reason=reason,
            actor=actor,
            gate=gate,
        )

    # ------------------------------------------------------------------ retirement

    def retiring(self) -> dict[int, float | None]:
        """Versions kept loaded for their grace period -> when it ends (None: not started)."""
        return self._retirements.deadlines()

    def _retire_later(self, versions: Collection[int], reason: str, actor: str) -> list[Retirement]:
        added = self._retirements.add(versions, reason, actor)
        if added:
            log.info(
                "versions_retiring",
                model=self.model_name,
                versions=",".join(str(r.version) for r in added),
                reason=reason,
            )
        return added

    def start_grace(self, retirements: Collection[Retirement]) -> None:
        """The switch that retired these was announced: their grace period starts now."""
        self._retirements.start_grace(retirements)

    def next_retirement_at(self) -> float | None:
        """When the earliest started grace period ends (the service's clock), if any."""
        return self._retirements.next_at()

    def retire_due(self) -> list[LifecycleEvent]:
        """Unload the retiring versions whose grace period is over; their UNPUBLISHED events.

        Triton then serves exactly the routing table plus the versions still in their grace
        period. On failure (``Unavailable``) they stay retiring and a later call tries again.
        """
        due, waiting = self._retirements.due()
        if not due:
            return []
        aliases = self._aliases()
        served = set(aliases.values())
        keep = sorted(served | waiting)  # empty: no alias left at all, nothing may serve
        self.publication.serve_only(keep, served, due)
        self._retirements.done(due)
        gone = sorted(v for v in due if v not in served)
        log.info(
            "versions_retired",
            model=self.model_name,
            versions=",".join(map(str, gone)),
            serving=",".join(map(str, keep)),
        )
        table = self._routing(aliases)
        return [
            self._event(
                EventType.MODEL_EVENT_TYPE_UNPUBLISHED,
                version,
                reason=due[version].reason,
                actor=due[version].actor,
                served=table,
            )
            for version in gone
        ]

    def _tag(self, version: int, **tags: str) -> None:
        self.store.set_version_tags(self.model_name, version, tags)

    def _move_traffic(
        self,
        new: dict[str, int],
        *,
        kind: models_pb2.ModelEventType.ValueType,
        version: int,
        alias: str,
        reason: str,
        actor: str,
        traffic_percent: int = 0,
        gate: GateDecision | None = None,
        history: list[int] | None = None,
        archive_reason: str = "",
    ) -> tuple[list[LifecycleEvent], list[Retirement]]:
        """Apply a new alias table: Triton serves old and new, then MLflow aliases, tags,
        history; the events. Versions that leave the table are retiring (still loaded)."""
        old = self._aliases()
        wanted = set(new.values())
        still_loaded = set(old.values()) | self._retirements.versions()
        published = self.publication.serve(wanted | still_loaded, still_loaded)
        published = [v for v in published if v in wanted]
        for name, target in new.items():
            if old.get(name) != target:
                self.store.set_alias(self.model_name, name, target)
        for name in old:
            if name not in new:
                self.store.delete_alias(self.model_name, name)
        for name, target in new.items():
            self._tag(target, **{TAG_STAGE: stage_name(_STAGE_OF_ALIAS[name])})
        if alias in (CANARY, SHADOW) and version:
            self._tag(version, **{TAG_TRAFFIC: str(traffic_percent)})
        retired = sorted(set(old.values()) - set(new.values()))
        for gone in retired:
            self._tag(
                gone,
                **{
                    TAG_STAGE: stage_name(Stage.MODEL_STAGE_ARCHIVED),
                    TAG_STAGE_REASON: archive_reason or reason,
                },
            )
        if history is not None:
            self.store.set_production_history(self.model_name, history)
        self._retirements.keep(wanted)  # back in the table before its grace ended
        retiring = self._retire_later(retired, reason, actor)
        served = self.routing()
        events = [
            self._event(
                EventType.MODEL_EVENT_TYPE_PUBLISHED, v, reason=reason, actor=actor, served=served
            )
            for v in published
        ]
        shown_traffic = next((s.traffic_percent for s in served if s.alias == alias), 0)
        events.append(
            self._event(
                kind,
                version,
                alias=alias,
                traffic_percent=shown_traffic,
                previous_version=old.get(alias, 0),
                reason=reason,
                actor=actor,
                gate=gate,
                served=served,
            )
        )
        return events, retiring

    # ------------------------------------------------------------------ mutations

    def register(
        self,
        model_name: str,
        run_id: str,
        artifact_sha256: str,
        *,
        description: str = "",
        canary_traffic_percent: int = 0,
        actor: str = "",
    ) -> Transition:
        """Verify, version, gate and (when it passes) publish a finished training run."""
        self._check_name(model_name)
        sha = checked_registration(run_id, artifact_sha256, canary_traffic_percent)
        model, run = verified_run(self.store, run_id, sha)
        repeated = self._registered_version(run_id)
        if repeated:  # a retried registration (the trainer crashed after the call)
            log.info("registration_repeated", run_id=run_id, version=repeated)
            return Transition(self._version(repeated))
        candidate = candidate_of(run, model, sha)
        held_out = read_held_out_set(
            self.store.download(run_id, rc.TEST_SET_ARTIFACT), candidate.feature_names
        )
        scores = score_torchscript(model, held_out.features)  # also proves it loads

        version = self._create_version(candidate, description)
        served_now = self.routing()
        events = [
            self._event(
                EventType.MODEL_EVENT_TYPE_REGISTERED, version, actor=actor, served=served_now
            )
        ]
        aliases = self._aliases()
        decision = self._gate(version, candidate, scores, held_out, aliases.get(PRODUCTION, 0))
        events.append(
            self._event(
                EventType.MODEL_EVENT_TYPE_GATE_PASSED
                if decision.passed
                else EventType.MODEL_EVENT_TYPE_GATE_REJECTED,
                version,
                reason=decision.reason,
                actor=actor,
                gate=decision,
                served=served_now,
            )
        )
        if not decision.passed:
            return Transition(self._version(version), events)
        moved, retiring = self._publish_passed(
            version, decision, aliases, canary_traffic_percent, actor
        )
        return Transition(self._version(version), events + moved, retiring)

    def _registered_version(self, run_id: str) -> int:
        """The version already registered from ``run_id`` (0: none)."""
        try:
            existing = [v for v in self.store.versions(self.model_name) if v.run_id == run_id]
        except NotFound:
            existing = []
        return existing[0].version if existing else 0

    def _create_version(self, candidate: Candidate, description: str) -> int:
        self.store.ensure_model(self.model_name)
        view = self.store.create_version(
            self.model_name,
            candidate.run,
            {
                TAG_SHA256: candidate.sha256,
                TAG_STAGE: stage_name(Stage.MODEL_STAGE_CANDIDATE),
                TAG_THRESHOLD: repr(candidate.threshold),
                TAG_FEATURE_NAMES: json.dumps(candidate.feature_names),
            },
            description,
        )
        log.info(
            "version_registered",
            model=self.model_name,
            version=view.version,
            run_id=candidate.run.run_id,
        )
        return view.version

    def _gate(
        self,
        version: int,
        candidate: Candidate,
        scores: np.ndarray,
        held_out: HeldOutSet,
        production_version: int,
    ) -> GateDecision:
        """The evaluation gate on the candidate's held-out set, against production scored on
        the same rows; the decision is recorded on the version (stage and gate tags)."""
        production, production_threshold = None, 0.5
        if production_version:
            production_view = self.store.version(self.model_name, production_version)
            production = score_torchscript(
                self.publication.verified_artifact(production_version), held_out.features
            )
            production_threshold = float(production_view.tags.get(TAG_THRESHOLD, "0.5"))
        decision = decide(
            self.policy.split_over(_gate_tests(candidate.run)),
            held_out.labels,
            scores,
            candidate.threshold,
            production,
            production_threshold,
            production_version,
        )
        self._tag(version, **{TAG_GATE: decision.to_json()})
        log.info(
            "gate_decided",
            model=self.model_name,
            version=version,
            passed=decision.passed,
            reason=decision.reason,
        )
        if not decision.passed:
            # too little data is no verdict: the version stays a candidate (not published)
            stage = (
                Stage.MODEL_STAGE_CANDIDATE
                if decision.outcome == "insufficient_data"
                else Stage.MODEL_STAGE_REJECTED
            )
            self._tag(
                version,
                **{TAG_STAGE: stage_name(stage), TAG_STAGE_REASON: decision.reason},
            )
        return decision

    def _publish_passed(
        self,
        version: int,
        decision: GateDecision,
        aliases: dict[str, int],
        canary_traffic_percent: int,
        actor: str,
    ) -> tuple[list[LifecycleEvent], list[Retirement]]:
        """A version that passed the gate: production when there is none, else canary (or,
        with ``publish_passed_as`` none, left to the autopilot)."""
        if not aliases.get(PRODUCTION):
            return self._move_traffic(
                {**aliases, PRODUCTION: version},
                kind=EventType.MODEL_EVENT_TYPE_PROMOTED,
                version=version,
                alias=PRODUCTION,
                reason="first model: no production version to compare with",
                actor=actor,
                gate=decision,
                history=[version],
            )
        if self.settings.publish_passed_as == "none" and not canary_traffic_percent:
            log.info("candidate_awaits_autopilot", model=self.model_name, version=version)
            return [], []
        share = canary_traffic_percent or self.settings.default_canary_percent
        return self._move_traffic(
            {**aliases, CANARY: version},
            kind=EventType.MODEL_EVENT_TYPE_ALIAS_SET,
            version=version,
            alias=CANARY,
            reason=f"passed the evaluation gate: {decision.reason}",
            actor=actor,
            traffic_percent=share,
            gate=decision,
            archive_reason=f"replaced as canary by v{version}",
        )

    def set_alias(
        self,
        model_name: str,
        alias: str,
        version: int,
        *,
        traffic_percent: int = 0,
        reason: str = "",
        actor: str = "",
    ) -> Transition:
        """Move ``production`` (promote), ``canary`` or ``shadow``; version 0 removes one."""
        self._check_name(model_name)
        if alias not in ALIASES:
            raise InvalidArgument("alias", f"must be one of {', '.join(ALIASES)}")
        if version < 0:
            raise InvalidArgument("version", "must not be negative")
        if not 0 <= traffic_percent <= 100:
            raise InvalidArgument("traffic_percent", "must be between 0 and 100")
        aliases = self._aliases()
        if version == 0:
            if alias == PRODUCTION:
                raise InvalidArgument("version", "production cannot be removed, only replaced")
            current = aliases.get(alias)
            if current is None:
                raise NotFound(f"{self.model_name} has no {alias} version")
            new = {k: v for k, v in aliases.items() if k != alias}
            events, retiring = self._move_traffic(
                new,
                kind=EventType.MODEL_EVENT_TYPE_ALIAS_SET,
                version=0,
                alias=alias,
                reason=reason or f"{alias} removed",
                actor=actor,
                archive_reason=reason or f"{alias} removed",
            )
            return Transition(self._version(current), events, retiring)

        view = self.store.version(self.model_name, version)  # NotFound for unknown versions
        stage = stage_value(view.tags.get(TAG_STAGE, ""))
        if stage == Stage.MODEL_STAGE_REJECTED:
            raise FailedPrecondition(
                f"v{version} was rejected by the evaluation gate "
                f"({view.tags.get(TAG_STAGE_REASON, '')}); it cannot serve"
            )
        if alias == PRODUCTION:
            current = aliases.get(PRODUCTION, 0)
            if current == version:
                return Transition(self._version(version))
            history = self.store.production_history(self.model_name) if current else []
            new = {k: v for k, v in aliases.items() if v != version}
            new[PRODUCTION] = version
            events, retiring = self._move_traffic(
                new,
                kind=EventType.MODEL_EVENT_TYPE_PROMOTED,
                version=version,
                alias=PRODUCTION,
                reason=reason or "promoted",
                actor=actor,
                history=[*history, version],
                archive_reason=f"replaced in production by v{version}",
            )
            return Transition(self._version(version), events, retiring)

        if aliases.get(PRODUCTION) == version:
            raise FailedPrecondition(f"v{version} is production; it cannot also be {alias}")
        if PRODUCTION not in aliases:
            raise FailedPrecondition(f"{self.model_name} has no production version yet")
        default = (
            self.settings.default_canary_percent
            if alias == CANARY
            else self.settings.default_shadow_percent
        )
        share = traffic_percent or default
        new = {k: v for k, v in aliases.items() if v != version}
        new[alias] = version
        events, retiring = self._move_traffic(
            new,
            kind=EventType.MODEL_EVENT_TYPE_ALIAS_SET,
            version=version,
            alias=alias,
            reason=reason or f"{alias} at {share}%",
            actor=actor,
            traffic_percent=share,
            archive_reason=f"replaced as {alias} by v{version}",
        )
        return Transition(self._version(version), events, retiring)

    def rollback(self, model_name: str, *, reason: str = "", actor: str = "") -> Transition:
        """Production goes back to the previous production version; the current is archived."""
        self._check_name(model_name)
        aliases = self._aliases()
        current = aliases.get(PRODUCTION)
        if current is None:
            raise FailedPrecondition(f"{self.model_name} has no production version")
        history = self.store.production_history(self.model_name)
        while history and history[-1] == current:
            history.pop()
        if not history:
            raise FailedPrecondition(
                f"v{current} is the only production version {self.model_name} has had"
            )
        previous = history[-1]
        new = {k: v for k, v in aliases.items() if v not in (previous, current)}
        new[PRODUCTION] = previous
        events, retiring = self._move_traffic(
            new,
            kind=EventType.MODEL_EVENT_TYPE_ROLLED_BACK,
            version=previous,
            alias=PRODUCTION,
            reason=reason or f"rolled back from v{current}",
            actor=actor,
            history=history,
            archive_reason=f"rolled back: {reason}" if reason else "rolled back",
        )
        return Transition(self._version(previous), events, retiring)

    # ------------------------------------------------------------------ reconciliation

    def reconcile(self, *, announce: bool = False) -> ReconcileReport:
        """Make Triton serve what the aliases say (plus the retiring versions), and reload
        versions that fail a tiny inference (a dead Python-backend stub still reports ready).

        Nothing is unloaded here: a loaded version that is neither routed nor retiring (the
        process died in a grace period or in the middle of a switch, so some consumer may still
        route to it) becomes retiring, and the current routing table is announced; its grace
        period starts once that announcement is acknowledged. ``announce`` announces the
        routing table in any case (start-up: a consumer that missed events converges).
        """
        aliases = self._aliases()
        desired = sorted(set(aliases.values()))
        if not desired:
            return ReconcileReport([], [], [], False)
        retiring = self._retirements.versions()
        ready = self.triton.ready_versions()
        unrouted = set(ready) - set(desired) - retiring
        keep = set(desired) | retiring | unrouted
        intact = all(self.triton.verify_version(v) for v in keep)
        published = False
        if not intact or set(ready) != keep:
            log.info(
                "triton_out_of_date",
                model=self.model_name,
                desired=",".join(map(str, desired)),
                retiring=",".join(map(str, sorted(retiring | unrouted))),
                ready=",".join(map(str, ready)),
                files_intact=intact,
            )
            self.publication.serve(keep, set())
            published = True
        reloaded = self.publication.reload_failing(desired)
        found = self._retire_later(
            unrouted, "loaded in Triton but in no alias (a switch that did not finish)", ""
        )
        events = []
        if announce or found:
            table = self._routing(aliases)
            events.append(
                self._event(
                    EventType.MODEL_EVENT_TYPE_ROUTING_ANNOUNCED,
                    aliases.get(PRODUCTION, 0),
                    alias=PRODUCTION if PRODUCTION in aliases else "",
                    traffic_percent=next(
                        (s.traffic_percent for s in table if s.alias == PRODUCTION), 0
                    ),
                    reason="registry started" if announce else "reconciled with Triton",
                    served=table,
                )
            )
        return ReconcileReport(desired, ready, reloaded, published, events, found)
