"""The autopilot's state machine, driven with fakes of its ports and a clock of its own."""

from __future__ import annotations

import logging
import math
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
from prometheus_client import REGISTRY

from services.autopilot.judges import OperationalPolicy, PairedPolicy, VersionHealth
from services.autopilot.loop import Autopilot, LoopPolicy, PairedData
from services.autopilot.state import StateFile
from services.shared.errors import Unavailable
from services.shared.proto.mlops.v1 import models_pb2, monitoring_pb2

EventType = models_pb2.ModelEventType
MODEL = "fraud_detector"


class Clock:
    def __init__(self) -> None:
        self.now = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


class FakeRegistry:
    def __init__(self) -> None:
        self.calls: list[tuple[str, str, int, int, str]] = []
        self.lineage: dict[int, str] = {}
        self.production = 1
        self.fail_next = False

    async def set_alias(
        self, alias: str, version: int, *, traffic_percent: int = 0, reason: str = ""
    ) -> None:
        if self.fail_next:
            self.fail_next = False
            raise Unavailable("registry down")
        self.calls.append(("set_alias", alias, version, traffic_percent, reason))
        if alias == "production":
            self.production = version

    async def rollback(self, reason: str) -> None:
        self.calls.append(("rollback", "production", 0, 0, reason))

    async def training_request_id(self, version: int) -> str:
        return self.lineage.get(version, "")

    async def production_version(self) -> int:
        return self.production


class FakeTraining:
    def __init__(self) -> None:
        self.sent: list[monitoring_pb2.RetrainRequest] = []

    async def send(self, request: monitoring_pb2.RetrainRequest) -> None:
        self.sent.append(request)


class FakeEvidence:
    def __init__(self) -> None:
        self.labels: float | None = 10_000
        self.pairs = PairedData([], [], [], [], [])
        self.candidate = VersionHealth()
        self.production = VersionHealth()
        self.quality: dict[str, float] | None = None
        self.traffic: VersionHealth | None = None
        self.health_asked: list[tuple[list[tuple[str, int]], datetime]] = []

    async def paired(self, baseline: int, candidate: int, limit: int) -> PairedData:
        return self.pairs

    async def live_quality(self, version: int) -> dict[str, float] | None:
        return self.quality

    async def new_labels_since(self, since: datetime) -> float | None:
        return self.labels

    async def health(self, versions: list[tuple[str, int]], since: datetime) -> list[VersionHealth]:
        self.health_asked.append((versions, since))
        if self.traffic is not None and versions[0][0] == "production" and len(versions) == 1:
            return [self.traffic]  # production's traffic, for the canary's share
        return [self.candidate if i == 0 else self.production for i, _ in enumerate(versions)]


POLICY = LoopPolicy(
    model_name=MODEL,
    cooldown_s=300,
    min_new_labels=100,
    training_timeout_s=600,
    max_consecutive_rollbacks=2,
    judge_interval_s=10,
    shadow_timeout_s=900,
    canary_timeout_s=600,
    watch_s=60,
    settle_s=0,
    paired=PairedPolicy(min_pairs=200, min_positives=10, max_looks=4, resamples=300),
    operational=OperationalPolicy(min_requests=100, min_duration_s=20, max_looks=10),
)


class Harness:
    def __init__(self, path: Path, policy: LoopPolicy = POLICY) -> None:
        self.clock = Clock()
        self.registry = FakeRegistry()
        self.training = FakeTraining()
        self.evidence = FakeEvidence()
        self.path = path
        self.policy = policy
        self.loop = self.build()

    def build(self) -> Autopilot:
        return Autopilot(
            self.policy,
            self.registry,
            self.training,
            self.evidence,
            StateFile(self.path),
            clock=self.clock,
        )


@pytest.fixture
def h(tmp_path: Path) -> Harness:
    return Harness(tmp_path / "state.json")


def _drift(version: int = 1, kind: str = "concept") -> monitoring_pb2.DriftEvent:
    event = monitoring_pb2.DriftEvent(
        event_id="d-1", detector="ADWIN", signal="error", model_name=MODEL, model_version=version
    )
    event.kind = kind
    return event


def _event(
    kind: int,
    version: int,
    *,
    actor: str = "training",
    served: dict[str, int] | None = None,
    reason: str = "",
) -> models_pb2.ModelEvent:
    table = served if served is not None else {"production": 1}
    event = models_pb2.ModelEvent(
        event_id=f"e-{kind}-{version}",
        type=kind,  # type: ignore[arg-type]
        model_name=MODEL,
        version=version,
        actor=actor,
        reason=reason,
        served=[models_pb2.ServedVersion(version=v, alias=a) for a, v in table.items()],
    )
    if kind in (EventType.MODEL_EVENT_TYPE_GATE_PASSED, EventType.MODEL_EVENT_TYPE_GATE_REJECTED):
        event.gate.CopyFrom(models_pb2.GateResult(passed=True, metric="pr_auc", baseline_version=1))
    return event


def _pairs(n: int, candidate_skill: float, seed: int = 0) -> PairedData:
    rng = np.random.default_rng(seed)
    labels = (rng.random(n) < 0.08).astype(float)
    production = 1 / (1 + np.exp(-(-3 + 1.0 * labels + rng.normal(0, 1, n))))
    candidate = 1 / (1 + np.exp(-(-3 + candidate_skill * labels + rng.normal(0, 1, n))))
    if candidate_skill == 0:
        candidate = np.full(n, 0.4)
    return PairedData(
        labels.tolist(),
        production.tolist(),
        candidate.tolist(),
        (production >= 0.25).tolist(),  # each version's decision at its threshold
        (candidate >= 0.25).tolist(),
    )


def _health(requests: float, errors: float = 0.0) -> VersionHealth:
    buckets = ((0.005, requests * 0.5), (0.01, requests * 0.96), (math.inf, requests))
    return VersionHealth(requests, errors, buckets, requests, 0, requests, 0)


async def _to_shadow(h: Harness) -> int:
    await h.loop.start()
    await h.loop.on_drift(_drift())
    request = h.training.sent[-1]
    h.registry.lineage[2] = request.request_id
    await h.loop.on_lifecycle(_event(EventType.MODEL_EVENT_TYPE_REGISTERED, 2))
    assert h.loop.phase == "gating"
    await h.loop.on_lifecycle(_event(EventType.MODEL_EVENT_TYPE_GATE_PASSED, 2, reason="gate ok"))
    return 2


async def test_drift_asks_for_one_training_with_its_evidence(h: Harness) -> None:
    await h.loop.start()
    await h.loop.on_drift(_drift())
    await h.loop.on_drift(_drift())  # a burst of detectors: still one request
    assert len(h.training.sent) == 1
    request = h.training.sent[0]
    assert request.reason == "drift" and request.requested_by == "autopilot"
    assert request.model_name == MODEL and request.drift.detector == "ADWIN"
    status = h.loop.status()
    assert status["state"] == "retraining"
    assert status["cycle"]["trigger_evidence"]["detector"] == "ADWIN"
    assert [t["outcome"] for t in status["recent_triggers"]] == ["requested", "busy"]


async def test_drift_about_another_version_is_not_a_trigger(h: Harness) -> None:
    await h.loop.start()
    await h.loop.on_drift(_drift(version=7))
    assert h.training.sent == []


async def test_guardrails_cooldown_and_new_labels(tmp_path: Path) -> None:
    h = Harness(tmp_path / "state.json", replace(POLICY, max_training_attempts=1))
    await _to_shadow(h)
    h.evidence.pairs = _pairs(2000, 0.0)
    h.clock.advance(11)
    await h.loop.tick()  # the constant candidate is worse, no training left: the cycle ends
    assert h.loop.phase == "watching"
    await h.loop.on_drift(_drift())
    assert len(h.training.sent) == 1
    assert h.loop.recent_triggers[-1]["outcome"] == "cooldown"
    h.clock.advance(POLICY.cooldown_s)
    h.evidence.labels = 20
    await h.loop.on_drift(_drift())
    assert len(h.training.sent) == 1
    assert h.loop.recent_triggers[-1]["outcome"] == "labels"
    h.evidence.labels = None  # Prometheus cannot say: no training on a guess
    await h.loop.on_drift(_drift())
    assert h.loop.recent_triggers[-1]["outcome"] == "labels_unknown"
    h.evidence.labels = 5000
    await h.loop.on_drift(_drift())
    assert len(h.training.sent) == 2


def _insufficient(version: int) -> models_pb2.ModelEvent:
    event = _event(EventType.MODEL_EVENT_TYPE_GATE_REJECTED, version, reason="3 frauds, needs 20")
    event.gate.passed = False
    event.gate.outcome = models_pb2.GATE_OUTCOME_INSUFFICIENT_DATA
    return event


async def test_a_gate_without_enough_data_gets_another_training_on_more_labels(
    h: Harness,
) -> None:
    await h.loop.start()
    await h.loop.on_drift(_drift())
    version = 2
    for attempt in range(1, POLICY.max_training_attempts + 1):
        assert len(h.training.sent) == attempt
        request = h.training.sent[-1]
        assert request.reason == "drift" and request.drift.detector == "ADWIN"  # the same shift
        h.registry.lineage[version] = request.request_id
        await h.loop.on_lifecycle(_event(EventType.MODEL_EVENT_TYPE_REGISTERED, version))
        assert h.loop.phase == "gating"
        labelled = 300 * 2**attempt  # outcomes labelled since the cycle began, by now
        h.evidence.labels = labelled
        await h.loop.on_lifecycle(_insufficient(version))
        if attempt == POLICY.max_training_attempts:
            break
        assert h.loop.phase == "retraining"
        h.evidence.labels = 2 * labelled - 1  # not yet twice as many
        h.clock.advance(POLICY.judge_interval_s + 1)
        await h.loop.tick()
        assert len(h.training.sent) == attempt
        h.evidence.labels = 2 * labelled
        h.clock.advance(POLICY.judge_interval_s + 1)
        await h.loop.tick()
        version += 1
    # the last allowed training's gate had too little data too: the cycle ends
    assert h.loop.phase == "watching"
    cycle = h.loop.history(1)[0]
    assert cycle["outcome"] == "rejected_by_gate" and cycle["attempts"] == 4
    assert len({r.request_id for r in h.training.sent}) == POLICY.max_training_attempts


async def test_a_drift_event_held_back_by_a_busy_loop_or_the_cooldown_is_not_lost(
    h: Harness,
) -> None:
    await h.loop.start()
    # a candidate somebody registered keeps the loop busy when the shift's event comes
    await h.loop.on_lifecycle(_event(EventType.MODEL_EVENT_TYPE_GATE_PASSED, 5))
    await h.loop.on_drift(_drift(kind="concept"))
    assert h.training.sent == [] and h.loop.status()["deferred"]["held_back"] == "busy"
    h.evidence.pairs = _pairs(2000, 0.0)
    h.clock.advance(11)
    await h.loop.tick()  # v5 is worse: withdrawn, the loop is free
    assert h.loop.phase == "watching"
    await h.loop.tick()
    assert len(h.training.sent) == 1 and h.training.sent[0].drift.kind == "concept"
    cycle = h.loop.state.cycle
    assert cycle is not None and cycle.trigger_evidence["deferred"]["held_back"] == "busy"
    assert not h.loop.state.deferred

    # the cooldown holds the next one back until it is over
    await h.loop.on_lifecycle(_insufficient(0))  # not this cycle's version: ignored
    h.registry.lineage[6] = h.training.sent[0].request_id
    await h.loop.on_lifecycle(_event(EventType.MODEL_EVENT_TYPE_REGISTERED, 6))
    cycle.attempts = POLICY.max_training_attempts  # its last training: a rejection ends it
    rejected = _event(EventType.MODEL_EVENT_TYPE_GATE_REJECTED, 6, reason="not better")
    await h.loop.on_lifecycle(rejected)
    assert h.loop.phase == "watching"
    await h.loop.on_drift(_drift(kind="data"))
    assert h.loop.state.deferred["held_back"] == "cooldown"
    h.clock.advance(POLICY.cooldown_s / 2)
    await h.loop.tick()
    assert len(h.training.sent) == 1
    h.clock.advance(POLICY.cooldown_s / 2 + 1)
    await h.loop.tick()
    assert len(h.training.sent) == 2 and h.training.sent[1].drift.kind == "data"


async def test_a_held_back_drift_event_from_before_a_long_stop_is_dropped(h: Harness) -> None:
    """The stack went down during the cooldown and came back the next day: yesterday's
    held-back event is not today's trigger."""
    await h.loop.start()
    h.loop.state.last_request_at = h.clock().isoformat()  # a training just asked: cooldown
    await h.loop.on_drift(_drift(kind="data"))
    assert h.loop.state.deferred["held_back"] == "cooldown"
    h.clock.advance(22 * 3600)
    restarted = h.build()  # the state file, read again after the stop
    await restarted.start()
    await restarted.tick()
    assert h.training.sent == [] and not restarted.state.deferred
    assert restarted.recent_triggers[-1]["outcome"] == "expired"
    assert restarted.phase == "watching"


async def test_a_held_back_drift_event_about_a_replaced_version_is_dropped(h: Harness) -> None:
    await h.loop.start()
    await h.loop.on_lifecycle(_event(EventType.MODEL_EVENT_TYPE_GATE_PASSED, 5))
    await h.loop.on_drift(_drift(version=1))
    assert h.loop.state.deferred
    # an operator promotes v5 meanwhile: the event about v1 no longer says anything
    await h.loop.on_lifecycle(
        _event(EventType.MODEL_EVENT_TYPE_ALIAS_SET, 5, actor="ops", served={"production": 5})
    )
    assert h.loop.phase == "watching"
    await h.loop.tick()
    assert h.training.sent == [] and not h.loop.state.deferred


async def test_a_better_candidate_goes_shadow_canary_production(h: Harness) -> None:
    version = await _to_shadow(h)
    assert h.registry.calls[-1][:4] == ("set_alias", "shadow", version, 100)
    assert "autopilot cycle" in h.registry.calls[-1][4]

    h.evidence.pairs = _pairs(100, 4.0)  # labels are still arriving
    h.clock.advance(11)
    await h.loop.tick()
    assert h.loop.phase == "shadow"
    assert "insufficient data" in h.loop.state.cycle.steps[-1].summary  # type: ignore[union-attr]
    assert h.loop.state.cycle.looks == 0  # type: ignore[union-attr]

    h.evidence.pairs = _pairs(3000, 4.0)
    h.clock.advance(5)
    await h.loop.tick()  # within the judge interval: no look
    assert h.loop.phase == "shadow"
    h.clock.advance(6)
    await h.loop.tick()
    assert h.loop.phase == "canary"
    call = h.registry.calls[-1]
    assert call[:4] == ("set_alias", "canary", version, POLICY.canary_percent)
    assert "better" in call[4] and "pairs" in call[4]

    h.evidence.candidate, h.evidence.production = _health(50), _health(500)
    h.clock.advance(11)
    await h.loop.tick()
    assert h.loop.phase == "canary"  # too few canary answers: insufficient data
    h.evidence.candidate, h.evidence.production = _health(300), _health(3000)
    h.clock.advance(11)
    await h.loop.tick()
    assert h.loop.phase == "promoted"
    assert h.registry.calls[-1][:3] == ("set_alias", "production", version)
    assert "shadow" in h.registry.calls[-1][4] and "canary" in h.registry.calls[-1][4]

    h.evidence.candidate = _health(3000)
    h.clock.advance(POLICY.watch_s + 1)
    await h.loop.tick()
    assert h.loop.phase == "watching"
    cycle = h.loop.history(1)[0]
    assert cycle["outcome"] == "promoted"
    phases = [s["phase"] for s in cycle["steps"]]
    assert phases[:4] == ["retraining", "gating", "gating", "shadow"]
    assert {"canary", "promoted"} <= set(phases) and phases[-1] == "promoted"
    shadow_step = next(s for s in cycle["steps"] if s["phase"] == "canary")
    evidence = shadow_step["evidence"]["shadow"]
    assert evidence["outcome"] == "better" and evidence["n"] == 3000
    assert evidence["interval"][0] > 0
    assert h.loop.state.production_version == version


@pytest.mark.parametrize(
    ("answers", "share"),
    [
        (0, 10),  # production's traffic unknown: the least share
        (11 * 2, 50),  # 2 answers/s: 100 canary answers in 30 s would need 167 %: capped
        (11 * 20, 17),  # 20/s: 100 answers in 30 s need 16.7 % of it
        (11 * 200, 10),  # 200/s: the least share already gives them in 5 s
    ],
)
async def test_the_canary_share_is_sized_for_its_minimum_sample(
    h: Harness, answers: int, share: int
) -> None:
    version = await _to_shadow(h)
    shadow_started = h.clock()
    h.evidence.traffic = _health(answers) if answers else None
    h.evidence.pairs = _pairs(3000, 4.0)
    h.clock.advance(11)
    await h.loop.tick()
    assert h.loop.phase == "canary"
    assert h.registry.calls[-1][:4] == ("set_alias", "canary", version, share)
    asked = [a for a in h.evidence.health_asked if len(a[0]) == 1]
    assert asked == [([("production", 1)], shadow_started)]  # over the shadow phase
    if answers:
        assert "answers in about" in h.registry.calls[-1][4]


async def test_a_fixed_canary_share_asks_nothing(tmp_path: Path) -> None:
    h = Harness(tmp_path / "state.json", replace(POLICY, canary_max_percent=10))
    version = await _to_shadow(h)
    h.evidence.traffic = _health(22)
    h.evidence.pairs = _pairs(3000, 4.0)
    h.clock.advance(11)
    await h.loop.tick()
    assert h.registry.calls[-1][:4] == ("set_alias", "canary", version, 10)
    assert h.evidence.health_asked == []


async def test_shadow_looks_are_spaced_by_new_labelled_frauds(h: Harness) -> None:
    await _to_shadow(h)
    h.evidence.pairs = _pairs(3000, 1.0)  # as good as production: undecided
    h.clock.advance(11)
    await h.loop.tick()
    cycle = h.loop.state.cycle
    assert cycle is not None and cycle.looks == 1
    frauds = cycle.look_positives
    assert frauds == int(sum(h.evidence.pairs.labels))
    steps = len(cycle.steps)
    for _ in range(10):  # the judge's clock runs, but no new fraud is labelled: no look
        h.clock.advance(11)
        await h.loop.tick()
    assert cycle.looks == 1 and len(cycle.steps) == steps and h.loop.phase == "shadow"
    h.evidence.pairs = _pairs(3000 + 100, 1.0, seed=1)
    assert sum(h.evidence.pairs.labels) >= frauds + POLICY.paired.look_new_positives
    h.clock.advance(11)
    await h.loop.tick()
    assert cycle.looks == 2


async def test_a_worse_candidate_is_withdrawn_and_repeated_rollbacks_halt(
    h: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    await h.loop.start()
    # a training somebody else asked for: judged all the same
    await h.loop.on_lifecycle(_event(EventType.MODEL_EVENT_TYPE_GATE_PASSED, 5))
    assert h.loop.phase == "shadow" and h.loop.state.cycle.trigger == "registered"  # type: ignore[union-attr]
    h.evidence.pairs = _pairs(2000, 0.0)
    h.clock.advance(11)
    await h.loop.tick()
    assert h.registry.calls[-1][:3] == ("set_alias", "shadow", 0)
    assert "worse" in h.registry.calls[-1][4]
    assert h.loop.history(1)[0]["outcome"] == "rolled_back"
    assert h.loop.state.consecutive_rollbacks == 1 and not h.loop.state.halted

    await h.loop.on_lifecycle(_event(EventType.MODEL_EVENT_TYPE_GATE_PASSED, 6))
    h.clock.advance(11)
    with caplog.at_level(logging.ERROR, logger="mlops.autopilot"):
        await h.loop.tick()
    assert h.loop.state.halted
    # it says so: the state, an event with the reason, the gauge, an error log line
    assert h.loop.status()["state"] == "halted"
    assert h.loop.state.events[-1].kind == "halted"
    assert "2 consecutive automatic rollbacks" in h.loop.state.events[-1].reason
    assert REGISTRY.get_sample_value("mlops_autopilot_halted") == 1
    assert REGISTRY.get_sample_value("mlops_autopilot_consecutive_rollbacks") == 2
    assert any("loop_halted" in r.getMessage() for r in caplog.records)
    # halted: no triggers, no adoption
    h.clock.advance(10_000)
    await h.loop.on_drift(_drift())
    await h.loop.on_lifecycle(_event(EventType.MODEL_EVENT_TYPE_GATE_PASSED, 7))
    assert h.training.sent == [] and h.loop.phase == "watching"
    h.loop.resume("ops", "fixed the labels")
    assert not h.loop.state.halted and h.loop.state.consecutive_rollbacks == 0
    await h.loop.on_drift(_drift())
    assert len(h.training.sent) == 1


async def test_a_drift_candidate_withdrawn_in_shadow_gets_another_training(h: Harness) -> None:
    """A drift cycle's first candidate is worse on live traffic: the shadow is removed and
    the loop trains again on what was labelled since, within the cycle's trainings."""
    first = await _to_shadow(h)
    h.evidence.pairs = _pairs(2000, 0.0)
    h.clock.advance(11)
    await h.loop.tick()
    assert h.registry.calls[-1][:3] == ("set_alias", "shadow", 0)
    cycle = h.loop.state.cycle
    assert cycle is not None and h.loop.phase == "retraining" and cycle.candidate_version == 0
    assert f"v{first} withdrawn, training again" in cycle.steps[-1].summary
    assert cycle.steps[-1].evidence["shadow"]["outcome"] == "worse"
    assert h.loop.state.consecutive_rollbacks == 0  # the cycle goes on
    h.clock.advance(11)
    await h.loop.tick()
    assert len(h.training.sent) == 2 and cycle.attempts == 2
    second = h.training.sent[-1]
    assert second.request_id != h.training.sent[0].request_id
    h.registry.lineage[3] = second.request_id
    await h.loop.on_lifecycle(_event(EventType.MODEL_EVENT_TYPE_GATE_PASSED, 3))
    assert h.loop.phase == "shadow" and h.registry.calls[-1][:3] == ("set_alias", "shadow", 3)
    h.evidence.pairs = _pairs(3000, 4.0)
    h.clock.advance(11)
    await h.loop.tick()
    assert h.loop.phase == "canary" and h.registry.calls[-1][:3] == ("set_alias", "canary", 3)


async def test_a_drift_cycle_out_of_trainings_ends_when_shadow_withdraws(tmp_path: Path) -> None:
    h = Harness(tmp_path / "state.json", replace(POLICY, max_training_attempts=1))
    await _to_shadow(h)
    h.evidence.pairs = _pairs(2000, 0.0)
    h.clock.advance(11)
    await h.loop.tick()
    assert h.loop.phase == "watching" and h.loop.history(1)[0]["outcome"] == "rolled_back"
    assert len(h.training.sent) == 1


async def test_a_concept_drift_candidate_must_decline_more_frauds(h: Harness) -> None:
    """Ranked better and fewer false declines, but the same frauds declined: for a cycle
    answering a concept shift that is not better (the judge keeps looking)."""
    await _to_shadow(h)
    pairs = _pairs(3000, 4.0)
    labels = np.asarray(pairs.labels)
    production_flags = np.asarray(pairs.baseline_flagged)
    candidate_flags = production_flags & (labels == 1)  # its frauds: production's, no more
    h.evidence.pairs = replace(pairs, candidate_flagged=candidate_flags.tolist())
    h.clock.advance(11)
    await h.loop.tick()
    assert h.loop.phase == "shadow"
    verdict = h.loop.state.cycle.steps[-1].evidence["shadow"]  # type: ignore[union-attr]
    assert verdict["outcome"] == "undecided" and verdict["interval"][0] > 0
    assert verdict["decisions"]["p_fpr_lower"] < 0.01
    assert "higher recall" in verdict["test"]


async def test_a_canary_with_more_errors_is_rolled_back(h: Harness) -> None:
    await _to_shadow(h)
    h.evidence.pairs = _pairs(3000, 4.0)
    h.clock.advance(11)
    await h.loop.tick()
    assert h.loop.phase == "canary"
    h.evidence.candidate, h.evidence.production = _health(300, errors=40), _health(3000, 1)
    h.clock.advance(25)
    await h.loop.tick()
    assert h.loop.phase == "watching"
    assert h.registry.calls[-1][:3] == ("set_alias", "canary", 0)
    cycle = h.loop.history(1)[0]
    assert cycle["outcome"] == "rolled_back"
    checks = cycle["steps"][-1]["evidence"]["canary"]["checks"]
    errors = next(c for c in checks if c["name"] == "errors")
    assert errors["outcome"] == "fail" and errors["p_value"] < 0.001


async def test_production_degrading_after_promotion_is_rolled_back(h: Harness) -> None:
    await _to_shadow(h)
    h.evidence.pairs = _pairs(3000, 4.0)
    h.clock.advance(11)
    await h.loop.tick()
    h.evidence.candidate, h.evidence.production = _health(300), _health(3000)
    h.clock.advance(25)
    await h.loop.tick()
    assert h.loop.phase == "promoted"
    h.evidence.candidate = _health(3000, errors=300)
    h.clock.advance(11)
    await h.loop.tick()  # the watch, too, needs its minimum duration
    assert h.loop.phase == "promoted"
    h.clock.advance(11)
    await h.loop.tick()
    assert h.registry.calls[-1][0] == "rollback"
    assert "degraded after its promotion" in h.registry.calls[-1][4]
    assert h.loop.history(1)[0]["outcome"] == "rolled_back"
    assert h.loop.state.production_version == 1


def _slow(requests: float) -> VersionHealth:
    """Answers mostly slower than ``_health``'s p95 bucket (a loaded machine, or a slow model)."""
    buckets = ((0.005, requests * 0.1), (0.01, requests * 0.5), (math.inf, requests))
    return VersionHealth(requests, 0, buckets, requests, 0, requests, 0)


async def test_the_watch_leaves_latency_to_the_canary(h: Harness) -> None:
    await _to_shadow(h)
    h.evidence.pairs = _pairs(3000, 4.0)
    h.clock.advance(11)
    await h.loop.tick()
    h.evidence.candidate, h.evidence.production = _health(300), _health(3000)
    h.clock.advance(25)
    await h.loop.tick()
    assert h.loop.phase == "promoted"
    # after the switch the whole machine is slower: another period than the baseline's
    h.evidence.candidate = _slow(3000)
    h.clock.advance(POLICY.watch_s + 1)
    await h.loop.tick()
    cycle = h.loop.history(1)[0]
    assert cycle["outcome"] == "promoted", cycle["steps"][-1]
    watch = cycle["steps"][-1]["evidence"]["watch"]
    assert [c["name"] for c in watch["checks"]] == ["errors", "degraded", "triton"]


async def test_a_canary_slower_than_production_over_the_same_seconds_fails(h: Harness) -> None:
    await _to_shadow(h)
    h.evidence.pairs = _pairs(3000, 4.0)
    h.clock.advance(11)
    await h.loop.tick()
    h.evidence.candidate, h.evidence.production = _slow(300), _health(3000)
    h.clock.advance(25)
    await h.loop.tick()
    assert h.loop.phase == "watching"
    cycle = h.loop.history(1)[0]
    assert cycle["outcome"] == "rolled_back" and "latency" in cycle["steps"][-1]["summary"]


async def test_pause_stops_every_action_and_is_recorded(h: Harness) -> None:
    await _to_shadow(h)
    h.loop.pause("ops", "investigating")
    h.evidence.pairs = _pairs(3000, 4.0)
    h.clock.advance(11)
    await h.loop.tick()
    assert h.loop.phase == "shadow" and h.loop.status()["state"] == "paused"
    await h.loop.on_drift(_drift())
    assert len(h.training.sent) == 1
    event = h.loop.state.events[-1]
    assert (event.kind, event.actor, event.reason) == ("paused", "ops", "investigating")
    h.loop.resume("ops")
    await h.loop.tick()
    assert h.loop.phase == "canary"


async def test_state_survives_a_restart(h: Harness) -> None:
    version = await _to_shadow(h)
    h.loop.pause("ops")
    restarted = h.build()
    assert restarted.phase == "shadow" and restarted.state.paused
    assert restarted.state.cycle.candidate_version == version  # type: ignore[union-attr]
    restarted.resume("ops")
    h.evidence.pairs = _pairs(3000, 4.0)
    h.clock.advance(11)
    await restarted.tick()
    assert restarted.phase == "canary"


async def test_an_operator_moving_traffic_supersedes_the_cycle(h: Harness) -> None:
    await _to_shadow(h)
    await h.loop.on_lifecycle(
        _event(EventType.MODEL_EVENT_TYPE_ALIAS_SET, 0, actor="cli:ops", served={"production": 1})
    )
    assert h.loop.phase == "watching"
    assert h.loop.history(1)[0]["outcome"] == "superseded"
    # the loop's own changes are not mistaken for an operator's
    await _to_shadow_again(h)


async def _to_shadow_again(h: Harness) -> None:
    await h.loop.on_lifecycle(_event(EventType.MODEL_EVENT_TYPE_GATE_PASSED, 9))
    await h.loop.on_lifecycle(
        _event(
            EventType.MODEL_EVENT_TYPE_ALIAS_SET,
            9,
            actor="autopilot",
            served={"production": 1, "shadow": 9},
        )
    )
    assert h.loop.phase == "shadow"


async def test_the_first_model_is_not_judged(h: Harness) -> None:
    first = _event(EventType.MODEL_EVENT_TYPE_GATE_PASSED, 1, served={})
    first.gate.baseline_version = 0
    await h.loop.on_lifecycle(first)
    assert h.loop.phase == "watching" and h.registry.calls == []


async def test_a_training_that_never_registers_is_asked_again_then_times_out(
    h: Harness,
) -> None:
    await h.loop.start()
    await h.loop.on_drift(_drift())
    for attempt in range(1, POLICY.max_training_attempts):
        h.evidence.labels = 1000 * 2**attempt
        h.clock.advance(POLICY.training_timeout_s + 1)
        await h.loop.tick()  # no candidate: the training failed; wait for more labels
        assert h.loop.phase == "retraining" and len(h.training.sent) == attempt
        h.evidence.labels = 2000 * 2**attempt
        h.clock.advance(POLICY.judge_interval_s + 1)
        await h.loop.tick()
        assert len(h.training.sent) == attempt + 1
    h.clock.advance(POLICY.training_timeout_s + 1)
    await h.loop.tick()
    assert h.loop.history(1)[0]["outcome"] == "training_failed"


def _failed(request_id: str, code: str = "failed_precondition") -> monitoring_pb2.TrainingResult:
    return monitoring_pb2.TrainingResult(
        request_id=request_id,
        model_name=POLICY.model_name,
        status=monitoring_pb2.TRAINING_STATUS_FAILED,
        error_code=code,
        error="3 labelled transactions (0 frauds) since the drift onset: too few",
    )


async def test_a_failed_training_is_acted_on_at_once_not_after_the_timeout(h: Harness) -> None:
    await h.loop.start()
    await h.loop.on_drift(_drift())
    first = h.training.sent[-1].request_id
    # another request's result, or a success, changes nothing
    await h.loop.on_training_result(_failed("someone-else"))
    await h.loop.on_training_result(
        monitoring_pb2.TrainingResult(
            request_id=first, status=monitoring_pb2.TRAINING_STATUS_TRAINED, version=9
        )
    )
    assert h.loop.state.cycle is not None and not h.loop.state.cycle.retry_after
    await h.loop.on_training_result(_failed(first))
    cycle = h.loop.state.cycle
    assert cycle is not None and cycle.retry_after  # waits for more labels, no timeout
    assert "failed (failed_precondition)" in cycle.steps[-1].summary
    assert cycle.steps[-1].evidence["error_code"] == "failed_precondition"
    h.evidence.labels = 100 * h.evidence.labels  # type: ignore[operator]
    h.clock.advance(POLICY.judge_interval_s + 1)
    await h.loop.tick()
    assert len(h.training.sent) == 2 and h.training.sent[-1].request_id != first
    for _ in range(POLICY.max_training_attempts - 2):
        await h.loop.on_training_result(_failed(h.training.sent[-1].request_id))
        h.evidence.labels = 100 * h.evidence.labels  # type: ignore[operator]
        h.clock.advance(POLICY.judge_interval_s + 1)
        await h.loop.tick()
    assert len(h.training.sent) == POLICY.max_training_attempts
    await h.loop.on_training_result(_failed(h.training.sent[-1].request_id, "internal"))
    assert h.loop.phase == "watching"
    last = h.loop.history(1)[0]
    assert last["outcome"] == "training_failed" and "(internal)" in last["steps"][-1]["summary"]


async def test_a_drift_training_waits_for_outcomes_labelled_after_the_onset(h: Harness) -> None:
    await h.loop.start()
    event = _drift()
    event.onset_at.FromDatetime(h.clock.now - timedelta(seconds=20))
    h.evidence.labels = POLICY.min_new_labels - 1  # (the fake counts the same for any since)
    await h.loop.on_drift(event)
    assert h.training.sent == [] and h.loop.state.deferred["held_back"] == "onset_labels"
    h.clock.advance(POLICY.judge_interval_s + 1)
    await h.loop.tick()
    assert h.training.sent == []
    h.evidence.labels = POLICY.min_new_labels
    h.clock.advance(POLICY.judge_interval_s + 1)
    await h.loop.tick()
    assert len(h.training.sent) == 1
    assert h.training.sent[0].drift.onset_at == event.onset_at


async def test_a_gate_rejection_ends_the_cycle_with_the_gate_evidence(h: Harness) -> None:
    await h.loop.start()
    await h.loop.on_drift(_drift())
    h.registry.lineage[2] = h.training.sent[-1].request_id
    await h.loop.on_lifecycle(_event(EventType.MODEL_EVENT_TYPE_REGISTERED, 2))
    cycle_state = h.loop.state.cycle
    assert cycle_state is not None
    cycle_state.attempts = POLICY.max_training_attempts  # the last training the cycle may ask
    await h.loop.on_lifecycle(_rejected(2, low=-0.0004, high=0.0))
    cycle = h.loop.history(1)[0]
    assert cycle["outcome"] == "rejected_by_gate" and len(h.training.sent) == 1
    assert cycle["steps"][-1]["evidence"]["gate"]["metric"] == "pr_auc"


def _rejected(version: int, *, low: float, high: float) -> models_pb2.ModelEvent:
    event = _event(EventType.MODEL_EVENT_TYPE_GATE_REJECTED, version, reason="not shown better")
    event.gate.CopyFrom(
        models_pb2.GateResult(
            passed=False,
            metric="pr_auc",
            outcome=models_pb2.GATE_OUTCOME_FAILED,
            test="paired bootstrap",
            interval_low=low,
            interval_high=high,
            margin=0.0,
        )
    )
    return event


@pytest.mark.parametrize(
    ("low", "high"),
    [(-0.043, 0.057), (-0.229, -0.016)],
    ids=["undecided", "worse"],
)
async def test_a_rejected_candidate_gets_another_training_within_the_split_error_budget(
    h: Harness, low: float, high: float
) -> None:
    await h.loop.start()
    await h.loop.on_drift(_drift())
    first = h.training.sent[-1]
    # every request tells the gate how many tests the cycle may spend
    assert first.gate_tests == POLICY.max_training_attempts
    h.registry.lineage[2] = first.request_id
    await h.loop.on_lifecycle(_event(EventType.MODEL_EVENT_TYPE_REGISTERED, 2))
    h.evidence.labels = 600
    # trained and judged on the shift's first minute: undecided, or even worse than v1
    await h.loop.on_lifecycle(_rejected(2, low=low, high=high))
    assert h.loop.phase == "retraining"
    assert "rejected v2" in h.loop.status()["cycle"]["steps"][-1]["summary"]
    h.evidence.labels = 1200  # twice the outcomes labelled since the cycle began
    h.clock.advance(POLICY.judge_interval_s + 1)
    await h.loop.tick()
    assert len(h.training.sent) == 2
    second = h.training.sent[-1]
    assert second.gate_tests == POLICY.max_training_attempts
    assert second.drift.detector == first.drift.detector  # the same shift
    h.registry.lineage[3] = second.request_id
    await h.loop.on_lifecycle(_event(EventType.MODEL_EVENT_TYPE_REGISTERED, 3))
    await h.loop.on_lifecycle(_event(EventType.MODEL_EVENT_TYPE_GATE_PASSED, 3, reason="better"))
    assert h.loop.phase == "shadow"


async def test_a_failed_registry_call_is_retried_on_the_next_tick(h: Harness) -> None:
    await h.loop.start()
    h.registry.fail_next = True
    await h.loop.on_lifecycle(_event(EventType.MODEL_EVENT_TYPE_GATE_PASSED, 3))
    assert h.loop.phase == "gating"
    await h.loop.tick()
    assert h.loop.phase == "shadow"


async def test_schedule_and_quality_floor_trigger(tmp_path: Path) -> None:
    policy = LoopPolicy(
        model_name=MODEL,
        schedule_interval_s=3600,
        quality_floor=0.5,
        quality_min_labelled=100,
        cooldown_s=0,
        min_new_labels=0,
    )
    h = Harness(tmp_path / "s.json", policy)
    await h.loop.start()
    h.evidence.quality = {"pr_auc": 0.3, "n_labelled": 50}
    await h.loop.tick()  # too few labels for the floor to count; the schedule starts counting
    assert h.training.sent == []
    h.clock.advance(61)
    h.evidence.quality = {"pr_auc": 0.3, "n_labelled": 500}
    await h.loop.tick()
    assert [r.reason for r in h.training.sent] == ["quality"]
    h.loop.state.cycle = None
    h.clock.advance(3601)
    await h.loop.tick()
    assert [r.reason for r in h.training.sent] == ["quality", "schedule"]
