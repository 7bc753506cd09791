"""Training-serving skew, sampled and continuous: a share of served predictions has its model
inputs recomputed offline, point in time (services/shared/feature_recompute.py, what
training would have computed for the same transaction), and every difference is counted
per model input and exported to Prometheus (alert TrainingServingSkew).

- ``SkewSampler`` (domain): which predictions are sampled (a hash of the transaction id, so
  a given transaction is always or never sampled, whoever reads), the rows waiting until the
  offline feature log has them (``min_age_s``), and the comparison of a batch into metrics.
- The monitoring service's one reader of predictions.log (reader.py) offers it the sampled
  predictions, each once, and starts a comparison round every ``interval_s`` in a thread.
  Sampling is best effort by design: records skipped while the comparison runs behind are
  counted (``outcome="dropped"``), never a reason to slow monitoring down.

Shadow answers are skipped (never returned, same inputs as the answered one), and so are
degraded answers (default features on purpose, not skew): both counted.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge

from services.monitoring.settings import SkewSettings
from services.shared.errors import PlatformError
from services.shared.feature_recompute import OfflineFeatureRecomputer, Recomputed, ServedRow
from services.shared.logging import get_logger
from services.shared.partitioning import murmur2
from services.shared.prediction_trace import served_row
from services.shared.proto.mlops.v1 import monitoring_pb2
from services.shared.usecase.features import MODEL_INPUTS

log = get_logger("monitoring.skew")


class SkewMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.ratio = Gauge(
            "mlops_monitoring_feature_skew_ratio",
            "Share of the last compared sample whose model input differs from its offline "
            "point-in-time recomputation, by model input",
            ["feature"],
            registry=registry,
        )
        self.difference = Gauge(
            "mlops_monitoring_feature_skew_abs_difference",
            "Mean absolute difference served - recomputed in the last compared sample",
            ["feature"],
            registry=registry,
        )
        self.samples = Counter(
            "mlops_monitoring_skew_samples_total",
            "Sampled predictions, by outcome (equal, skewed, skipped_shadow, skipped_degraded, "
            "dropped, failed)",
            ["outcome"],
            registry=registry,
        )
        self.last_compared = Gauge(
            "mlops_monitoring_skew_last_compared_timestamp_seconds",
            "When a sample was last compared (epoch seconds)",
            registry=registry,
        )


class SkewSampler:
    def __init__(
        self,
        recomputer: OfflineFeatureRecomputer,
        metrics: SkewMetrics,
        *,
        sample_rate: float,
        min_age_s: float,
        max_batch: int,
        max_waiting: int,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._recomputer = recomputer
        self._metrics = metrics
        self._threshold = int(sample_rate * 0x10000)
        self._min_age_s = min_age_s
        self._max_batch = max_batch
        self._waiting: deque[tuple[float, ServedRow]] = deque()
        self._max_waiting = max_waiting
        self._clock = clock

    def wants(self, key: bytes | None) -> bool:
        """Whether the prediction of this transaction id is sampled (decided by its key)."""
        return key is not None and (murmur2(key) & 0xFFFF) < self._threshold

    def offer(self, record: monitoring_pb2.PredictionRecord) -> None:
        if record.route == monitoring_pb2.ROUTE_SHADOW:
            self._metrics.samples.labels("skipped_shadow").inc()
            return
        if record.degraded:
            self._metrics.samples.labels("skipped_degraded").inc()
            return
        if len(self._waiting) >= self._max_waiting:
            self._metrics.samples.labels("dropped").inc()
            return
        predicted = record.predicted_at.ToSeconds() if record.HasField("predicted_at") else 0.0
        self._waiting.append((predicted or self._clock(), served_row(record)))

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def due(self) -> list[ServedRow]:
        """The oldest waiting rows old enough to compare (at most ``max_batch``)."""
        ready_before = self._clock() - self._min_age_s
        rows: list[ServedRow] = []
        while self._waiting and len(rows) < self._max_batch and self._waiting[0][0] <= ready_before:
            rows.append(self._waiting.popleft()[1])
        return rows

    def compare(self, rows: Sequence[ServedRow]) -> list[Recomputed]:
        """Blocking (Feast): recompute ``rows`` and export what differs."""
        try:
            results = self._recomputer.recompute(rows)
        except (PlatformError, OSError, ValueError, KeyError) as exc:
            self._metrics.samples.labels("failed").inc(len(rows))
            log.warning("skew_compare_failed", rows=len(rows), error=repr(exc))
            return []
        self.export(results)
        return results

    def export(self, results: Sequence[Recomputed]) -> None:
        if not results:
            return
        for name in MODEL_INPUTS:
            comparisons = [next(c for c in r.inputs if c.name == name) for r in results]
            skewed = sum(c.skewed for c in comparisons)
            differences = [abs(c.difference) for c in comparisons if c.difference is not None]
            self._metrics.ratio.labels(name).set(skewed / len(comparisons))
            self._metrics.difference.labels(name).set(
                sum(differences) / len(differences) if differences else 0.0
            )
        skewed_rows = [r for r in results if r.skewed]
        self._metrics.samples.labels("skewed").inc(len(skewed_rows))
        self._metrics.samples.labels("equal").inc(len(results) - len(skewed_rows))
        self._metrics.last_compared.set(self._clock())
        log.info("skew_compared", rows=len(results), skewed=len(skewed_rows))
        for row in skewed_rows[:5]:  # examples to trace: `mlops trace TRANSACTION_ID`
            log.info("skew_example", transaction_id=row.transaction_id, inputs=",".join(row.skewed))


def skew_sampler(registry: CollectorRegistry) -> tuple[SkewSampler, float] | None:
    """Monitoring's skew sampler and the seconds between its rounds, from ``SkewSettings``
    (None: sampling is off)."""
    settings = SkewSettings()
    if not settings.enabled or settings.sample_rate == 0:
        log.info("skew_sampling_off")
        return None
    sampler = SkewSampler(
        OfflineFeatureRecomputer(
            settings.feast, settings.redis, settings.storage, tolerance=settings.tolerance
        ),
        SkewMetrics(registry),
        sample_rate=settings.sample_rate,
        min_age_s=settings.min_age_s,
        max_batch=settings.max_batch,
        max_waiting=settings.max_waiting,
    )
    log.info("skew_sampling", sample_rate=settings.sample_rate, interval_s=settings.interval_s)
    return sampler, settings.interval_s
