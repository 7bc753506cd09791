"""The autopilot's judgements, stated as statistics (pure functions, no I/O).

- ``judge_paired``: shadow. Both versions scored the same live transactions (serving mirrors
  traffic to the shadow); once labelled, a paired bootstrap of the difference of a metric (by
  default the gate's: the candidate's PR-AUC minus production's; the one bootstrap of
  ``services/shared/paired_comparison.py``, shared with the registry's gate) gives an interval. The
  candidate is *better* when the interval's lower bound clears the margin, *worse* when its
  upper bound is below zero, *undecided* otherwise, and *insufficient data* below the
  minimum sample. The judge looks repeatedly while labels arrive: each look uses
  ``alpha / max_looks`` (Bonferroni), so the chance of a false "better" over all looks stays
  at most ``alpha``. Looks are spaced by evidence, not by the clock: one counts only with
  ``look_new_positives`` more labelled frauds than the last (the rare class is what the
  PR-AUC's interval rests on), so the budget of looks is not spent on the same data.
- ``judge_operational``: canary (and the watch after a promotion). What shadow cannot see:
  errors, latency, degraded answers and Triton failures of the version answering real callers,
  each compared with production's over the same period by a one-sided Fisher exact test. A
  check fails only when the candidate's rate is significantly higher (family-wise ``alpha``
  over checks and looks) *and* higher by more than a tolerance; below the minimum sample the
  verdict is "insufficient data", never pass or fail.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from statistics import NormalDist
from typing import Any, Literal

import numpy as np

from services.shared.paired_comparison import RESAMPLING_UNIT, PairedMetric, paired_bootstrap

PairedOutcome = Literal["better", "worse", "undecided", "insufficient_data"]
OperationalOutcome = Literal["pass", "fail", "insufficient_data"]


# ----------------------------------------------------------------------------- paired (shadow)


@dataclass(frozen=True)
class PairedPolicy:
    """How the shadow judge decides (AutopilotSettings supplies the values)."""

    metric: PairedMetric = "pr_auc"
    min_pairs: int = 300
    min_positives: int = 20
    alpha: float = 0.05
    max_looks: int = 10
    margin: float = 0.0
    resamples: int = 1000
    look_new_positives: int = 5  # labelled frauds a look needs beyond the last counted one


@dataclass(frozen=True)
class PairedVerdict:
    outcome: PairedOutcome
    test: str
    metric: str
    statistic: float  # improvement of the candidate over production (positive: better)
    interval: tuple[float, float]
    confidence: float  # of the two-sided interval, after the correction for repeated looks
    n: int
    positives: int
    look: int
    baseline_value: float
    candidate_value: float
    summary: str

    def evidence(self) -> dict[str, Any]:
        return asdict(self)


def judge_paired(
    labels: Sequence[float],
    baseline_scores: Sequence[float],
    candidate_scores: Sequence[float],
    *,
    policy: PairedPolicy,
    look: int,
    seed: int = 0,
) -> PairedVerdict:
    """The shadow verdict on ``look`` (1-based) from the labelled transactions both scored."""
    y = np.asarray(labels, dtype=np.float64)
    b = np.asarray(baseline_scores, dtype=np.float64)
    c = np.asarray(candidate_scores, dtype=np.float64)
    if not (y.shape == b.shape == c.shape):
        raise ValueError("labels and both score lists must have the same length")
    n, positives = int(y.size), int(y.sum())
    per_look_alpha = policy.alpha / policy.max_looks
    confidence = 1 - 2 * per_look_alpha
    test = (
        f"paired bootstrap ({policy.resamples} resamples, {RESAMPLING_UNIT}) of the "
        f"{policy.metric} difference, "
        f"{confidence:.2%} two-sided interval (alpha {policy.alpha} over {policy.max_looks} "
        "looks, Bonferroni)"
    )
    if n < policy.min_pairs or positives < policy.min_positives or positives == n:
        return PairedVerdict(
            "insufficient_data",
            test,
            policy.metric,
            0.0,
            (0.0, 0.0),
            confidence,
            n,
            positives,
            look,
            0.0,
            0.0,
            f"insufficient data: {n} labelled pairs with {positives} frauds (needs "
            f"{policy.min_pairs} pairs and {policy.min_positives} frauds)",
        )
    comparison = paired_bootstrap(
        y, b, c, metric=policy.metric, resamples=policy.resamples, confidence=confidence, seed=seed
    )
    statistic, low, high = comparison.statistic, comparison.low, comparison.high
    base_value, cand_value = comparison.baseline_value, comparison.candidate_value
    outcome: PairedOutcome
    if low > policy.margin:
        outcome = "better"
        said = f"better: the interval's lower bound {low:.5f} clears the margin {policy.margin}"
    elif high < 0:
        outcome = "worse"
        said = f"worse: the interval's upper bound {high:.5f} is below 0"
    else:
        outcome = "undecided"
        said = "undecided: the interval contains the margin or 0"
    return PairedVerdict(
        outcome,
        test,
        policy.metric,
        statistic,
        (low, high),
        confidence,
        n,
        positives,
        look,
        base_value,
        cand_value,
        f"{said}; {policy.metric} production {base_value:.5f} vs candidate {cand_value:.5f}, "
        f"improvement {statistic:.5f} [{low:.5f}, {high:.5f}] on {n} pairs ({positives} frauds), "
        f"look {look}/{policy.max_looks}",
    )


# ----------------------------------------------------------------------------- operational (canary)


@dataclass(frozen=True)
class VersionHealth:
    """What one version did over a period, from serving's, monitoring's and Triton's metrics."""

    requests: float = 0.0  # answers (or mirrored scorings) by serving
    errors: float = 0.0  # Triton calls that failed for it (serving's view)
    latency_buckets: tuple[tuple[float, float], ...] = ()  # (upper bound s, cumulative count)
    logged: float = 0.0  # its predictions monitoring read
    degraded: float = 0.0  # of those, answered with default features
    triton_requests: float = 0.0  # Triton's own count of inferences of the version
    triton_failures: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> VersionHealth:
        values = dict(data)
        values["latency_buckets"] = tuple(tuple(b) for b in values.get("latency_buckets", ()))
        return cls(**values)


@dataclass(frozen=True)
class OperationalPolicy:
    min_requests: int = 200
    min_duration_s: float = 30.0
    alpha: float = 0.05
    max_looks: int = 20
    error_tolerance: float = 0.005  # absolute extra error rate tolerated
    latency_quantile: float = 0.95  # slow = above production's bucket at this quantile
    latency_tolerance: float = 0.05  # absolute extra share of slow answers tolerated
    degraded_tolerance: float = 0.01


@dataclass(frozen=True)
class CheckResult:
    name: str
    outcome: Literal["pass", "fail", "insufficient_data"]
    test: str
    candidate_rate: float
    baseline_rate: float
    difference: float
    interval: tuple[float, float]
    p_value: float
    candidate_n: float
    baseline_n: float
    detail: str = ""


@dataclass(frozen=True)
class OperationalVerdict:
    outcome: OperationalOutcome
    checks: list[CheckResult] = field(default_factory=list)
    alpha_per_check: float = 0.0
    elapsed_s: float = 0.0
    summary: str = ""

    def evidence(self) -> dict[str, Any]:
        return asdict(self)


def _log_comb(n: float, k: float) -> float:
    return math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)


def fisher_greater(x1: int, n1: int, x0: int, n0: int) -> float:
    """One-sided Fisher exact p-value that group 1's rate exceeds group 0's:
    P(X >= x1) for X hypergeometric with the margins of the 2x2 table."""
    total, events = n1 + n0, x1 + x0
    if events == 0 or n1 == 0 or n0 == 0:
        return 1.0
    high = min(events, n1)
    log_denominator = _log_comb(total, n1)
    p = 0.0
    for x in range(x1, high + 1):
        if events - x > n0:
            continue
        p += math.exp(_log_comb(events, x) + _log_comb(total - events, n1 - x) - log_denominator)
    return min(1.0, p)


def _rate_check(
    name: str,
    x1: float,
    n1: float,
    x0: float,
    n0: float,
    *,
    alpha: float,
    tolerance: float,
    detail: str = "",
) -> CheckResult:
    c1, m1 = round(max(x1, 0)), round(max(n1, 0))
    c0, m0 = round(max(x0, 0)), round(max(n0, 0))
    c1, c0 = min(c1, m1), min(c0, m0)
    p1 = c1 / m1 if m1 else 0.0
    p0 = c0 / m0 if m0 else 0.0
    difference = p1 - p0
    z = NormalDist().inv_cdf(1 - alpha)
    se = math.sqrt((p1 * (1 - p1) / m1 if m1 else 0.0) + (p0 * (1 - p0) / m0 if m0 else 0.0))
    interval = (difference - z * se, difference + z * se)
    p_value = fisher_greater(c1, m1, c0, m0)
    significant = p_value < alpha
    failed = significant and difference > tolerance
    return CheckResult(
        name,
        "fail" if failed else "pass",
        "one-sided Fisher exact test (candidate rate > production rate)",
        p1,
        p0,
        difference,
        interval,
        p_value,
        float(m1),
        float(m0),
        detail,
    )


def latency_threshold(buckets: Sequence[tuple[float, float]], quantile: float) -> float | None:
    """The smallest bucket bound at or above ``quantile`` of the histogram (None: empty)."""
    finite = sorted((le, count) for le, count in buckets)
    if not finite or finite[-1][1] <= 0:
        return None
    total = finite[-1][1]
    for le, count in finite:
        if count >= quantile * total:
            return le
    return finite[-1][0]


def _slow(buckets: Sequence[tuple[float, float]], threshold: float) -> tuple[float, float]:
    """(answers slower than ``threshold``, all answers) of a cumulative histogram."""
    ordered = sorted(buckets)
    if not ordered:
        return 0.0, 0.0
    total = ordered[-1][1]
    within = max((count for le, count in ordered if le <= threshold), default=0.0)
    return max(total - within, 0.0), total


def judge_operational(
    candidate: VersionHealth,
    baseline: VersionHealth,
    *,
    policy: OperationalPolicy,
    elapsed_s: float,
    latency: bool = True,
) -> OperationalVerdict:
    """Canary (or a new production) against production. ``latency=False`` leaves latency
    out: the watch after a promotion compares with an earlier period, and a shared machine's
    load moves latency between periods whatever the version (the canary compares latency
    with production over the same seconds)."""
    checks_per_look = 4 if latency else 3
    alpha = policy.alpha / (checks_per_look * policy.max_looks)
    if (
        candidate.requests < policy.min_requests
        or baseline.requests < policy.min_requests
        or elapsed_s < policy.min_duration_s
    ):
        return OperationalVerdict(
            "insufficient_data",
            [],
            alpha,
            elapsed_s,
            f"insufficient data: {candidate.requests:.0f} candidate and {baseline.requests:.0f} "
            f"production answers in {elapsed_s:.0f}s (needs {policy.min_requests} each and "
            f"{policy.min_duration_s:.0f}s)",
        )
    checks = [
        _rate_check(
            "errors",
            candidate.errors,
            candidate.requests + candidate.errors,
            baseline.errors,
            baseline.requests + baseline.errors,
            alpha=alpha,
            tolerance=policy.error_tolerance,
            detail="failed Triton calls per scoring attempt (serving)",
        )
    ]
    threshold = latency_threshold(baseline.latency_buckets, policy.latency_quantile)
    if latency and threshold is not None:
        slow1, n1 = _slow(candidate.latency_buckets, threshold)
        slow0, n0 = _slow(baseline.latency_buckets, threshold)
        checks.append(
            _rate_check(
                "latency",
                slow1,
                n1,
                slow0,
                n0,
                alpha=alpha,
                tolerance=policy.latency_tolerance,
                detail=f"share of answers slower than {threshold * 1000:.1f} ms (production's "
                f"p{policy.latency_quantile * 100:.0f} bucket)",
            )
        )
    checks.append(
        _rate_check(
            "degraded",
            candidate.degraded,
            candidate.logged,
            baseline.degraded,
            baseline.logged,
            alpha=alpha,
            tolerance=policy.degraded_tolerance,
            detail="answers given with default features (monitoring)",
        )
    )
    checks.append(
        _rate_check(
            "triton",
            candidate.triton_failures,
            candidate.triton_requests + candidate.triton_failures,
            baseline.triton_failures,
            baseline.triton_requests + baseline.triton_failures,
            alpha=alpha,
            tolerance=policy.error_tolerance,
            detail="inference failures Triton counted for the version",
        )
    )
    failed = [c for c in checks if c.outcome == "fail"]
    if failed:
        said = "; ".join(
            f"{c.name} {c.candidate_rate:.4f} vs production {c.baseline_rate:.4f} "
            f"(p={c.p_value:.2g})"
            for c in failed
        )
        return OperationalVerdict(
            "fail", checks, alpha, elapsed_s, f"worse than production: {said}"
        )
    return OperationalVerdict(
        "pass",
        checks,
        alpha,
        elapsed_s,
        f"no check worse than production at alpha {policy.alpha} (family-wise over "
        f"{checks_per_look} checks x {policy.max_looks} looks) on {candidate.requests:.0f} "
        f"candidate and {baseline.requests:.0f} production answers in {elapsed_s:.0f}s",
    )
