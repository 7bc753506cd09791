"""Prometheus metrics of the autopilot (scraped on port 9107)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge

PHASE = Gauge(
    "mlops_autopilot_phase",
    "1 for the loop's current phase (watching, retraining, gating, shadow, canary, promoted)",
    ["phase"],
)
PAUSED = Gauge("mlops_autopilot_paused", "1 while an operator has paused the loop")
HALTED = Gauge(
    "mlops_autopilot_halted",
    "1 when the loop stopped itself after too many consecutive automatic rollbacks",
)
CONSECUTIVE_ROLLBACKS = Gauge(
    "mlops_autopilot_consecutive_rollbacks", "Automatic rollbacks since the last kept promotion"
)
TRIGGERS = Counter(
    "mlops_autopilot_triggers_total",
    "Reasons to retrain seen, by source (drift, schedule, quality) and what came of them "
    "(requested, or why not: paused, busy, cooldown, labels, ...)",
    ["source", "outcome"],
)
CYCLES = Counter("mlops_autopilot_cycles_total", "Cycles ended, by outcome", ["outcome"])
TRANSITIONS = Counter(
    "mlops_autopilot_transitions_total", "Phase changes the loop made, by phase entered", ["phase"]
)
VERDICTS = Counter(
    "mlops_autopilot_verdicts_total",
    "Judgements made, by judge (shadow, canary, watch) and outcome",
    ["judge", "outcome"],
)
ACTION_FAILURES = Counter(
    "mlops_autopilot_action_failures_total",
    "Registry, training or evidence calls that failed (retried on the next tick)",
    ["action"],
)
