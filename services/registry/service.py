"""The model registry's domain logic: versions, the evaluation gate, aliases, rollback, lineage.

``ModelRegistryService`` is blocking (MLflow over HTTP, Triton's model control, torch for the
gate); ``RegistryCoordinator`` runs it in a worker thread, one change at a time. Every change
returns the ``ModelEvent``s it caused, which the coordinator publishes on ``models.lifecycle``
*after* the method returned, i.e. after the change is durable.

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

Retiring versions are tracked here, so the reconcile pass keeps them loaded. Versions loaded
in Triton that are neither routed nor retiring (the process died during a grace period or in
the middle of a switch) are retired the same way by ``reconcile``, after an announcement of
the current routing table, never unloaded at once.
"""

from __future__ import annotations

import json
import re
import threading
import time
import uuid
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime

from google.protobuf.timestamp_pb2 import Timestamp

from services.registry import run_contract as rc
from services.registry.gate import (
    GateDecision,
    GatePolicy,
    decide,
    evaluate_model,
    read_held_out_set,
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
    RunView,
    VersionView,
)
from services.registry.routing import ALIASES, CANARY, PRODUCTION, SHADOW, routing_table
from services.registry.settings import RegistrySettings
from services.registry.triton_repository import TritonModelRepository, sha256_hex
from services.shared.errors import (
    FailedPrecondition,
    IntegrityError,
    InvalidArgument,
    NotFound,
    Unavailable,
)
from services.shared.logging import get_logger
from services.shared.proto.mlops.v1 import models_pb2

log = get_logger("registry")

Stage = models_pb2.ModelStage
EventType = models_pb2.ModelEventType
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_STAGE_OF_ALIAS = {
    PRODUCTION: Stage.MODEL_STAGE_PRODUCTION,
    CANARY: Stage.MODEL_STAGE_CANARY,
    SHADOW: Stage.MODEL_STAGE_SHADOW,
}


@dataclass(eq=False)
class Retirement:
    """A version that left the routing table and stays loaded in Triton for a grace period.

    ``deadline`` (on the service's clock) is unset until the events announcing the switch
    were acknowledged: the grace counts from the moment consumers can know.
    """

    version: int
    reason: str
    actor: str
    deadline: float | None = None


@dataclass
class Transition:
    """The result of a mutation: the version it concerns, the events to publish, and the
    versions whose grace period starts once those events are acknowledged."""

    version: models_pb2.ModelVersion
    events: list[models_pb2.ModelEvent] = field(default_factory=list)
    retiring: list[Retirement] = field(default_factory=list)


@dataclass(frozen=True)
class ReconcileReport:
    desired: list[int]
    ready_before: list[int]
    reloaded: list[int]  # versions whose probe failed and were unloaded + loaded
    published: bool  # config rewritten and loaded because Triton differed from the aliases
    # the routing table announced (start-up, or loaded versions nothing routes to were found)
    events: list[models_pb2.ModelEvent] = field(default_factory=list)
    retiring: list[Retirement] = field(default_factory=list)  # found loaded, routed nowhere


def _stage_name(stage: models_pb2.ModelStage.ValueType) -> str:
    return models_pb2.ModelStage.Name(stage).removeprefix("MODEL_STAGE_")


def _stage_value(name: str) -> models_pb2.ModelStage.ValueType:
    try:
        return models_pb2.ModelStage.Value(f"MODEL_STAGE_{name}")
    except ValueError:
        return Stage.MODEL_STAGE_UNSPECIFIED


def assemble_lineage(model_name: str, version: VersionView, run: RunView) -> models_pb2.Lineage:
    """Version -> run -> dataset snapshot -> feature definitions -> code (pure)."""
    tags = run.tags
    return models_pb2.Lineage(
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
        self.policy = GatePolicy(settings.gate_metric_margin, settings.gate_calibration_tolerance)
        self._clock = clock
        # version -> its retirement; changed by mutations (worker thread) and by start_grace
        # (the event loop, when the broker acknowledged), hence the lock
        self._retiring: dict[int, Retirement] = {}
        self._retiring_lock = threading.Lock()

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

    def _to_proto(
        self,
        view: VersionView,
        aliases: Mapping[str, int],
        served: list[models_pb2.ServedVersion],
        metrics: Mapping[str, float],
    ) -> models_pb2.ModelVersion:
        held = sorted(alias for alias, version in aliases.items() if version == view.version)
        stage = _stage_value(view.tags.get(TAG_STAGE, "CANDIDATE"))
        for alias in ALIASES:  # the aliases are authoritative for what serves
            if alias in held:
                stage = _STAGE_OF_ALIAS[alias]
                break
        else:
            if stage in _STAGE_OF_ALIAS.values():
                stage = Stage.MODEL_STAGE_ARCHIVED
        traffic = next((s.traffic_percent for s in served if s.version == view.version), 0)
        message = models_pb2.ModelVersion(
            model_name=self.model_name,
            version=view.version,
            stage=stage,
            aliases=held,
            traffic_percent=traffic,
            run_id=view.run_id,
            artifact_sha256=view.tags.get(TAG_SHA256, ""),
            metrics=dict(metrics),
            threshold=float(view.tags.get(TAG_THRESHOLD, "0") or 0),
            feature_names=json.loads(view.tags.get(TAG_FEATURE_NAMES, "[]")),
            description=view.description,
        )
        if TAG_GATE in view.tags:
            message.gate.CopyFrom(GateDecision.from_json(view.tags[TAG_GATE]).to_proto())
        message.created_at.FromDatetime(view.created_at)
        return message

    def _run_metrics(self, run_id: str) -> dict[str, float]:
        try:
            return dict(self.store.run(run_id).metrics)
        except NotFound:
            return {}

    def _proto(self, version: int) -> models_pb2.ModelVersion:
        view = self.store.version(self.model_name, version)
        aliases = self._aliases()
        return self._to_proto(view, aliases, self._routing(aliases), self._run_metrics(view.run_id))

    def list_versions(self, model_name: str = "") -> list[models_pb2.ModelVersion]:
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
        return [self._to_proto(v, aliases, served, self._run_metrics(v.run_id)) for v in views]

    def get_version(
        self, model_name: str = "", version: int = 0, alias: str = ""
    ) -> models_pb2.ModelVersion:
        self._check_name(model_name)
        if alias:
            if alias not in ALIASES:
                raise InvalidArgument("alias", f"must be one of {', '.join(ALIASES)}")
            target = self._aliases().get(alias)
            if target is None:
                raise NotFound(f"{self.model_name} has no {alias} version")
            return self._proto(target)
        if version <= 0:
            raise InvalidArgument("version", "a positive version or an alias is required")
        return self._proto(version)

    def lineage(self, model_name: str, version: int) -> models_pb2.Lineage:
        self._check_name(model_name)
        if version <= 0:
            raise InvalidArgument("version", "must be positive")
        view = self.store.version(self.model_name, version)
        return assemble_lineage(self.model_name, view, self.store.run(view.run_id))

    def _routing(self, aliases: Mapping[str, int]) -> list[models_pb2.ServedVersion]:
        tags = {v: self.store.version(self.model_name, v).tags for v in set(aliases.values())}
        return routing_table(aliases, tags)

    def routing(self) -> list[models_pb2.ServedVersion]:
        """The complete routing table as the aliases and version tags say now."""
        return self._routing(self._aliases())

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
        served: list[models_pb2.ServedVersion] | None = None,
    ) -> models_pb2.ModelEvent:
        occurred = Timestamp()
        occurred.FromDatetime(datetime.now(UTC))
        event = models_pb2.ModelEvent(
            event_id=uuid.uuid4().hex,
            type=kind,
            model_name=self.model_name,
            version=version,
            alias=alias,
            traffic_percent=traffic_percent,
            previous_version=previous_version,
            reason=reason,
            actor=actor,
            occurred_at=occurred,
            served=served if served is not None else [],
        )
        if gate is not None:
            event.gate.CopyFrom(gate.to_proto())
        return event

    # ------------------------------------------------------------------ artifacts and Triton

    def _verified_artifact(self, view: VersionView) -> bytes:
        """The version's TorchScript from MLflow, refused unless it matches its sha256."""
        payload = self.store.download(view.run_id, rc.MODEL_ARTIFACT)
        expected = view.tags.get(TAG_SHA256, "")
        actual = sha256_hex(payload)
        if actual != expected:
            raise IntegrityError(
                f"{self.model_name} v{view.version}: artifact sha256 {actual} does not match "
                f"the registered {expected}; refusing to publish"
            )
        return payload

    def _n_inputs(self, views: Mapping[int, VersionView]) -> int:
        widths = {len(json.loads(v.tags.get(TAG_FEATURE_NAMES, "[]"))) for v in views.values()}
        if len(widths) != 1 or 0 in widths:
            raise FailedPrecondition(
                f"served versions disagree on their inputs ({sorted(widths)} features)"
            )
        return widths.pop()

    def _serve(self, target: Collection[int], before: Collection[int]) -> list[int]:
        """Make Triton serve exactly ``target`` (files verified, written when missing).

        ``before`` is what Triton serves now; returns the versions of ``target`` not in it.
        """
        wanted = sorted(set(target))
        if (
            set(wanted) == set(before)
            and all(self.triton.verify_version(v) for v in wanted)
            and set(wanted) <= set(self.triton.ready_versions())
        ):
            return []  # e.g. only a traffic share changed: Triton already serves these
        views = {v: self.store.version(self.model_name, v) for v in wanted}
        for version, view in views.items():
            if not self.triton.verify_version(version):
                self.triton.write_version(
                    version, self._verified_artifact(view), view.tags.get(TAG_SHA256, "")
                )
        n_inputs = self._n_inputs(views)
        self.triton.write_config(wanted, n_inputs)
        try:
            self.triton.load()
            ready = set(self.triton.ready_versions())
            if not set(wanted) <= ready:
                raise Unavailable(
                    f"Triton serves {sorted(ready)} after loading {wanted} of {self.model_name}"
                )
        except Unavailable:
            if before:  # Triton keeps the old versions serving; keep the files saying so
                self.triton.write_config(sorted(set(before)), n_inputs)
                try:
                    self.triton.load()
                except Unavailable as exc:
                    log.error("config_restore_failed", model=self.model_name, error=str(exc))
            raise
        log.info("triton_serving", model=self.model_name, versions=",".join(map(str, wanted)))
        return [v for v in wanted if v not in set(before)]

    # ------------------------------------------------------------------ retirement

    def retiring(self) -> dict[int, float | None]:
        """Versions kept loaded for their grace period -> when it ends (None: not started)."""
        with self._retiring_lock:
            return {v: r.deadline for v, r in self._retiring.items()}

    def _retire_later(self, versions: Collection[int], reason: str, actor: str) -> list[Retirement]:
        with self._retiring_lock:
            added = []
            for version in sorted(versions):
                retirement = Retirement(version, reason, actor)
                self._retiring[version] = retirement
                added.append(retirement)
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
        deadline = self._clock() + self.settings.retire_grace_s
        with self._retiring_lock:
            for retirement in retirements:
                current = self._retiring.get(retirement.version)
                if current is retirement and current.deadline is None:
                    current.deadline = deadline

    def next_retirement_at(self) -> float | None:
        """When the earliest started grace period ends (the service's clock), if any."""
        with self._retiring_lock:
            deadlines = [r.deadline for r in self._retiring.values() if r.deadline is not None]
        return min(deadlines) if deadlines else None

    def retire_due(self) -> list[models_pb2.ModelEvent]:
        """Unload the retiring versions whose grace period is over; their UNPUBLISHED events.

        Triton then serves exactly the routing table plus the versions still in their grace
        period. On failure (``Unavailable``) they stay retiring and a later call tries again.
        """
        now = self._clock()
        with self._retiring_lock:
            due = {
                v: r
                for v, r in self._retiring.items()
                if r.deadline is not None and r.deadline <= now
            }
            waiting = {v for v, r in self._retiring.items() if v not in due}
        if not due:
            return []
        aliases = self._aliases()
        served = set(aliases.values())
        keep = sorted(served | waiting)
        if keep:
            views = {v: self.store.version(self.model_name, v) for v in keep}
            self.triton.write_config(keep, self._n_inputs(views))
            self.triton.load()
            ready = set(self.triton.ready_versions())
            if not served <= ready:
                raise Unavailable(
                    f"Triton serves {sorted(ready)} after unloading {sorted(due)} of "
                    f"{self.model_name}, not all of {sorted(served)}"
                )
        else:  # no alias left at all: nothing may serve
            self.triton.unload()
        with self._retiring_lock:
            for version, retirement in due.items():
                if self._retiring.get(version) is retirement:
                    del self._retiring[version]
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
    ) -> tuple[list[models_pb2.ModelEvent], list[Retirement]]:
        """Apply a new alias table: Triton serves old and new, then MLflow aliases, tags,
        history; the events. Versions that leave the table are retiring (still loaded)."""
        old = self._aliases()
        wanted = set(new.values())
        with self._retiring_lock:
            still_loaded = set(old.values()) | set(self._retiring)
        published = self._serve(wanted | still_loaded, still_loaded)
        published = [v for v in published if v in wanted]
        for name, target in new.items():
            if old.get(name) != target:
                self.store.set_alias(self.model_name, name, target)
        for name in old:
            if name not in new:
                self.store.delete_alias(self.model_name, name)
        for name, target in new.items():
            self._tag(target, **{TAG_STAGE: _stage_name(_STAGE_OF_ALIAS[name])})
        if alias in (CANARY, SHADOW) and version:
            self._tag(version, **{TAG_TRAFFIC: str(traffic_percent)})
        retired = sorted(set(old.values()) - set(new.values()))
        for gone in retired:
            self._tag(
                gone,
                **{
                    TAG_STAGE: _stage_name(Stage.MODEL_STAGE_ARCHIVED),
                    TAG_STAGE_REASON: archive_reason or reason,
                },
            )
        if history is not None:
            self.store.set_production_history(self.model_name, history)
        with self._retiring_lock:  # back in the table before its grace ended: stays loaded
            for back in wanted:
                self._retiring.pop(back, None)
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
        if not run_id:
            raise InvalidArgument("run_id", "is required")
        sha = artifact_sha256.strip().lower()
        if not _SHA256.match(sha):
            raise InvalidArgument("artifact_sha256", "must be 64 hexadecimal characters")
        if not 0 <= canary_traffic_percent <= 100:
            raise InvalidArgument("canary_traffic_percent", "must be between 0 and 100")
        run = self.store.run(run_id)
        if run.status != "FINISHED":
            raise FailedPrecondition(f"run {run_id} is {run.status}, not FINISHED")
        payload = self.store.download(run_id, rc.MODEL_ARTIFACT)
        actual = sha256_hex(payload)
        recorded = run.tags.get(rc.TAG_MODEL_SHA256, sha)
        if actual != sha or recorded != sha:
            raise IntegrityError(
                f"run {run_id}: model artifact sha256 {actual} does not match the declared "
                f"{sha} (run records {recorded}); refused, nothing registered"
            )
        try:
            existing = [v for v in self.store.versions(self.model_name) if v.run_id == run_id]
        except NotFound:
            existing = []
        if existing:  # a retried registration (the trainer crashed after the call)
            log.info("registration_repeated", run_id=run_id, version=existing[0].version)
            return Transition(self._proto(existing[0].version))
        try:
            feature_names = json.loads(run.tags[rc.TAG_FEATURE_NAMES])
            threshold = float(run.tags[rc.TAG_THRESHOLD])
        except (KeyError, ValueError) as exc:
            raise InvalidArgument(
                "run_id", f"run {run_id} lacks the model's feature names or threshold tags"
            ) from exc
        held_out = read_held_out_set(
            self.store.download(run_id, rc.TEST_SET_ARTIFACT), feature_names
        )
        candidate = evaluate_model(payload, held_out, threshold)  # also proves it loads

        self.store.ensure_model(self.model_name)
        view = self.store.create_version(
            self.model_name,
            run,
            {
                TAG_SHA256: sha,
                TAG_STAGE: _stage_name(Stage.MODEL_STAGE_CANDIDATE),
                TAG_THRESHOLD: repr(threshold),
                TAG_FEATURE_NAMES: json.dumps(feature_names),
            },
            description,
        )
        version = view.version
        log.info("version_registered", model=self.model_name, version=version, run_id=run_id)
        served_now = self.routing()
        events = [
            self._event(
                EventType.MODEL_EVENT_TYPE_REGISTERED, version, actor=actor, served=served_now
            )
        ]

        aliases = self._aliases()
        production_version = aliases.get(PRODUCTION, 0)
        production = None
        if production_version:
            production_view = self.store.version(self.model_name, production_version)
            production = evaluate_model(
                self._verified_artifact(production_view),
                held_out,
                float(production_view.tags.get(TAG_THRESHOLD, "0.5")),
            )
        decision = decide(self.policy, candidate, production, production_version)
        self._tag(version, **{TAG_GATE: decision.to_json()})
        log.info(
            "gate_decided",
            model=self.model_name,
            version=version,
            passed=decision.passed,
            reason=decision.reason,
        )
        if not decision.passed:
            self._tag(
                version,
                **{
                    TAG_STAGE: _stage_name(Stage.MODEL_STAGE_REJECTED),
                    TAG_STAGE_REASON: decision.reason,
                },
            )
            events.append(
                self._event(
                    EventType.MODEL_EVENT_TYPE_GATE_REJECTED,
                    version,
                    reason=decision.reason,
                    actor=actor,
                    gate=decision,
                    served=served_now,
                )
            )
            return Transition(self._proto(version), events)
        events.append(
            self._event(
                EventType.MODEL_EVENT_TYPE_GATE_PASSED,
                version,
                reason=decision.reason,
                actor=actor,
                gate=decision,
                served=served_now,
            )
        )
        if not production_version:
            moved, retiring = self._move_traffic(
                {**aliases, PRODUCTION: version},
                kind=EventType.MODEL_EVENT_TYPE_PROMOTED,
                version=version,
                alias=PRODUCTION,
                reason="first model: no production version to compare with",
                actor=actor,
                gate=decision,
                history=[version],
            )
        else:
            share = canary_traffic_percent or self.settings.default_canary_percent
            moved, retiring = self._move_traffic(
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
        return Transition(self._proto(version), events + moved, retiring)

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
            return Transition(self._proto(current), events, retiring)

        view = self.store.version(self.model_name, version)  # NotFound for unknown versions
        stage = _stage_value(view.tags.get(TAG_STAGE, ""))
        if stage == Stage.MODEL_STAGE_REJECTED:
            raise FailedPrecondition(
                f"v{version} was rejected by the evaluation gate "
                f"({view.tags.get(TAG_STAGE_REASON, '')}); it cannot serve"
            )
        if alias == PRODUCTION:
            current = aliases.get(PRODUCTION, 0)
            if current == version:
                return Transition(self._proto(version))
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
            return Transition(self._proto(version), events, retiring)

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
        return Transition(self._proto(version), events, retiring)

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
        return Transition(self._proto(previous), events, retiring)

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
        with self._retiring_lock:
            retiring = set(self._retiring)
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
            self._serve(keep, set())
            published = True
        n_inputs = self._n_inputs({v: self.store.version(self.model_name, v) for v in desired})
        reloaded = [v for v in desired if not self.triton.probe(v, n_inputs)]
        if reloaded:
            log.warning("triton_reloading", model=self.model_name, versions=reloaded)
            self.triton.unload()
            self.triton.load()
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
