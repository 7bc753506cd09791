"""Sequential change detectors and the calibration of their thresholds (pure numpy).

Three CUSUM-type detectors, each fed one event at a time (or a batch, row by row):

- ``Cusum``: Page's one-sided CUSUM ``S = max(0, S + x - k)`` on a stream of increments,
  several streams at once (one per column); two-sided monitoring feeds ``x`` and ``-x``.
- ``Mcusum``: Crosier's multivariate CUSUM (Technometrics 30, 1988) on a vector of
  standardised inputs: it pools inputs that move together, so a shift spread over several
  correlated inputs is seen sooner than by any one of them.
- Both keep, for the current run (since the statistic last left zero), when it began (the
  estimate of the change's onset), how many events it spans and the mean of the raw signal
  over it: what a ``DriftEvent`` reports.

Thresholds are calibrated by simulation (``threshold_from_maxima``): the detector runs on a long
stream resampled from the reference (no change, by construction), the maxima of its excursions
above zero are collected, and their exponential tail (a CUSUM's excursion maximum has one:
Cramér-Lundberg) is extrapolated to the threshold whose expected number of events between
false alarms is the target. The same idea as alibi-detect's "expected run time" for its online
detectors, with a tail fit instead of a brute-force run of the target length.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.special import ndtri

# Probabilities never reach 0 or 1 in a log loss: one confident miss would dominate everything.
LOG_LOSS_EPSILON = 1e-3


def log_loss(scores: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Per-event log loss of fraud probabilities against 0/1 labels (clipped, nats)."""
    p = np.clip(np.asarray(scores, dtype=np.float64), LOG_LOSS_EPSILON, 1 - LOG_LOSS_EPSILON)
    y = np.asarray(labels, dtype=np.float64)
    return np.asarray(-(y * np.log(p) + (1 - y) * np.log1p(-p)))


def label_log_loss(score: float, label: bool) -> float:
    """``log_loss`` of one labelled outcome, in plain floats (the concept detector's hot path)."""
    p = min(max(score, LOG_LOSS_EPSILON), 1 - LOG_LOSS_EPSILON)
    return -math.log(p) if label else -math.log1p(-p)


class NormalScores:
    """Maps each input to a standard normal score through the reference's distribution.

    ``u = F(x-) + F({x})/2`` (the mid-rank of ``x`` among the reference values), ``z =
    Phi^-1(u)``, then standardised by the reference's own mean and spread of ``z``: for a
    continuous input ``z`` is exactly N(0, 1) under the reference, whatever its shape (heavy
    tails, skew); a binary one becomes two values with mean 0 and variance 1. Shifts are
    therefore in units of the reference's spread, comparable across inputs."""

    def __init__(self, reference: np.ndarray) -> None:
        ref = np.asarray(reference, dtype=np.float64)
        if ref.ndim == 1:
            ref = ref[:, None]
        self.n = ref.shape[0]
        if self.n < 20:
            raise ValueError(f"a reference of {self.n} rows is too small")
        self.sorted = np.sort(ref, axis=0)
        raw = self._raw(ref)
        self.mean = raw.mean(axis=0)
        spread = raw.std(axis=0)
        self.constant = spread < 1e-9  # one value in the whole reference: nothing to compare
        self.std = np.where(self.constant, 1.0, spread)

    def _raw(self, x: np.ndarray) -> np.ndarray:
        u = np.empty_like(x, dtype=np.float64)
        for j in range(x.shape[1]):
            column = self.sorted[:, j]
            below = np.searchsorted(column, x[:, j], side="left")
            upto = np.searchsorted(column, x[:, j], side="right")
            u[:, j] = (below + upto) / 2.0
        u = np.clip(u, 0.5, self.n - 0.5) / self.n
        return np.asarray(ndtri(u))

    def transform(self, x: np.ndarray) -> np.ndarray:
        """Rows x inputs -> rows x inputs of standardised normal scores (0 for constant inputs)."""
        values = np.asarray(x, dtype=np.float64)
        if values.ndim == 1:
            values = values[:, None]
        z = (self._raw(values) - self.mean) / self.std
        z[:, self.constant] = 0.0
        return z


@dataclass
class RunState:
    """The current run of a detector: since when its statistic is above zero."""

    onset_time: float  # when the run began (epoch seconds)
    samples: int
    signal_sum: float


@dataclass(frozen=True)
class Alarm:
    """A statistic crossed its threshold at ``row`` of a batch (then restarted at 0)."""

    row: int
    column: int
    statistic: float
    onset_time: float
    samples: int
    signal_mean: float


class Cusum:
    """One-sided CUSUMs on ``columns`` parallel streams: ``S = max(0, S + x - k)``.

    ``update(x, raw, t)`` takes a batch (rows x columns) of increments (already centred: the
    reference mean subtracted), the raw signal values (for the mean since onset) and the
    rows' times, and returns the alarms in row order; an alarmed column restarts at 0. The
    recursion is computed for the whole batch at once (Lindley's solution: ``S_t = V_t -
    min(0, min_{s<=t} V_s)`` with ``V = S_0 + cumsum(x - k)``), and so is each column's run
    (since its statistic last was 0); only an alarm costs a recomputation, of its own column
    from its row on. The cost per event is a few array operations, not a Python step."""

    def __init__(self, columns: int, k: float | np.ndarray, threshold: float | np.ndarray) -> None:
        self.columns = columns
        self.k = np.broadcast_to(np.asarray(k, dtype=np.float64), (columns,)).copy()
        self.threshold = np.broadcast_to(np.asarray(threshold, dtype=np.float64), (columns,)).copy()
        self.statistic = np.zeros(columns)
        # the current run of each column (valid where statistic > 0)
        self.onset_time = np.zeros(columns)
        self.samples = np.zeros(columns, dtype=np.int64)
        self.signal_sum = np.zeros(columns)

    def update(
        self, x: np.ndarray, raw: np.ndarray, t: np.ndarray, muted: np.ndarray | None = None
    ) -> list[Alarm]:
        """``muted``: columns held at 0 for this batch (no alarm; their run restarts after)."""
        n = len(t)
        if not n:
            return []
        y = np.asarray(x, dtype=np.float64).reshape(n, self.columns) - self.k
        raw = np.asarray(raw, dtype=np.float64).reshape(n, self.columns)
        t = np.asarray(t, dtype=np.float64)
        s = _lindley(self.statistic, y)
        if muted is not None and muted.any():
            s[:, muted] = 0.0
        # a row where a column's run ended: its statistic is 0 there (or it alarmed there)
        ended = s <= 0.0
        crossed = np.flatnonzero((s > self.threshold).any(axis=0))
        alarms: list[Alarm] = []
        if len(crossed):
            sums = np.cumsum(raw, axis=0)
            for column in crossed.tolist():
                alarms += self._alarms(column, s, ended, y, raw, sums, t)
        self._carry(s, ended, raw, t)
        alarms.sort(key=lambda a: (a.row, a.column))
        return alarms

    def _alarms(
        self,
        c: int,
        s: np.ndarray,
        ended: np.ndarray,
        y: np.ndarray,
        raw: np.ndarray,
        sums: np.ndarray,
        t: np.ndarray,
    ) -> list[Alarm]:
        """Every alarm of column ``c`` in the batch; rewrites its path after each restart."""
        out: list[Alarm] = []
        threshold, n, begin = self.threshold[c], len(t), 0
        while True:
            over = np.flatnonzero(s[begin:, c] > threshold)
            if not len(over):
                return out
            row = begin + int(over[0])
            zeros = np.flatnonzero(ended[begin : row + 1, c])
            if len(zeros):
                first = begin + int(zeros[-1]) + 1
            elif begin == 0 and self.statistic[c] > 0.0:  # the run began before the batch
                first = -1
            else:
                first = begin
            if first < 0:
                onset = float(self.onset_time[c])
                samples = int(self.samples[c]) + row + 1
                total = float(self.signal_sum[c] + sums[row, c])
            else:
                onset = float(t[first])
                samples = row + 1 - first
                total = float(sums[row, c] - (sums[first - 1, c] if first else 0.0))
            out.append(Alarm(row, c, float(s[row, c]), onset, samples, total / max(samples, 1)))
            ended[row, c] = True  # the statistic restarts at 0 after an alarm
            s[row, c] = 0.0
            if row + 1 < n:
                tail = _lindley(np.zeros(1), y[row + 1 :, c : c + 1])[:, 0]
                s[row + 1 :, c] = tail
                ended[row + 1 :, c] = tail <= 0.0
            begin = row + 1

    def _carry(self, s: np.ndarray, ended: np.ndarray, raw: np.ndarray, t: np.ndarray) -> None:
        """Each column's run as of the batch's last row."""
        n = len(t)
        any_end = ended.any(axis=0)
        last_end = n - 1 - np.argmax(ended[::-1], axis=0)  # valid where any_end
        continuing = ~any_end & (self.statistic > 0.0)
        fresh = ~any_end & ~continuing
        totals = raw.sum(axis=0)
        # runs that began inside the batch, after their last end
        first = np.where(any_end, last_end + 1, 0)
        suffix = np.cumsum(raw[::-1], axis=0)[::-1]  # suffix[i] = sum of rows i..n-1
        padded = np.vstack([suffix, np.zeros((1, self.columns))])
        inside = padded[first, np.arange(self.columns)]
        self.signal_sum = np.where(continuing, self.signal_sum + totals, inside)
        self.samples = np.where(continuing, self.samples + n, n - first).astype(np.int64)
        onset_rows = np.minimum(first, n - 1)
        self.onset_time = np.where(continuing, self.onset_time, t[onset_rows])
        self.onset_time = np.where(fresh, t[0], self.onset_time)
        self.statistic = s[n - 1].copy()

    def reset(self) -> None:
        self.statistic[:] = 0.0


def _lindley(start: np.ndarray, y: np.ndarray) -> np.ndarray:
    """``S_t = max(0, S_{t-1} + y_t)`` from ``S_0 = start`` for every row of ``y``."""
    v = start + np.cumsum(y, axis=0)
    return np.asarray(v - np.minimum(np.minimum.accumulate(v, axis=0), 0.0))


class ScalarCusum:
    """``Cusum`` for one stream in plain Python floats, one event at a time (the concept
    detector: labels come one by one, and numpy's call overhead would dominate)."""

    def __init__(self, k: float, threshold: float) -> None:
        self.k = k
        self.threshold = threshold
        self.statistic = 0.0
        self.run = RunState(0.0, 0, 0.0)

    def update(self, x: float, raw: float, t: float = 0.0) -> bool:
        s = self.statistic + x - self.k
        if s > 0.0:
            if self.statistic <= 0.0:
                self.run = RunState(t, 0, 0.0)
            self.run.samples += 1
            self.run.signal_sum += raw
            self.statistic = s
        else:
            self.statistic = 0.0
        return self.statistic > self.threshold

    def reset(self) -> None:
        self.statistic = 0.0


class Mcusum:
    """Pignatiello and Runger's multivariate CUSUM "MC1" (J. Quality Technology 22, 1990) on
    standardised vectors with covariance ``covariance``:

    ``C`` = the sum of ``z`` since the run began, ``n`` its length, statistic ``max(0,
    ||C||_M - k n)`` (Mahalanobis norm); the run restarts when the statistic is 0. Under the
    reference ``||C||`` grows like ``sqrt(n)`` and the statistic keeps returning to 0; a
    shift ``d`` makes it grow like ``n (||d||_M - k)``. ``C / n`` estimates each input's shift
    since the onset, which names the inputs that moved."""

    def __init__(self, covariance: np.ndarray, k: float, threshold: float) -> None:
        # rcond: one-hot inputs (the channels) are linearly dependent; their null direction
        # carries only rounding noise, which a plain pseudo-inverse would amplify
        precision = np.linalg.pinv(np.asarray(covariance, dtype=np.float64), rcond=1e-6)
        # ||c||_M = ||c @ whiten||: precision = whiten @ whiten.T
        values, vectors = np.linalg.eigh((precision + precision.T) / 2)
        self.whiten = vectors * np.sqrt(np.clip(values, 0.0, None))
        self.k = k
        self.threshold = threshold
        dims = precision.shape[0]
        self.statistic = 0.0
        self.z_sum = np.zeros(dims)
        self.raw_sum = np.zeros(dims)
        self.samples = 0
        self.onset_time = 0.0

    def update(
        self, z: np.ndarray, raw: np.ndarray, t: np.ndarray, muted: bool = False
    ) -> list[Alarm]:
        """A batch of rows; returns the alarms (column 0) in row order. ``muted``: held at 0
        for this batch (no alarm; the run restarts after)."""
        if muted:
            self.statistic = 0.0
            return []
        alarms: list[Alarm] = []
        n = len(t)
        pos, window = 0, 64
        while pos < n:
            stop = min(n, pos + window)
            continuing = self.statistic > 0.0
            base_z = self.z_sum if continuing else np.zeros_like(self.z_sum)
            base_n = self.samples if continuing else 0
            c = base_z + np.cumsum(z[pos:stop], axis=0)
            counts = base_n + np.arange(1, stop - pos + 1)
            stat = np.maximum(np.linalg.norm(c @ self.whiten, axis=1) - self.k * counts, 0.0)
            events = np.flatnonzero((stat <= 0.0) | (stat > self.threshold))
            end = int(events[0]) if len(events) else stop - pos - 1
            raw_sum = (self.raw_sum if continuing else 0.0) + raw[pos : pos + end + 1].sum(axis=0)
            if not continuing:
                self.onset_time = float(t[pos])
            if not len(events):  # the run goes on past this window
                self.z_sum, self.raw_sum, self.samples = c[end], raw_sum, int(counts[end])
                self.statistic = float(stat[end])
                pos, window = stop, window * 2
                continue
            if stat[end] > self.threshold:
                samples = int(counts[end])
                self.z_sum, self.raw_sum, self.samples = c[end], raw_sum, samples
                alarms.append(
                    Alarm(pos + end, 0, float(stat[end]), self.onset_time, samples, math.nan)
                )
            self.statistic = 0.0  # alarm (restart) or back to zero (the run ended)
            pos += end + 1
            window = 64
        return alarms

    def reset(self) -> None:
        self.statistic = 0.0


# --------------------------------------------------------------------------- calibration


@dataclass(frozen=True)
class Calibration:
    """A threshold found by simulation, and what it rests on."""

    threshold: float
    target_run_length: float  # expected events between false alarms aimed at
    simulated_events: int
    excursions: int  # runs of the statistic above zero in the simulation
    tail_rate: float  # fitted exponential rate of the excursion maxima's tail


def excursion_maxima(path: np.ndarray) -> np.ndarray:
    """The maximum of each excursion of a non-negative path above zero."""
    above = path > 0
    if not above.any():
        return np.zeros(0)
    edges = np.diff(np.r_[0, above.astype(np.int8), 0])
    starts, ends = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
    return np.maximum.reduceat(path, starts)[: len(ends)] if len(starts) else np.zeros(0)


def threshold_from_maxima(
    maxima: np.ndarray, events: int, target_run_length: float, *, tail: int = 1000
) -> Calibration:
    """The threshold ``h`` at which the expected events between false alarms is
    ``target_run_length``, from the excursion maxima of ``events`` simulated null events.

    Alarms at ``h`` happen in the excursions whose maximum exceeds ``h``; the maxima's tail is
    exponential, ``P(M > u + t | M > u) = exp(-theta t)``: ``theta`` is fitted (maximum
    likelihood) on the ``tail`` largest maxima above ``u`` and ``h`` solves
    ``events / (n_u exp(-theta (h - u))) = target``."""
    maxima = np.sort(np.asarray(maxima, dtype=np.float64))[::-1]
    if len(maxima) < 20:
        # the statistic (almost) never leaves 0 on the reference (say, the fall of a binary
        # input that is nearly always 0): nothing to extrapolate; twice the highest value seen
        # (at least 1) is far beyond anything the reference produces
        highest = float(maxima[0]) if len(maxima) else 0.0
        return Calibration(max(2 * highest, 1.0), target_run_length, events, len(maxima), math.nan)
    n_tail = min(tail, len(maxima) - 1)
    u = float(maxima[n_tail])
    excess = maxima[:n_tail] - u
    theta = 1.0 / max(float(excess.mean()), 1e-12)
    # alarms expected per event at u: n_tail / events
    h = u + math.log(max(target_run_length * n_tail / events, 1.0)) / theta
    return Calibration(h, target_run_length, events, len(maxima), theta)


def cusum_path(x: np.ndarray, k: float) -> np.ndarray:
    """The statistic of a one-sided CUSUM (no threshold) after each increment of ``x``
    (rows x columns, or one column), by Lindley's solution of the recursion."""
    values = np.asarray(x, dtype=np.float64)
    v = np.cumsum(values - k, axis=0)
    return np.asarray(v - np.minimum(np.minimum.accumulate(v, axis=0), 0.0))


def scalar_cusum_path(x: np.ndarray, k: float) -> np.ndarray:
    return cusum_path(x, k)


def mcusum_path(z: np.ndarray, covariance: np.ndarray, k: float) -> np.ndarray:
    """The MC1 statistic (no threshold) after each row of ``z``."""
    detector = Mcusum(covariance, k, math.inf)
    out = np.empty(z.shape[0])
    chunk = 4096
    times = np.zeros(chunk)
    for start in range(0, z.shape[0], chunk):
        rows = z[start : start + chunk]
        # the statistic after each row: replay the batch row-blockwise (cheap: vectorised)
        out[start : start + len(rows)] = _mc1_statistics(detector, rows, times[: len(rows)])
    return out


def _mc1_statistics(detector: Mcusum, z: np.ndarray, t: np.ndarray) -> np.ndarray:
    out = np.empty(len(z))
    pos, window = 0, 64
    while pos < len(z):
        stop = min(len(z), pos + window)
        continuing = detector.statistic > 0.0
        base_z = detector.z_sum if continuing else np.zeros_like(detector.z_sum)
        base_n = detector.samples if continuing else 0
        c = base_z + np.cumsum(z[pos:stop], axis=0)
        counts = base_n + np.arange(1, stop - pos + 1)
        stat = np.maximum(np.linalg.norm(c @ detector.whiten, axis=1) - detector.k * counts, 0.0)
        zeros = np.flatnonzero(stat <= 0.0)
        end = int(zeros[0]) if len(zeros) else stop - pos - 1
        out[pos : pos + end + 1] = stat[: end + 1]
        detector.z_sum, detector.samples = c[end], int(counts[end])
        detector.statistic = float(stat[end])
        window = 64 if len(zeros) else window * 2
        pos += end + 1
    return out
