"""The closed loop on the real local stack, with no human step.

One stack (`mlops stack up` on free ports, `mlops bootstrap` for production v1, the loop's
timings shortened: ``loop_harness.FAST_LOOP``) serves the tests of this module. A deliberately
bad candidate (a constant probability, registered through the registry's normal path with a
held-out set it looks good on) passes the gate, goes to shadow, is judged worse on the live
transactions both versions scored, and is withdrawn: it never answers a single Predict call,
let alone more than the canary share.
"""

from __future__ import annotations

from collections.abc import Iterator

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
