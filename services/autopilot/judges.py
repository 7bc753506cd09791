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
  A better ranking is not enough: what callers get is each version's decision at its own
  threshold (the ``flagged`` bit serving logged), and a candidate can rank better and still
  decline no more frauds (a threshold chosen on a validation period with few frauds of a new
  pattern: seen in CI, the promoted version caught 2 % of the new pattern's frauds). So the
  decisions on the same labelled transactions are compared too, each by an exact McNemar
  test (one-sided binomial test on the discordant pairs) at the same per-look alpha: recall
  (frauds declined by one version only) and false-positive rate (legitimate payments
  declined by one version only; "higher" only when also higher by more than
  ``fpr_tolerance``). *Better* needs the metric's interval to clear the margin **and** the
  decisions to be better: significantly more frauds declined, or significantly fewer false
  declines without a significantly lower recall, and in both cases a false-positive rate
  shown to be at most ``fpr_tolerance`` above production's (non-inferiority: the one-sided
  upper confidence bound of the paired difference, from Tango's score test, within the
  tolerance; before it, "not significantly higher" let through a candidate, judged on 190
  legitimate pairs, that then declined 6.3 % of legitimate payments on all traffic: seen in
  CI, 2026-12-07). An intersection of tests, each at the per-look alpha: the chance of a
  false "better" stays at most ``alpha``. *Worse*: the metric's interval below zero, or a
  significantly lower recall, or a significantly (and by more than the tolerance) higher
  false-positive rate (a union: a good candidate is wrongly withdrawn with a chance up to
  three times the per-look alpha per look; withdrawing is the safe error). A cycle that answers
  a concept shift or a drop of live quality (``require_recall``) asks more: its candidate is
  *better* only with significantly more frauds declined. Fewer false declines alone do not
  answer a new fraud pattern (seen in the closed-loop benchmark: a candidate promoted on that
  path declined 7 % of the new pattern's frauds).
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
from scipy.optimize import brentq
from scipy.stats import binomtest, hypergeom

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
    fpr_tolerance: float = 0.05  # a higher false-positive rate within this is not "worse"


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
    decisions: DecisionComparison | None = None

    def evidence(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class DecisionComparison:
    """Both versions' decisions (each at its own threshold) on the same labelled
    transactions; p-values of exact one-sided McNemar tests on the discordant pairs."""

    frauds: int
    baseline_caught: int
    candidate_caught: int
    candidate_only_caught: int  # frauds only the candidate declined
    baseline_only_caught: int
    legitimate: int
    baseline_false_positives: int
    candidate_false_positives: int
    candidate_only_flagged: int  # legitimate payments only the candidate declined
    baseline_only_flagged: int
    p_recall_higher: float
    p_recall_lower: float
    p_fpr_higher: float
    p_fpr_lower: float
    # one-sided upper confidence bound (at 1 - alpha) of the candidate's false-positive rate
    # minus production's; "better" needs it within the tolerance
    fpr_increase_upper: float
    verdict: Literal["better", "worse", "no_better"]

    @property
    def baseline_recall(self) -> float:
        return self.baseline_caught / max(self.frauds, 1)

    @property
    def candidate_recall(self) -> float:
        return self.candidate_caught / max(self.frauds, 1)

    @property
    def baseline_fpr(self) -> float:
        return self.baseline_false_positives / max(self.legitimate, 1)

    @property
    def candidate_fpr(self) -> float:
        return self.candidate_false_positives / max(self.legitimate, 1)

    def describe(self) -> str:
        return (
            f"decisions {self.verdict.replace('_', ' ')}: recall production "
            f"{self.baseline_recall:.3f} vs candidate {self.candidate_recall:.3f} "
            f"({self.baseline_only_caught}/{self.candidate_only_caught} frauds declined by one "
            f"only, p higher {self.p_recall_higher:.4f}, p lower {self.p_recall_lower:.4f}), "
            f"false-positive rate {self.baseline_fpr:.4f} vs {self.candidate_fpr:.4f} "
            f"(p higher {self.p_fpr_higher:.4f}, p lower {self.p_fpr_lower:.4f}; increase at "
            f"most {self.fpr_increase_upper:+.4f})"
        )


def fpr_increase_upper_bound(
    candidate_only: int, baseline_only: int, legitimate: int, alpha: float
) -> float:
    """One-sided ``1 - alpha`` upper bound of the paired difference of false-positive rates
    (candidate minus production) on ``legitimate`` payments, ``candidate_only`` and
    ``baseline_only`` of them declined by one version only: the largest difference that
    Tango's score test for matched pairs (Tango 1998, the usual test of non-inferiority of
    paired proportions) does not reject at ``alpha``. In simulations with 190-920 payments
    and rates of 0-6 % it fell below the true difference in 0-0.63 % of runs at alpha 0.005
    and 2-5.7 % at 0.05 (tests/unit/test_autopilot_judges.py checks one case); plain Wald
    bounds fell below it in up to 11 %, and the exact bound of the candidate-only rate alone
    is valid but too wide when both versions decline a few percent."""
    b, c, n = candidate_only, baseline_only, legitimate
    if n == 0:
        return math.inf
    critical = NormalDist().inv_cdf(1 - alpha)
    estimate = (b - c) / n
    if _tango_z(b, c, n, 1 - 1e-9) + critical > 0:
        return 1.0
    return float(brentq(lambda delta: _tango_z(b, c, n, delta) + critical, estimate, 1 - 1e-9))


def _tango_z(b: int, c: int, n: int, delta: float) -> float:
    """Tango's score statistic of H0: (b - c) / n estimates ``delta``, with the discordant
    rates at their maximum likelihood under H0 (found numerically)."""
    rest = n - b - c
    low, high = max(0.0, -delta) + 1e-12, (1 - delta) / 2 - 1e-12

    def slope(p2: float) -> float:  # of the log-likelihood in p2, with p1 = p2 + delta
        return (
            (b / (p2 + delta) if b else 0.0)
            + (c / p2 if c else 0.0)
            - 2 * rest / (1 - 2 * p2 - delta)
        )

    if slope(low) <= 0:
        p2 = low
    elif slope(high) >= 0:
        p2 = high
    else:
        p2 = float(brentq(slope, low, high))
    variance = max(2 * p2 + delta - delta**2, 1e-15)
    return (b - c - n * delta) / math.sqrt(n * variance)


def _greater(successes: int, trials: int) -> float:
    """Exact one-sided binomial p-value of ``successes`` of ``trials`` under p = 1/2."""
    if trials == 0:
        return 1.0
    return float(binomtest(successes, trials, 0.5, alternative="greater").pvalue)


def compare_decisions(
    labels: np.ndarray,
    baseline_flagged: np.ndarray,
    candidate_flagged: np.ndarray,
    *,
    alpha: float,
    fpr_tolerance: float,
    require_recall: bool = False,
) -> DecisionComparison:
    """Both versions' decisions on the same labelled transactions, judged at ``alpha``
    (module docstring); with ``require_recall`` only a significantly higher recall is
    better."""
    fraud = labels == 1
    b, c = baseline_flagged.astype(bool), candidate_flagged.astype(bool)
    cand_only_fraud = int((c & ~b & fraud).sum())
    base_only_fraud = int((b & ~c & fraud).sum())
    cand_only_legit = int((c & ~b & ~fraud).sum())
    base_only_legit = int((b & ~c & ~fraud).sum())
    frauds, legitimate = int(fraud.sum()), int((~fraud).sum())
    p_recall_higher = _greater(cand_only_fraud, cand_only_fraud + base_only_fraud)
    p_recall_lower = _greater(base_only_fraud, cand_only_fraud + base_only_fraud)
    p_fpr_higher = _greater(cand_only_legit, cand_only_legit + base_only_legit)
    p_fpr_lower = _greater(base_only_legit, cand_only_legit + base_only_legit)
    fpr_increase = (cand_only_legit - base_only_legit) / max(legitimate, 1)
    recall_higher, recall_lower = p_recall_higher < alpha, p_recall_lower < alpha
    fpr_higher = p_fpr_higher < alpha and fpr_increase > fpr_tolerance
    fpr_lower = p_fpr_lower < alpha
    fpr_upper = fpr_increase_upper_bound(cand_only_legit, base_only_legit, legitimate, alpha)
    fpr_bounded = fpr_upper <= fpr_tolerance
    verdict: Literal["better", "worse", "no_better"]
    if recall_lower or fpr_higher:
        verdict = "worse"
    elif fpr_bounded and (recall_higher or (fpr_lower and not require_recall)):
        verdict = "better"
    else:
        verdict = "no_better"
    return DecisionComparison(
        frauds,
        int((b & fraud).sum()),
        int((c & fraud).sum()),
        cand_only_fraud,
        base_only_fraud,
        legitimate,
        int((b & ~fraud).sum()),
        int((c & ~fraud).sum()),
        cand_only_legit,
        base_only_legit,
        p_recall_higher,
        p_recall_lower,
        p_fpr_higher,
        p_fpr_lower,
        fpr_upper,
        verdict,
    )


def judge_paired(
    labels: Sequence[float],
    baseline_scores: Sequence[float],
    candidate_scores: Sequence[float],
    baseline_flagged: Sequence[bool],
    candidate_flagged: Sequence[bool],
    *,
    policy: PairedPolicy,
    look: int,
    seed: int = 0,
    require_recall: bool = False,
) -> PairedVerdict:
    """The shadow verdict on ``look`` (1-based) from the labelled transactions both scored
    (scores, and each version's decision at its own threshold); ``require_recall``: better
    needs significantly more frauds declined (a cycle answering a concept shift)."""
    y = np.asarray(labels, dtype=np.float64)
    b = np.asarray(baseline_scores, dtype=np.float64)
    c = np.asarray(candidate_scores, dtype=np.float64)
    b_flagged = np.asarray(baseline_flagged, dtype=bool)
    c_flagged = np.asarray(candidate_flagged, dtype=bool)
    if not (y.shape == b.shape == c.shape == b_flagged.shape == c_flagged.shape):
        raise ValueError("labels and both versions' scores and decisions must have one length")
    n, positives = int(y.size), int(y.sum())
    per_look_alpha = policy.alpha / policy.max_looks
    confidence = 1 - 2 * per_look_alpha
    test = (
        f"paired bootstrap ({policy.resamples} resamples, {RESAMPLING_UNIT}) of the "
        f"{policy.metric} difference, "
        f"{confidence:.2%} two-sided interval (alpha {policy.alpha} over {policy.max_looks} "
        "looks, Bonferroni); decisions at each version's threshold: exact one-sided McNemar "
        f"tests of recall and false-positive rate (tolerance {policy.fpr_tolerance}) at the "
        "same per-look alpha"
        + (
            "; better needs a higher recall (the cycle answers a concept shift)"
            if require_recall
            else ""
        )
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
    decisions = compare_decisions(
        y,
        b_flagged,
        c_flagged,
        alpha=per_look_alpha,
        fpr_tolerance=policy.fpr_tolerance,
        require_recall=require_recall,
    )
    outcome: PairedOutcome
    if low > policy.margin and decisions.verdict == "better":
        outcome = "better"
        said = f"better: the interval's lower bound {low:.5f} clears the margin {policy.margin}"
    elif high < 0:
        outcome = "worse"
        said = f"worse: the interval's upper bound {high:.5f} is below 0"
    elif decisions.verdict == "worse":
        outcome = "worse"
        said = "worse: its decisions at its own threshold are worse than production's"
    elif low > policy.margin:
        outcome = "undecided"
        said = "undecided: the interval clears the margin, the decisions are not yet better"
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
        f"look {look}/{policy.max_looks}; {decisions.describe()}",
        decisions,
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


def fisher_greater(x1: int, n1: int, x0: int, n0: int) -> float:
    """One-sided Fisher exact p-value that group 1's rate exceeds group 0's:
    P(X >= x1) for X hypergeometric with the margins of the 2x2 table (scipy's
    ``fisher_exact(alternative="greater")``, by its hypergeometric tail directly)."""
    if x1 + x0 == 0 or n1 == 0 or n0 == 0:
        return 1.0
    return min(1.0, float(hypergeom.sf(x1 - 1, n1 + n0, x1 + x0, n1)))


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
