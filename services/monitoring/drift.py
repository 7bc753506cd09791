"""Drift detection on a production model version's live traffic.

``VersionDetectors`` holds the detectors of one production version, built fresh when a
version becomes production (calibration takes a few seconds: the caller runs ``build`` off
the event loop):

- data drift, per model input: a two-sided CUSUM on the input's normal score against the
  reference (``NormalScores``), one signal per input;
- data drift, pooled: Crosier's multivariate CUSUM over the same normal scores, with the
  reference's correlation between inputs: a change that moves several correlated inputs at
  once (amounts move ``log_amount``, ``amount_to_user_mean`` and the 24 h sum together) is
  seen sooner than by any single input; its event names the inputs that moved;
- score drift: a two-sided CUSUM on the score's normal score;
- concept drift, on labelled outcomes: a CUSUM on the per-label log loss (score and label
  together: a fraud scored 0.01 costs 4.6 nats, a legitimate payment scored 0.01 costs 0.01),
  against its mean over the version's first ``concept_warmup`` labelled outcomes;
- concept drift, on labelled frauds: a CUSUM on how each fraud's score ranks among the recent
  legitimate payments' scores, against the version's first ``rank_warmup`` frauds
  (``FraudRankDetector``: a model that ranks frauds lower, however calibrated).

The reference of the data detectors is the version's training data (stored with its
artifacts, ``services/shared/drift_reference.py``); without one they take the version's first
``data_warmup`` live events instead. Every threshold is calibrated by simulation on that
reference (``detectors.threshold_from_maxima``) so that all signals together raise
``false_alarms_per_million`` false alarms per million events: each of the ``n`` signals gets
an expected run length of ``n`` million / that rate.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field

import numpy as np
from sortedcontainers import SortedList

from services.monitoring.detectors import (
    Alarm,
    Calibration,
    Cusum,
    Mcusum,
    NormalScores,
    ScalarCusum,
    cusum_path,
    excursion_maxima,
    label_log_loss,
    mcusum_path,
    scalar_cusum_path,
    threshold_from_maxima,
)
from services.shared.drift_reference import DriftReference


@dataclass(frozen=True)
class DriftConfig:
    """The statistical settings (``MonitoringSettings`` fills them)."""

    inputs: tuple[str, ...]  # the model inputs watched for data drift
    false_alarms_per_million: float = 1.0  # all signals together, per million events
    input_shift: float = 0.5  # per-input CUSUM tuned for shifts of this many reference SDs
    pooled_shift: float = 0.5  # pooled CUSUM: Mahalanobis length of the shift tuned for
    concept_shift: float = 0.5  # concept CUSUM: relative rise of the mean log loss tuned for
    concept_warmup: int = 2000  # labelled outcomes that set the concept baseline
    rank_shift: float = 1.0  # fraud-rank CUSUM: fall of the frauds' rank, in baseline SDs
    rank_warmup: int = 100  # labelled frauds that set the fraud-rank baseline
    rank_window: int = 2000  # recent legitimate payments a fraud's score is ranked among
    data_warmup: int = 5000  # live events that stand in for a missing reference
    calibration_events: int = 200_000  # simulated null events per calibration
    reference_resamples: int = 40  # data detectors: stretches, each against a resampled reference
    moved_input_sd: float = 0.2  # an input "moved" when its mean score shifted this far
    seed: int = 0


# the signal names of the pooled input detector and of the score detector
POOLED_SIGNAL = "inputs"
SCORE_SIGNAL = "score"


@dataclass(frozen=True)
class Detection:
    """A detector fired (the transport turns it into a ``DriftEvent``)."""

    kind: str  # "concept" | "data" | "score"
    signal: str  # an input's name, "inputs" (pooled), "score", "log_loss"
    detector: str
    statistic: float
    threshold: float
    reference_value: float
    current_value: float
    onset_at: float  # epoch seconds
    samples: int
    inputs: tuple[str, ...] = ()


@dataclass
class SignalState:
    """What ``/api/v1/drift`` and the gauges show per signal."""

    kind: str
    signal: str
    detector: str
    statistic: float = 0.0
    threshold: float = math.nan
    reference: str = ""  # "training" | "warmup" | "" (still warming up)


def _run_length(config: DriftConfig, signals: int) -> float:
    return signals * 1e6 / config.false_alarms_per_million


def _correlation(transform: NormalScores, inputs: np.ndarray) -> np.ndarray:
    """The inputs' correlation in normal scores (the pooled detector's covariance)."""
    z = transform.transform(inputs)
    if z.shape[1] == 1:
        return np.ones((1, 1))
    correlation = np.nan_to_num(np.corrcoef(z, rowvar=False), nan=0.0)
    np.fill_diagonal(correlation, np.where(transform.constant, 0.0, 1.0))
    return np.asarray(correlation)


def _resamples(config: DriftConfig) -> int:
    """How many resampled references a calibration's simulated events are split over (each
    stretch at least 1,000 events long)."""
    return max(1, min(config.reference_resamples, config.calibration_events // 1000))


def moving_blocks(rng: np.random.Generator, rows: int, block: int, n: int) -> np.ndarray:
    """``n`` row indices of a moving-block bootstrap of ``rows`` rows in their arrival order:
    blocks of ``block`` consecutive rows at random starts (what comes together, such as a
    fraud episode's labels, stays together)."""
    starts = rng.integers(0, rows - block + 1, size=-(-n // block))
    return (starts[:, None] + np.arange(block)).reshape(-1)[:n]


# references this large are not resampled by the calibration (``_null_maxima``)
BOOTSTRAP_MAX_ROWS = 20_000


@dataclass
class NullMaxima:
    """Excursion maxima of each data detector's statistic on simulated events without change."""

    per_column: list[np.ndarray]  # rise and fall of each input
    pooled: np.ndarray
    score: np.ndarray


def _null_maxima(
    config: DriftConfig, inputs: np.ndarray, scores: np.ndarray, k_input: float, k_pooled: float
) -> NullMaxima:
    """The detectors' excursions on ``config.calibration_events`` events drawn from the
    reference, each of ``config.reference_resamples`` stretches judged against a reference
    resampled from it (the bootstrap of Gandy and Kvaloy, Scand. J. Statistics 40, 2013).

    The detectors compare live traffic with a sample (the warmup's 5,000 events, or the
    training set's held-out rows), not with the true distribution: the sample's quantiles and
    correlations are off by chance, which shifts every normal score a little, and a CUSUM adds
    up small shifts. Simulating against the reference itself ignores that: with a reference
    of 500 events the detectors raised 10 false alarms per million stationary events, for 1
    stated. Resampling the reference for each stretch puts the same chance error into the
    simulation: 5 per million (loadtests/drift_warmup_false_alarms.py, 2 million events); with
    the default warmup of 5,000 events, 1.1 per million (1.8 million events).
    The bootstrap corrects the thresholds only in part (its tail is extrapolated from 200,000
    simulated events); a larger reference is the better cure."""
    rows, columns = inputs.shape
    # a reference of 20,000 rows or more: its chance error (under 0.01 SD per input) is
    # small against the CUSUMs' allowance (0.25 SD), and 40 sorts of it would cost seconds
    resampling = rows < BOOTSTRAP_MAX_ROWS
    resamples = _resamples(config) if resampling else 1
    per_stretch = config.calibration_events // resamples
    rng = np.random.default_rng(config.seed)
    per_column: list[list[np.ndarray]] = [[] for _ in range(2 * columns)]
    pooled: list[np.ndarray] = []
    score: list[np.ndarray] = []
    for _ in range(resamples):
        drawn = rng.integers(0, rows, size=rows) if resampling else np.arange(rows)
        transform = NormalScores(inputs[drawn])
        score_transform = NormalScores(scores[drawn])
        covariance = _correlation(transform, inputs[drawn])
        live = rng.integers(0, rows, size=per_stretch)
        z = transform.transform(inputs[live])
        paths = cusum_path(np.hstack([z, -z]), k_input)
        for j in range(2 * columns):
            per_column[j].append(excursion_maxima(paths[:, j]))
        pooled.append(excursion_maxima(mcusum_path(z, covariance, k_pooled)))
        zs = score_transform.transform(scores[live])[:, 0]
        both = np.maximum(scalar_cusum_path(zs, k_input), scalar_cusum_path(-zs, k_input))
        score.append(excursion_maxima(both))
    return NullMaxima(
        per_column=[np.concatenate(c) for c in per_column],
        pooled=np.concatenate(pooled),
        score=np.concatenate(score),
    )


@dataclass
class DataDetectors:
    """Per-input, pooled and score detectors of one version against one reference."""

    names: tuple[str, ...]
    transform: NormalScores
    score_transform: NormalScores
    per_input: Cusum  # 2 columns per input: rise, fall
    pooled: Mcusum
    score: Cusum  # rise, fall
    reference_means: np.ndarray
    reference_score_mean: float
    reference: str
    calibrations: dict[str, Calibration] = field(default_factory=dict)

    @classmethod
    def build(
        cls,
        config: DriftConfig,
        names: Sequence[str],
        inputs: np.ndarray,
        scores: np.ndarray,
        reference: str,
        signals: int,
    ) -> DataDetectors:
        inputs = np.asarray(inputs, dtype=np.float64)
        scores = np.asarray(scores, dtype=np.float64)
        transform = NormalScores(inputs)
        score_transform = NormalScores(scores)
        covariance = _correlation(transform, inputs)
        target = _run_length(config, signals)
        k_input = config.input_shift / 2
        k_pooled = config.pooled_shift / 2
        events = config.calibration_events
        maxima = _null_maxima(config, inputs, scores, k_input, k_pooled)
        # one threshold per column (rise and fall of each input): a binary input's normal
        # score is skewed, so its CUSUM's tail differs from a continuous input's
        column_cals = [
            threshold_from_maxima(column, events, target)
            if not transform.constant[j % len(names)]
            else None
            for j, column in enumerate(maxima.per_column)
        ]
        thresholds = np.array([c.threshold if c else math.inf for c in column_cals])
        per_input_cal = max((c for c in column_cals if c), key=lambda c: c.threshold)
        pooled_cal = threshold_from_maxima(maxima.pooled, events, target)
        # the score's two sides together are two signals
        score_cal = threshold_from_maxima(maxima.score, events, target / 2)
        return cls(
            names=tuple(names),
            transform=transform,
            score_transform=score_transform,
            per_input=Cusum(2 * len(names), k_input, thresholds),
            pooled=Mcusum(covariance, k_pooled, pooled_cal.threshold),
            score=Cusum(2, k_input, score_cal.threshold),
            reference_means=inputs.mean(axis=0),
            reference_score_mean=float(np.mean(scores)),
            reference=reference,
            calibrations={"input": per_input_cal, "pooled": pooled_cal, "score": score_cal},
        )

    def update(
        self,
        inputs: np.ndarray,
        scores: np.ndarray,
        times: np.ndarray,
        config: DriftConfig,
        muted: Collection[str] = (),
    ) -> list[Detection]:
        """Feed a batch of rows (inputs in ``names`` order); returns what fired, in order.

        ``muted``: signals (input names, ``inputs`` for the pooled detector, ``score``) in
        their cooldown: held at 0 for this batch, so a shift that lasts costs no detections
        that would only be suppressed (under load each row re-alarmed a restarted CUSUM, and
        monitoring's CPU per prediction tripled); each restarts from 0 when its cooldown
        ends, which delays a repeat detection by at most one batch."""
        if not len(scores):
            return []
        z = self.transform.transform(inputs)
        zs = self.score_transform.transform(scores)[:, 0]
        m = len(self.names)
        quiet = np.array([name in muted for name in self.names], dtype=bool)
        found: list[tuple[int, Detection]] = []
        for alarm in self.per_input.update(
            np.hstack([z, -z]), np.hstack([inputs, inputs]), times, np.concatenate([quiet, quiet])
        ):
            found.append((alarm.row, self._input_detection(alarm, m)))
        for alarm in self.pooled.update(z, inputs, times, POOLED_SIGNAL in muted):
            found.append((alarm.row, self._pooled_detection(alarm, config)))
        score_raw = np.column_stack([scores, scores])
        score_quiet = np.full(2, SCORE_SIGNAL in muted)
        for alarm in self.score.update(np.column_stack([zs, -zs]), score_raw, times, score_quiet):
            found.append((alarm.row, self._score_detection(alarm)))
        return [d for _, d in sorted(found, key=lambda item: item[0])]

    def _input_detection(self, alarm: Alarm, m: int) -> Detection:
        j = alarm.column % m
        return Detection(
            kind="data",
            signal=self.names[j],
            detector="cusum_rise" if alarm.column < m else "cusum_fall",
            statistic=alarm.statistic,
            threshold=float(self.per_input.threshold[alarm.column]),
            reference_value=float(self.reference_means[j]),
            current_value=alarm.signal_mean,
            onset_at=alarm.onset_time,
            samples=alarm.samples,
            inputs=(self.names[j],),
        )

    def _pooled_detection(self, alarm: Alarm, config: DriftConfig) -> Detection:
        p = self.pooled
        samples = max(alarm.samples, 1)
        shift = p.z_sum / samples
        order = np.argsort(-np.abs(shift))
        moved = tuple(self.names[j] for j in order if abs(shift[j]) >= config.moved_input_sd)
        top = int(order[0])
        return Detection(
            kind="data",
            signal=POOLED_SIGNAL,
            detector="mcusum",
            statistic=alarm.statistic,
            threshold=p.threshold,
            reference_value=float(self.reference_means[top]),
            current_value=float(p.raw_sum[top] / samples),
            onset_at=alarm.onset_time,
            samples=alarm.samples,
            inputs=moved or (self.names[top],),
        )

    def _score_detection(self, alarm: Alarm) -> Detection:
        return Detection(
            kind="score",
            signal=SCORE_SIGNAL,
            detector="cusum_rise" if alarm.column == 0 else "cusum_fall",
            statistic=alarm.statistic,
            threshold=float(self.score.threshold[alarm.column]),
            reference_value=self.reference_score_mean,
            current_value=alarm.signal_mean,
            onset_at=alarm.onset_time,
            samples=alarm.samples,
        )

    def states(self) -> list[SignalState]:
        out = []
        m = len(self.names)
        statistic, threshold = self.per_input.statistic, self.per_input.threshold
        for j, name in enumerate(self.names):
            # the side (rise or fall) nearer its own threshold: the two sides of a binary
            # input have very different thresholds, and mixing them would mislead
            side = (
                j if statistic[j] / threshold[j] >= statistic[j + m] / threshold[j + m] else j + m
            )
            out.append(
                SignalState(
                    "data",
                    name,
                    "cusum",  # one gauge series per input, the nearer side's figures
                    float(statistic[side]),
                    float(threshold[side]),
                    self.reference,
                )
            )
        out.append(
            SignalState(
                "data",
                POOLED_SIGNAL,
                "mcusum",
                self.pooled.statistic,
                self.pooled.threshold,
                self.reference,
            )
        )
        out.append(
            SignalState(
                "score",
                SCORE_SIGNAL,
                "cusum",
                float(self.score.statistic.max()),
                float(self.score.threshold[0]),
                self.reference,
            )
        )
        return out


@dataclass
class ConceptDetector:
    """CUSUM on per-label log loss above the version's own baseline (first labelled outcomes).

    ``x = loss - baseline_mean``, ``S = max(0, S + x - k)`` with ``k = concept_shift *
    baseline_mean / 2`` (tuned for a rise of the mean log loss by ``concept_shift``) plus the
    baseline mean's standard error; the threshold is calibrated on the baseline's own losses
    in moving blocks, each simulated stretch against a resampled baseline.

    Each live loss enters the CUSUM capped at the largest loss of the baseline: a resampled
    baseline of a few thousand outcomes cannot show the rarest misses (a fraud scored 0.001
    costs 6.9 nats, a few in 10,000 outcomes), so without the cap one such outcome could cross
    a threshold calibrated without it (seen on the stack: a "concept drift" resting on one
    outcome). A real change raises many losses, and is still seen."""

    config: DriftConfig
    signals: int
    warmup: list[float] = field(default_factory=list)
    baseline_mean: float = math.nan
    loss_cap: float = math.inf
    cusum: ScalarCusum | None = None
    calibration: Calibration | None = None

    @property
    def ready(self) -> bool:
        return self.cusum is not None

    def update(self, score: float, label: bool, t: float) -> Detection | None:
        loss = label_log_loss(score, label)
        if self.cusum is None:
            self.warmup.append(loss)
            if len(self.warmup) >= self.config.concept_warmup:
                self._calibrate()
            return None
        if self.cusum.update(min(loss, self.loss_cap) - self.baseline_mean, loss, t):
            return _concept_detection(self.cusum, "log_loss", self.baseline_mean)
        return None

    def _calibrate(self) -> None:
        losses = np.asarray(self.warmup)
        self.baseline_mean, self.loss_cap, k = self._baseline(losses)
        # moving blocks of the baseline in its arrival order, not single outcomes: a fraud
        # episode's labels come together (a burst of high losses), which independent draws
        # would break up, making the tail of the CUSUM look lighter than it is
        block = min(CONCEPT_CALIBRATION_BLOCK, len(losses))
        rng = np.random.default_rng(self.config.seed + 3)
        target = _run_length(self.config, self.signals)
        per_baseline = []
        for _ in range(_resamples(self.config)):
            # the baseline is a sample: its mean, cap and allowance are off by chance (with
            # 600 outcomes, ~30 frauds, by much), and a CUSUM adds up a mean set too low.
            # Each simulated stretch is judged against a baseline resampled from it
            mean, cap, k_drawn = self._baseline(
                losses[moving_blocks(rng, len(losses), block, len(losses))]
            )
            live = losses[moving_blocks(rng, len(losses), block, CONCEPT_STRETCH)]
            path = scalar_cusum_path(np.minimum(live, cap) - mean, k_drawn)
            per_baseline.append(threshold_from_maxima(excursion_maxima(path), len(live), target))
        # the threshold that holds the stated rate for CONCEPT_GUARANTEE of the baselines
        # (Gandy and Kvaloy's guaranteed conditional performance): pooling the stretches'
        # maxima instead averages a baseline that came out low (no badly missed fraud among
        # its ~30) with the rest, and such a baseline alarms again and again (measured,
        # loadtests/concept_warmup_false_alarms.py)
        thresholds = np.array([c.threshold for c in per_baseline])
        self.calibration = Calibration(
            threshold=float(np.quantile(thresholds, CONCEPT_GUARANTEE)),
            target_run_length=target,
            simulated_events=CONCEPT_STRETCH * len(per_baseline),
            excursions=sum(c.excursions for c in per_baseline),
            tail_rate=float(np.median([c.tail_rate for c in per_baseline])),
        )
        self.cusum = ScalarCusum(k, self.calibration.threshold)
        self.warmup = []

    def _baseline(self, losses: np.ndarray) -> tuple[float, float, float]:
        """The mean, the cap and the CUSUM allowance ``k`` a baseline of ``losses`` sets."""
        mean = float(losses.mean())
        # the baseline mean is itself an estimate: its standard error is added to k so that
        # an underestimate does not turn into a steady upward drift under no change
        stderr = float(losses.std()) / math.sqrt(len(losses))
        return mean, float(losses.max()), self.config.concept_shift * mean / 2 + stderr

    def state(self) -> SignalState:
        return _concept_state(self.cusum, "log_loss")


# frauds per block when the fraud-rank threshold is calibrated (an episode's frauds, scored
# alike, come together)
RANK_CALIBRATION_BLOCK = 5
# legitimate payments ranked against before a fraud's rank means anything
MIN_RANKED_LEGIT = 200


@dataclass
class FraudRankDetector:
    """CUSUM on where each labelled fraud's score ranks among the scores of the recent
    legitimate payments: a fall means the model ranks frauds lower than it did (its PR-AUC
    falls), whatever its calibration.

    Why beside the log loss: the loss weighs every label by how confident the model was, so a
    model that already scored many frauds low (a live recall of a few per cent) loses little
    more when a new pattern's frauds are scored low too; the ranks of the frauds fall far. On
    the local stack (run of 2026-12-05 18:16-18:33 UTC) a concept shift took v1's live PR-AUC
    from 0.76 to 0.49 while its mean log loss stayed at 0.32-0.34: the loss CUSUM reached 25
    of its threshold of 95.

    ``u`` = the fraud's mid-rank among the last ``rank_window`` legitimate labelled scores
    (recent ones: a drift that moves every score alike leaves the ranks as they were), mapped
    to a normal score through the version's first ``rank_warmup`` frauds' ranks; ``S = max(0,
    S - z - k)`` with ``k = rank_shift / 2``. The threshold is calibrated as the data
    detectors' (moving blocks of the baseline in arrival order, each stretch against a
    resampled baseline: 100 frauds are a small sample).

    Measured on a synthetic world (tests/unit/test_monitoring_drift.py's, 20 seeds: 5 % fraud,
    half the frauds scored like legitimate payments before the change, all after): median
    delay 1,140 labelled outcomes (about 57 frauds); the log-loss CUSUM found 8 of the 20
    changes within 20,000. No false alarm in 20 x 100,000 stationary outcomes with ``k`` =
    0.5 (the default, for a fall of 1 SD; the change above is about 1.5); with 0.25, eight,
    all from one baseline of 100 frauds that happened to rank high."""

    config: DriftConfig
    signals: int
    legit: SortedList = field(default_factory=SortedList)
    legit_order: deque[float] = field(default_factory=deque)
    warmup: list[float] = field(default_factory=list)
    transform: NormalScores | None = None
    baseline_mean: float = math.nan
    cusum: ScalarCusum | None = None
    calibration: Calibration | None = None

    @property
    def ready(self) -> bool:
        return self.cusum is not None

    def update(self, score: float, label: bool, t: float) -> Detection | None:
        if not label:
            self.legit.add(score)
            self.legit_order.append(score)
            if len(self.legit_order) > self.config.rank_window:
                self.legit.remove(self.legit_order.popleft())
            return None
        if len(self.legit) < MIN_RANKED_LEGIT:
            return None
        rank = (
            (self.legit.bisect_left(score) + self.legit.bisect_right(score)) / 2 / len(self.legit)
        )
        if self.cusum is None or self.transform is None:
            self.warmup.append(rank)
            if len(self.warmup) >= self.config.rank_warmup:
                self._calibrate()
            return None
        z = float(self.transform.transform(np.array([[rank]]))[0, 0])
        if self.cusum.update(-z, rank, t):
            return _concept_detection(self.cusum, "fraud_rank", self.baseline_mean)
        return None

    def _calibrate(self) -> None:
        ranks = np.asarray(self.warmup)
        self.transform = NormalScores(ranks)
        self.baseline_mean = float(ranks.mean())
        k = self.config.rank_shift / 2
        block = min(RANK_CALIBRATION_BLOCK, len(ranks))
        events = self.config.calibration_events
        resamples = _resamples(self.config)
        rng = np.random.default_rng(self.config.seed + 4)
        maxima = []
        for _ in range(resamples):
            baseline = NormalScores(ranks[rng.integers(0, len(ranks), size=len(ranks))])
            rows = moving_blocks(rng, len(ranks), block, events // resamples)
            z = baseline.transform(ranks[rows])[:, 0]
            maxima.append(excursion_maxima(scalar_cusum_path(-z, k)))
        self.calibration = threshold_from_maxima(
            np.concatenate(maxima), events, _run_length(self.config, self.signals)
        )
        self.cusum = ScalarCusum(k, self.calibration.threshold)
        self.warmup = []

    def state(self) -> SignalState:
        return _concept_state(self.cusum, "fraud_rank")


def _concept_detection(cusum: ScalarCusum, signal: str, reference_value: float) -> Detection:
    """The ``Detection`` of a concept CUSUM that crossed its threshold; the CUSUM restarts."""
    run = cusum.run
    detection = Detection(
        kind="concept",
        signal=signal,
        detector=f"cusum_{signal}",
        statistic=cusum.statistic,
        threshold=cusum.threshold,
        reference_value=reference_value,
        current_value=run.signal_sum / max(run.samples, 1),
        onset_at=run.onset_time,
        samples=run.samples,
    )
    cusum.reset()
    return detection


def _concept_state(cusum: ScalarCusum | None, signal: str) -> SignalState:
    """A concept signal's state (no CUSUM yet: still warming up)."""
    return SignalState(
        "concept",
        signal,
        f"cusum_{signal}",
        cusum.statistic if cusum else 0.0,
        cusum.threshold if cusum else math.nan,
        "warmup" if cusum else "",
    )


def signal_count(config: DriftConfig) -> int:
    """Signals sharing the platform-wide false-alarm budget: two sides per input, the pooled
    detector, two sides of the score, the two concept detectors (log loss, fraud rank)."""
    return 2 * len(config.inputs) + 1 + 2 + 2


# labelled outcomes per block when the concept threshold is calibrated on the baseline
CONCEPT_CALIBRATION_BLOCK = 50
# simulated outcomes against each resampled concept baseline (a scalar CUSUM: 40 x 50,000
# outcomes take ~0.1 s)
CONCEPT_STRETCH = 50_000
# share of resampled baselines whose own threshold the concept threshold covers
CONCEPT_GUARANTEE = 0.9
# fewer held-out rows than this: the whole reference stands in (a tiny training set)
MIN_HELD_OUT_ROWS = 1000


def data_detectors_from_reference(config: DriftConfig, reference: DriftReference) -> DataDetectors:
    """Detectors against the reference's held-out rows: the latest period of the training data.

    Its earliest rows are the platform filling up: every user first seen, every 1 h and 24 h
    count climbing from 0 during the history's first day. Live traffic never sees that state
    again, so a reference that includes it differs from stationary live traffic (measured on
    the simulator's traffic: 233 false alarms in 5,000 live events against all rows, against
    the held-out ones none of that kind); the held-out period is the steady state, and the
    one closest in time to live traffic."""
    rows = reference.held_out if reference.held_out.sum() >= MIN_HELD_OUT_ROWS else slice(None)
    inputs = np.column_stack([reference.column(name)[rows] for name in config.inputs])
    return DataDetectors.build(
        config, config.inputs, inputs, reference.scores[rows], "training", signal_count(config)
    )


def data_detectors_from_warmup(
    config: DriftConfig, inputs: np.ndarray, scores: np.ndarray
) -> DataDetectors:
    return DataDetectors.build(
        config, config.inputs, inputs, scores, "warmup", signal_count(config)
    )
