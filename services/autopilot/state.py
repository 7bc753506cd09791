"""The loop's state: the cycle in progress, its steps with their evidence, the past cycles,
and the guardrails' memory. Persisted as one JSON file (written atomically), so a restarted
autopilot carries on where it stopped."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from services.shared.logging import get_logger

log = get_logger("autopilot.state")

# phases of a cycle (what `mlops loop status` shows)
WATCHING = "watching"
RETRAINING = "retraining"
GATING = "gating"
SHADOW = "shadow"
CANARY = "canary"
PROMOTED = "promoted"  # production, watched for a while before the cycle closes
PHASES = (WATCHING, RETRAINING, GATING, SHADOW, CANARY, PROMOTED)

# how a cycle ended
OUTCOME_PROMOTED = "promoted"
OUTCOME_ROLLED_BACK = "rolled_back"
OUTCOME_GATE_REJECTED = "rejected_by_gate"
OUTCOME_INCONCLUSIVE = "inconclusive"
OUTCOME_TRAINING_FAILED = "training_failed"
OUTCOME_SUPERSEDED = "superseded"

HISTORY_LIMIT = 100


@dataclass
class Step:
    """One transition of a cycle, with what justified it."""

    phase: str
    at: str  # ISO 8601, UTC
    summary: str
    evidence: dict[str, Any] = field(default_factory=dict)


@dataclass
class Cycle:
    cycle_id: str
    trigger: str  # drift | schedule | quality | registered (a training somebody else asked)
    started_at: str
    phase: str = RETRAINING
    trigger_evidence: dict[str, Any] = field(default_factory=dict)
    request_id: str = ""
    requested_at: str = ""
    candidate_version: int = 0
    production_version: int = 0  # production when the candidate entered shadow
    gate_passed: bool = False
    phase_started_at: str = ""
    looks: int = 0
    last_look_at: str = ""
    look_positives: int = 0  # labelled frauds at the shadow judge's last counted look
    attempts: int = 0  # trainings requested in this cycle
    retry_after: str = ""  # the gate had too little data then: train again on more labels
    retry_labels: float = 0.0  # outcomes labelled since the cycle began, at that moment
    baseline_health: dict[str, Any] = field(default_factory=dict)  # production during canary
    steps: list[Step] = field(default_factory=list)
    outcome: str = ""
    ended_at: str = ""

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Cycle:
        values = dict(data)
        values["steps"] = [Step(**s) for s in values.get("steps", [])]
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in values.items() if k in known})


@dataclass
class LoopEvent:
    """Something that happened to the loop itself (pause, resume, halt)."""

    kind: str
    at: str
    actor: str
    reason: str


@dataclass
class LoopState:
    cycle: Cycle | None = None
    history: list[Cycle] = field(default_factory=list)
    events: list[LoopEvent] = field(default_factory=list)
    paused: bool = False
    halted: bool = False
    consecutive_rollbacks: int = 0
    last_request_at: str = ""  # last RetrainRequest the loop sent
    last_training_at: str = ""  # last candidate registered (labels are counted since)
    production_version: int = 0
    # a drift event held back by a busy loop or the cooldown: acted on once the loop is free
    # (if it is still about production), so the shift's one event is not lost
    deferred: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> LoopState:
        data = json.loads(text)
        cycle = data.get("cycle")
        return cls(
            cycle=Cycle.from_dict(cycle) if cycle else None,
            history=[Cycle.from_dict(c) for c in data.get("history", [])],
            events=[LoopEvent(**e) for e in data.get("events", [])],
            paused=bool(data.get("paused", False)),
            halted=bool(data.get("halted", False)),
            consecutive_rollbacks=int(data.get("consecutive_rollbacks", 0)),
            last_request_at=str(data.get("last_request_at", "")),
            last_training_at=str(data.get("last_training_at", "")),
            production_version=int(data.get("production_version", 0)),
            deferred=dict(data.get("deferred") or {}),
        )


class StateFile:
    """The state on disk: written to a temporary file, then renamed over the old one."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def load(self) -> LoopState:
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return LoopState()
        try:
            return LoopState.from_json(text)
        except (ValueError, TypeError, KeyError) as exc:
            # kept aside for an operator to read; the loop starts from a clean state
            broken = self.path.with_suffix(".unreadable")
            os.replace(self.path, broken)
            log.error("state_unreadable", path=str(self.path), kept_as=str(broken), error=str(exc))
            return LoopState()

    def save(self, state: LoopState) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        temporary = self.path.with_suffix(".tmp")
        with open(temporary, "w") as handle:
            handle.write(state.to_json())
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, self.path)
