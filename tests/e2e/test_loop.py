"""The closed loop on the real local stack, with no human step.

One stack (`mlops stack up` on free ports, `mlops bootstrap` for production v1, the loop's
timings shortened: ``loop_harness.FAST_LOOP``) serves the tests of this module, in order:

- a deliberately bad candidate (a constant probability, registered through the registry's
  normal path with a held-out set it looks good on) passes the gate, goes to shadow, is judged
  worse on the live transactions both versions scored, and is withdrawn: it never answers a
  single Predict call, let alone more than the canary share;
- the whole loop: the simulator's fraud pattern changes, and with no human step monitoring
  raises a concept drift event, the autopilot asks for a retraining, the candidate passes the
  gate with its interval, is proven in shadow and canary, and answers 100 % of Predict calls;
  no Predict call fails, and the new version catches more of the new pattern's frauds than v1
  did while declining few legitimate payments.

What FAST_LOOP shortens (labels after ~5 s instead of 120 s, a concept baseline of 1,000
outcomes, smaller shadow and canary samples) changes how long the loop takes, not the
statistics it decides with: every judge keeps its stated alpha and "insufficient data" state
(``loadtests/bench_loop.py`` measures the loop at the default label delay).
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from typing import Any

import pytest
from loop_harness import (
    FAST_LOOP,
    LoopStack,
    constant_candidate,
    lifecycle_events,
    run_traffic,
)

from services.shared.proto.mlops.v1 import models_pb2

EventType = models_pb2.ModelEventType


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LoopStack]:
    running = LoopStack(tmp_path_factory.mktemp("loop") / "var", FAST_LOOP)
    try:
        running.up()
        running.bootstrap()
        yield running
    finally:
        running.down()


def _ended(stack: LoopStack, version: int) -> bool:
    cycle = stack.cycle_of(version)
    return cycle is not None and bool(cycle["outcome"])


@pytest.mark.timeout(900)  # with the module stack's start and bootstrap (a loaded machine)
async def test_a_bad_candidate_is_withdrawn_before_it_answers(stack: LoopStack) -> None:
    bad = constant_candidate(stack)
    assert bad.gate.passed, f"the crafted candidate should pass the gate: {bad.gate.reason}"

    run = await run_traffic(stack, lambda: _ended(stack, bad.version), timeout_s=300)

    cycle = stack.cycle_of(bad.version)
    assert cycle is not None, f"the loop never adopted v{bad.version}: {stack.loop_status()}"
    assert cycle["outcome"] == "rolled_back", cycle
    shadow = cycle["steps"][-1]["evidence"].get("shadow")
    assert shadow is not None, f"withdrawn after shadow, not later: {cycle['steps'][-1]}"
    assert shadow["outcome"] == "worse" and shadow["metric"] == "pr_auc"
    assert shadow["interval"][1] < 0 and shadow["n"] >= 200 and shadow["positives"] >= 10
    # it never answered a caller; nothing failed meanwhile
    outcomes = run.traffic.outcomes
    assert len(outcomes) > 300
    assert run.traffic.failed == []
    assert {o.version for o in outcomes} == {1}
    # the registry's record: shadow set and removed by the autopilot, with the evidence
    events = [e for e in await lifecycle_events(stack.kafka) if e.actor == "autopilot"]
    moves = [(e.alias, e.version) for e in events if e.type == EventType.MODEL_EVENT_TYPE_ALIAS_SET]
    assert moves == [("shadow", bad.version), ("shadow", 0)]
    assert "worse" in events[-1].reason and "pairs" in events[-1].reason
    every = await lifecycle_events(stack.kafka)
    for event in every:
        for served in event.served:
            if served.version == bad.version:
                assert served.alias == "shadow", f"v{bad.version} got {served.alias}"
    history = stack.mlops("loop", "history")
    assert history.returncode == 0 and "rolled_back" in history.stdout


# the new fraud pattern starts this far into the traffic: v1's concept baseline (1,000
# labelled outcomes at 20 transactions/s) is complete by then, and v1 answers for a while
# before and after the change
SHIFT_AT_S = 90.0
# traffic after the promotion, for the new version's recall on the new pattern
AFTER_PROMOTION_S = 60.0


@pytest.mark.timeout(1500)
async def test_a_concept_shift_ends_with_a_better_model_on_all_traffic(stack: LoopStack) -> None:
    before = {c["cycle_id"] for c in stack.loop_history()}
    promoted_at: list[float] = []

    def drift_cycle() -> dict[str, Any] | None:
        return next(
            (c for c in stack.loop_history()
             if c["cycle_id"] not in before and c["trigger"] == "drift"),
            None,
        )  # fmt: skip

    def done() -> bool:
        cycle = drift_cycle()
        if cycle is None or not cycle["steps"]:
            return False
        if not promoted_at and any(s["phase"] == "promoted" for s in cycle["steps"]):
            promoted_at.append(time.monotonic())
        if cycle["outcome"] and cycle["outcome"] != "promoted":
            return True  # the assertions below say what happened
        return bool(promoted_at) and time.monotonic() - promoted_at[0] >= AFTER_PROMOTION_S

    run = await run_traffic(stack, done, concept_drift_at=SHIFT_AT_S, timeout_s=1200)

    cycle = drift_cycle()
    assert cycle is not None, f"no drift-triggered cycle: {stack.loop_status()}"
    steps = cycle["steps"]
    story = [f"{s['phase']}: {s['summary'][:100]}" for s in steps]
    assert promoted_at, f"not promoted ({cycle['outcome']}): {story}"
    # each step, from the drift event on, with its evidence
    phases = [s["phase"] for s in steps]
    for phase in ("retraining", "gating", "shadow", "canary", "promoted"):
        assert phase in phases, f"no {phase} step: {story}"
    assert steps[0]["phase"] == "retraining" and "drift" in steps[0]["summary"], story
    # the gate of the candidate that went on (an earlier training's gate may have found too
    # little post-onset data: "insufficient data", and the autopilot trained again)
    gate = [
        s["evidence"]["gate"]
        for s in steps
        if s["phase"] == "gating" and "passed the gate" in s["summary"]
    ][-1]
    assert gate.get("passed") and gate["test"] and int(gate["rows"]) > 0, gate
    assert float(gate["interval_low"]) <= float(gate["statistic"]) <= float(gate["interval_high"])
    # the paired verdict that moved the candidate from shadow to canary
    shadow = next(
        s["evidence"]["shadow"]
        for s in steps
        if s["phase"] == "canary" and "shadow" in s["evidence"]
    )
    assert shadow["outcome"] == "better" and shadow["interval"][0] > 0, shadow

    new = int(cycle["candidate_version"])
    outcomes = run.traffic.outcomes
    assert run.traffic.failed == [], run.traffic.failed[:5]
    # after the promotion (and the serving's switch) the new version answers every call
    settled = promoted_at[0] + 10.0
    last = [o for o in outcomes if o.sent_at >= settled]
    assert len(last) > 200 and {o.version for o in last} == {new}
    # the new pattern: v1 on it (after the shift, before the new version answered) against
    # the new version after the promotion
    shift = run.started + SHIFT_AT_S

    def caught(version: int, since: float, until: float) -> tuple[float, float, int]:
        chosen = [o for o in outcomes if o.version == version and since <= o.sent_at < until]
        frauds = [o for o in chosen if o.is_fraud]
        legit = [o for o in chosen if not o.is_fraud]
        recall = sum(o.declined for o in frauds) / max(len(frauds), 1)
        false_positive_rate = sum(o.declined for o in legit) / max(len(legit), 1)
        return recall, false_positive_rate, len(frauds)

    old_recall, _, old_frauds = caught(1, shift, promoted_at[0])
    new_recall, new_fpr, new_frauds = caught(new, settled, math.inf)
    print(
        f"v1 on the new pattern: recall {old_recall:.2f} ({old_frauds} frauds); v{new}: recall "
        f"{new_recall:.2f} ({new_frauds} frauds), false-positive rate {new_fpr:.3f}"
    )
    assert old_frauds >= 20 and new_frauds >= 20, (old_frauds, new_frauds)
    assert new_recall >= old_recall + 0.2, (old_recall, new_recall)
    assert new_fpr <= 0.05, new_fpr
