"""Training-serving skew, sampled and continuous: a share of served predictions has its model
inputs recomputed offline, point in time (services/shared/feature_recompute.py, what
training would have computed for the same transaction), and every difference is counted
per model input and exported to Prometheus (alert TrainingServingSkew).

- ``SkewSampler`` (domain): which predictions are sampled (a hash of the transaction id, so
  a given transaction is always or never sampled, whoever reads), the rows waiting until the
  offline feature log has them (``min_age_s``), and the comparison of a batch into metrics.
- ``SkewReader`` (Kafka transport): its own consumer group on predictions.log; only sampled
  keys are decoded. Sampling is best effort by design: records skipped while the comparison
  runs behind are counted (``outcome="dropped"``), never a reason to slow monitoring down.

Shadow answers are skipped (never returned, same inputs as the answered one), and so are
degraded answers (default features on purpose, not skew): both counted.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Callable, Sequence

from aiokafka import AIOKafkaConsumer
from aiokafka.errors import KafkaError
from google.protobuf.message import DecodeError
from prometheus_client import CollectorRegistry, Counter, Gauge

from services.monitoring.settings import SkewSettings
from services.shared.codecs import decode_protobuf
from services.shared.errors import PlatformError
from services.shared.feature_recompute import OfflineFeatureRecomputer, Recomputed, ServedRow
from services.shared.kafka import create_consumer
from services.shared.logging import get_logger
from services.shared.partitioning import murmur2
from services.shared.prediction_trace import served_row
from services.shared.proto.mlops.v1 import monitoring_pb2
from services.shared.settings import KafkaSettings
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


class SkewReader:
    """predictions.log -> ``SkewSampler``; compares a round every ``interval_s``."""

    def __init__(
        self, consumer: AIOKafkaConsumer, sampler: SkewSampler, *, interval_s: float
    ) -> None:
        self._consumer = consumer
        self._sampler = sampler
        self._interval_s = interval_s

    async def run(self, stop: asyncio.Event) -> None:
        comparing: asyncio.Task[list[Recomputed]] | None = None
        next_round = time.monotonic() + self._interval_s
        try:
            while not stop.is_set():
                batches = await self._consumer.getmany(timeout_ms=500, max_records=5000)
                for records in batches.values():
                    for record in records:
                        if not self._sampler.wants(record.key):
                            continue
                        try:
                            self._sampler.offer(
                                decode_protobuf(
                                    record.value or b"", monitoring_pb2.PredictionRecord
                                )
                            )
                        except DecodeError:
                            continue  # counted by the main reader (records_rejected_total)
                if batches:
                    with contextlib.suppress(KafkaError):  # a sample: a lost commit re-reads
                        await self._consumer.commit()
                if time.monotonic() >= next_round and (comparing is None or comparing.done()):
                    next_round = time.monotonic() + self._interval_s
                    rows = self._sampler.due()
                    if rows:
                        comparing = asyncio.create_task(
                            asyncio.to_thread(self._sampler.compare, rows)
                        )
        finally:
            if comparing is not None and not comparing.done():
                with contextlib.suppress(asyncio.CancelledError):
                    await comparing


async def run_skew_sampling(
    kafka: KafkaSettings, topic: str, registry: CollectorRegistry, stop: asyncio.Event
) -> None:
    """Monitoring's skew task, built from ``SkewSettings``; returns at ``stop``."""
    settings = SkewSettings()
    if not settings.enabled or settings.sample_rate == 0:
        log.info("skew_sampling_off")
        return
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
    # a new group starts at the end: the sample is of what is served from now on
    consumer = create_consumer(
        kafka,
        topic,
        group_id=settings.group_id,
        client_id="monitoring-skew",
        auto_offset_reset="latest",
    )
    await consumer.start()
    log.info(
        "skew_sampling",
        topic=topic,
        sample_rate=settings.sample_rate,
        interval_s=settings.interval_s,
    )
    try:
        await SkewReader(consumer, sampler, interval_s=settings.interval_s).run(stop)
    finally:
        await consumer.stop()
