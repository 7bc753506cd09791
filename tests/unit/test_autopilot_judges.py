"""The autopilot's statistics: the paired shadow judge and the operational canary judge."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import fisher_exact

from services.autopilot.judges import (
    OperationalPolicy,
    PairedPolicy,
    VersionHealth,
    compare_decisions,
    fisher_greater,
    fpr_increase_upper_bound,
    judge_operational,
    judge_paired,
    latency_threshold,
)

POLICY = PairedPolicy(min_pairs=200, min_positives=10, alpha=0.05, max_looks=5, resamples=400)
THRESHOLD = 0.25  # both versions' decision threshold in these tests (logit -1.1)


def _decided(*scores: np.ndarray) -> list[np.ndarray]:
    """Each version's decisions at THRESHOLD."""
    return [np.asarray(s) >= THRESHOLD for s in scores]


def _scores(n: int, fraud_rate: float, skill: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Labels and scores of a model whose frauds score higher by ``skill`` (logit units)."""
    rng = np.random.default_rng(seed)
    labels = (rng.random(n) < fraud_rate).astype(float)
    logits = -3.0 + skill * labels + rng.normal(0, 1, n)
    return labels, 1 / (1 + np.exp(-logits))


def test_a_clearly_better_candidate_is_better_with_its_interval() -> None:
    labels, production = _scores(2000, 0.05, 1.0, 1)
    rng = np.random.default_rng(2)
    candidate = 1 / (1 + np.exp(-(-3.0 + 4.0 * labels + rng.normal(0, 1, labels.size))))
    verdict = judge_paired(
        labels, production, candidate, *_decided(production, candidate), policy=POLICY, look=1
    )
    assert verdict.outcome == "better"
    low, high = verdict.interval
    assert 0 < low <= verdict.statistic <= high
    assert verdict.n == 2000 and verdict.positives == int(labels.sum())
    assert math.isclose(verdict.confidence, 1 - 2 * 0.05 / 5)
    assert verdict.candidate_value > verdict.baseline_value  # PR-AUC: higher is better
    assert verdict.metric == "pr_auc"
    assert "paired bootstrap" in verdict.test and "Bonferroni" in verdict.test


def test_a_constant_candidate_is_worse() -> None:
    labels, production = _scores(1500, 0.05, 4.0, 3)
    constant = np.full(labels.size, 0.3)
    verdict = judge_paired(
        labels, production, constant, *_decided(production, constant), policy=POLICY, look=2
    )
    assert verdict.outcome == "worse" and verdict.interval[1] < 0


def test_the_same_model_is_undecided_not_better() -> None:
    labels, production = _scores(1500, 0.05, 2.0, 4)
    verdict = judge_paired(
        labels,
        production,
        production.copy(),
        *_decided(production, production.copy()),
        policy=POLICY,
        look=1,
    )
    assert verdict.outcome == "undecided"


def test_too_few_pairs_or_frauds_is_insufficient_data_never_a_verdict() -> None:
    labels, production = _scores(150, 0.05, 4.0, 5)
    verdict = judge_paired(
        labels,
        production,
        production * 0,
        *_decided(production, production * 0),
        policy=POLICY,
        look=1,
    )
    assert verdict.outcome == "insufficient_data" and "insufficient data" in verdict.summary
    no_fraud = np.zeros(500)
    verdict = judge_paired(
        no_fraud,
        no_fraud + 0.1,
        no_fraud + 0.2,
        *_decided(no_fraud + 0.1, no_fraud + 0.2),
        policy=POLICY,
        look=1,
    )
    assert verdict.outcome == "insufficient_data"


def test_false_better_rate_of_equal_models_stays_under_alpha() -> None:
    """Two equally good (but different) models: 'better' at most at the stated rate."""
    policy = PairedPolicy(min_pairs=100, min_positives=5, alpha=0.05, max_looks=1, resamples=300)
    better = 0
    trials = 60
    for seed in range(trials):
        labels, a = _scores(600, 0.1, 2.0, 100 + seed)
        rng = np.random.default_rng(1000 + seed)
        b = 1 / (1 + np.exp(-(-3.0 + 2.0 * labels + rng.normal(0, 1, labels.size))))
        better += (
            judge_paired(labels, a, b, *_decided(a, b), policy=policy, look=1, seed=seed).outcome
            == "better"
        )
    # the one-sided error rate is alpha/2 = 2.5 %: 60 trials, more than 6 would be very unlikely
    assert better <= 6


def test_log_loss_metric_works_too_and_prefers_a_calibrated_constant() -> None:
    labels, production = _scores(1000, 0.08, 0.5, 6)
    rng = np.random.default_rng(9)
    candidate = 1 / (1 + np.exp(-(-3.0 + 5.0 * labels + rng.normal(0, 1, labels.size))))
    policy = PairedPolicy(metric="log_loss", min_pairs=200, min_positives=10, resamples=200)
    verdict = judge_paired(
        labels, production, candidate, *_decided(production, candidate), policy=policy, look=1
    )
    assert verdict.outcome == "better" and verdict.metric == "log_loss"
    # why PR-AUC is the default: a sharp model that is confidently wrong on a few rows loses
    # on log-loss to a constant at the base rate, though it ranks frauds far better (and
    # declines them: the decision check alone keeps the constant from being "better")
    sharp = np.where(labels == 1, 0.999, 0.001)
    sharp[:40] = 1 - labels[:40]  # 40 confident mistakes
    constant = np.full(labels.size, labels.mean())
    by_loss = judge_paired(
        labels, sharp, constant, *_decided(sharp, constant), policy=policy, look=1
    )
    by_ranking = judge_paired(
        labels, sharp, constant, *_decided(sharp, constant), policy=POLICY, look=1
    )
    assert by_loss.interval[0] > 0 and by_ranking.interval[1] < 0
    assert by_loss.decisions is not None and by_loss.decisions.verdict == "worse"
    assert by_loss.outcome == "worse" and by_ranking.outcome == "worse"


def test_a_better_ranking_without_better_decisions_is_not_better() -> None:
    """The candidate ranks frauds far better, but at its threshold it declines the same
    transactions as production (a threshold chosen on too few frauds of a new pattern):
    callers would gain nothing, so no promotion, though the PR-AUC interval clears 0."""
    labels, production = _scores(2000, 0.05, 1.0, 1)
    rng = np.random.default_rng(2)
    candidate = 1 / (1 + np.exp(-(-3.0 + 4.0 * labels + rng.normal(0, 1, labels.size))))
    same = production >= THRESHOLD
    verdict = judge_paired(labels, production, candidate, same, same.copy(), policy=POLICY, look=1)
    assert verdict.interval[0] > 0  # the ranking is better
    assert verdict.outcome == "undecided" and "not yet better" in verdict.summary
    assert verdict.decisions is not None and verdict.decisions.verdict == "no_better"
    assert verdict.decisions.candidate_only_caught == verdict.decisions.baseline_only_caught == 0


def test_a_candidate_declining_many_more_legitimate_payments_is_worse() -> None:
    labels, production = _scores(3000, 0.05, 1.0, 7)
    rng = np.random.default_rng(8)
    candidate = 1 / (1 + np.exp(-(-3.0 + 4.0 * labels + rng.normal(0, 1, labels.size))))
    # a threshold that also declines ~10 % of the legitimate payments
    verdict = judge_paired(
        labels, production, candidate, production >= THRESHOLD, candidate >= 0.1,
        policy=POLICY, look=1,
    )  # fmt: skip
    assert verdict.interval[0] > 0  # ranks better, decides worse
    decisions = verdict.decisions
    assert decisions is not None and decisions.verdict == "worse"
    assert decisions.candidate_fpr - decisions.baseline_fpr > POLICY.fpr_tolerance
    assert verdict.outcome == "worse" and "decisions" in verdict.summary


def test_decisions_are_compared_by_exact_mcnemar_tests() -> None:
    labels = np.array([1.0] * 12 + [0.0] * 1000)
    base = np.zeros(1012, dtype=bool)
    cand = np.zeros(1012, dtype=bool)
    cand[:10] = True  # 10 frauds only the candidate declines
    base[10] = True  # 1 only production declines
    cand[12:14] = True  # 2 legitimate payments only the candidate declines
    compared = compare_decisions(labels, base, cand, alpha=0.01, fpr_tolerance=0.02)
    assert (compared.candidate_only_caught, compared.baseline_only_caught) == (10, 1)
    # P(X >= 10) for X ~ Binomial(11, 1/2) = 12 / 2048
    assert math.isclose(compared.p_recall_higher, 12 / 2048)
    assert compared.p_fpr_lower == 1.0 and compared.verdict == "better"
    assert math.isclose(compared.candidate_recall, 10 / 12) and compared.candidate_fpr == 0.002


def test_a_cycle_answering_a_shift_needs_more_frauds_declined_not_only_fewer_false_ones() -> None:
    """Fewer false declines at the same recall is better in general, but not for a cycle
    answering a concept shift: the new fraud pattern is what production misses."""
    labels = np.array([1.0] * 20 + [0.0] * 400)
    base = np.zeros(420, dtype=bool)
    cand = np.zeros(420, dtype=bool)
    base[:2] = cand[:2] = True  # both decline the same 2 of 20 frauds
    base[20:50] = True  # production declines 30 legitimate payments the candidate passes
    plain = compare_decisions(labels, base, cand, alpha=0.01, fpr_tolerance=0.05)
    assert plain.p_fpr_lower < 0.01 and plain.verdict == "better"
    shift = compare_decisions(
        labels, base, cand, alpha=0.01, fpr_tolerance=0.05, require_recall=True
    )
    assert shift.verdict == "no_better"
    cand[2:14] = True  # now it also declines 12 frauds production misses
    caught = compare_decisions(
        labels, base, cand, alpha=0.01, fpr_tolerance=0.05, require_recall=True
    )
    assert caught.p_recall_higher < 0.01 and caught.verdict == "better"


def test_better_needs_the_false_positive_increase_bounded_not_only_not_significant() -> None:
    """More frauds declined, and 9 of 190 legitimate payments declined by the candidate only
    (1 by production only): not significantly more than the tolerance (not "worse"), but not
    shown to be within it either, so not "better" yet; with 2 such payments it is."""
    labels = np.array([1.0] * 13 + [0.0] * 190)
    base = np.zeros(203, dtype=bool)
    cand = np.zeros(203, dtype=bool)
    cand[:12] = True  # 12 of 13 frauds only the candidate declines
    cand[13:22] = True  # 9 legitimate payments only the candidate declines
    base[22] = True  # 1 only production declines
    wide = compare_decisions(
        labels, base, cand, alpha=0.005, fpr_tolerance=0.05, require_recall=True
    )
    assert wide.p_recall_higher < 0.005
    assert wide.candidate_fpr - wide.baseline_fpr < 0.05 < wide.fpr_increase_upper
    assert wide.verdict == "no_better"
    cand[15:22] = False  # 2 instead of 9
    narrow = compare_decisions(
        labels, base, cand, alpha=0.005, fpr_tolerance=0.05, require_recall=True
    )
    assert narrow.fpr_increase_upper <= 0.05 and narrow.verdict == "better"


def test_the_false_positive_bound_covers_the_true_increase() -> None:
    """Coverage of the one-sided bound on simulated paired decisions: 400 legitimate
    payments, each declined by the candidate only with p 0.035, by production only with
    p 0.005 (true increase 0.03); at alpha 0.05 the bound falls below it in about 5 % of
    runs (5.3 % in 3,000 runs of the same set-up offline; here 1,000, binomial SE 0.7 %)."""
    rng = np.random.default_rng(7)
    runs, alpha = 1000, 0.05
    kinds = rng.choice(3, size=(runs, 400), p=[0.035, 0.005, 0.96])
    below = [
        fpr_increase_upper_bound(int((k == 0).sum()), int((k == 1).sum()), 400, alpha) < 0.03
        for k in kinds
    ]
    assert np.mean(below) <= alpha + 0.025
    assert fpr_increase_upper_bound(0, 0, 0, 0.05) == math.inf
    # nothing declined by one version only in 1,000: the bound is small but above 0
    assert 0 < fpr_increase_upper_bound(0, 0, 1000, 0.05) < 0.005


def test_fisher_exact_one_sided_p_values() -> None:
    # 5 of 10 vs 0 of 10: P(X >= 5) = C(15,5) / C(20,10)
    assert fisher_greater(5, 10, 0, 10) == pytest.approx(3003 / 184756)
    assert fisher_greater(0, 10, 5, 10) == pytest.approx(1.0)
    assert fisher_greater(0, 100, 0, 100) == 1.0
    assert fisher_greater(3, 100, 3, 100) > 0.5
    expected = fisher_exact([[12, 288], [2, 1198]], alternative="greater").pvalue
    assert fisher_greater(12, 300, 2, 1200) == pytest.approx(expected)


def test_operational_insufficient_data_below_minimum_sample_or_duration() -> None:
    policy = OperationalPolicy(min_requests=100, min_duration_s=30)
    small = VersionHealth(requests=50)
    large = VersionHealth(requests=1000)
    assert judge_operational(small, large, policy=policy, elapsed_s=60).outcome == (
        "insufficient_data"
    )
    assert judge_operational(large, large, policy=policy, elapsed_s=10).outcome == (
        "insufficient_data"
    )


def _buckets(total: float, slow_share: float) -> tuple[tuple[float, float], ...]:
    fast = total * (1 - slow_share)
    return ((0.005, fast * 0.5), (0.01, fast), (0.05, total), (math.inf, total))


def test_operational_pass_when_no_check_is_worse() -> None:
    policy = OperationalPolicy(min_requests=100, min_duration_s=0)
    production = VersionHealth(2000, 2, _buckets(2000, 0.04), 2000, 0, 2000, 0)
    canary = VersionHealth(300, 0, _buckets(300, 0.05), 300, 0, 300, 0)
    verdict = judge_operational(canary, production, policy=policy, elapsed_s=40)
    assert verdict.outcome == "pass"
    assert {c.name for c in verdict.checks} == {"errors", "latency", "degraded", "triton"}
    assert all(c.p_value > verdict.alpha_per_check for c in verdict.checks)


def test_operational_fail_on_errors_latency_or_triton() -> None:
    policy = OperationalPolicy(min_requests=100, min_duration_s=0)
    production = VersionHealth(2000, 1, _buckets(2000, 0.04), 2000, 0, 2000, 0)
    erroring = VersionHealth(300, 60, _buckets(300, 0.04), 300, 0, 300, 0)
    verdict = judge_operational(erroring, production, policy=policy, elapsed_s=40)
    assert verdict.outcome == "fail" and "errors" in verdict.summary
    slow = VersionHealth(300, 0, _buckets(300, 0.6), 300, 0, 300, 0)
    verdict = judge_operational(slow, production, policy=policy, elapsed_s=40)
    assert verdict.outcome == "fail" and "latency" in verdict.summary
    failing = VersionHealth(300, 0, _buckets(300, 0.04), 300, 0, 250, 50)
    verdict = judge_operational(failing, production, policy=policy, elapsed_s=40)
    assert verdict.outcome == "fail" and "triton" in verdict.summary


def test_latency_threshold_is_the_production_bucket_at_the_quantile() -> None:
    assert latency_threshold(_buckets(1000, 0.04), 0.95) == 0.01
    assert latency_threshold(_buckets(1000, 0.04), 0.99) == 0.05
    assert latency_threshold(_buckets(1000, 0.04), 0.4) == 0.005
    assert latency_threshold((), 0.95) is None
