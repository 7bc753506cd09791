"""The monitoring service as a process (``python -m services.monitoring``) against the real
broker: predictions.log records become Prometheus metrics on /metrics, unreadable records are
counted without stopping it, and committed offsets survive a restart."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from services.cli.localinfra import free_port, wait_until
from services.shared.codecs import protobuf_headers
from services.shared.kafka import create_producer
from services.shared.proto.mlops.v1 import monitoring_pb2
from services.shared.settings import PROJECT_ROOT, KafkaSettings
from services.shared.topics import Topics


class MonitoringProcess:
    def __init__(self, kafka: KafkaSettings, log_path: Path) -> None:
        self.port = free_port()
        env = {
            **os.environ,
            "MLOPS_KAFKA_BOOTSTRAP": kafka.bootstrap,
            "MLOPS_KAFKA_BROKER_FLAVOR": kafka.broker_flavor,
            "MLOPS_KAFKA_TOPIC_PREFIX": kafka.topic_prefix,
            "MLOPS_KAFKA_PARTITIONS": str(kafka.partitions),
            "MLOPS_KAFKA_SESSION_TIMEOUT_MS": str(kafka.session_timeout_ms),
            "MLOPS_MONITORING_METRICS_PORT": str(self.port),
            "MLOPS_MONITORING_LAG_INTERVAL_S": "0.5",
        }
        self._log = log_path.open("ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "services.monitoring"],
            cwd=PROJECT_ROOT,
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        wait_until(
            lambda: self.sample("mlops_service_ready", service="monitoring") == 1.0,
            60,
            "monitoring ready",
            interval_s=0.2,
            alive=lambda: self.process.poll() is None,
        )

    def samples(self) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=2) as r:
                text = r.read().decode()
        except OSError:
            return {}
        return {
            (s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
        }

    def sample(self, name: str, **labels: str) -> float | None:
        return self.samples().get((name, frozenset(labels.items())))

    def total(self, name: str) -> float:
        return sum(v for (n, _), v in self.samples().items() if n == name)

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(20)
        finally:
            if self.process.poll() is None:
                self.process.kill()
                self.process.wait()
            self._log.close()


@pytest.fixture
def start_monitoring(kafka: KafkaSettings, tmp_path: Path) -> Iterator[type[MonitoringProcess]]:
    started: list[MonitoringProcess] = []

    class Started(MonitoringProcess):
        def __init__(self) -> None:
            super().__init__(kafka, tmp_path / "monitoring.log")
            started.append(self)

    yield Started  # type: ignore[misc]
    for process in started:
        process.stop()


def _prediction(i: int, version: int, *, flagged: bool, degraded: bool) -> bytes:
    record = monitoring_pb2.PredictionRecord(
        request_id=f"r-{i}",
        fraud_probability=0.9 if flagged else 0.1,
        flagged=flagged,
        model_name="fraud_detector",
        model_version=version,
        route=monitoring_pb2.ROUTE_CANARY if version == 2 else monitoring_pb2.ROUTE_PRODUCTION,
        degraded=degraded,
        latency_ms=1.5,
    )
    record.transaction.transaction_id = f"t-{i}"
    record.predicted_at.FromDatetime(datetime.now(UTC))
    return record.SerializeToString()


async def _publish(
    kafka: KafkaSettings, values: list[bytes], *, every_partition: bool = False
) -> None:
    producer = create_producer(kafka, client_id="test-monitoring")
    await producer.start()
    try:
        headers = protobuf_headers(monitoring_pb2.PredictionRecord())
        topic = Topics.from_settings(kafka).predictions
        for i, value in enumerate(values):
            partition = i % kafka.partitions if every_partition else None
            await producer.send(
                topic, value, key=f"t-{i}".encode(), headers=headers, partition=partition
            )
        await producer.flush()
    finally:
        await producer.stop()


def _wait_for(condition: object, what: str, process: MonitoringProcess) -> None:
    wait_until(
        condition,  # type: ignore[arg-type]
        60,
        what,
        interval_s=0.2,
        alive=lambda: process.process.poll() is None,
    )


async def test_predictions_become_metrics_and_offsets_survive_a_restart(
    kafka: KafkaSettings, start_monitoring: type[MonitoringProcess]
) -> None:
    monitoring = start_monitoring()
    # 30 from production v1 (10 declined, 6 degraded), 10 from canary v2, 2 unreadable
    values = [_prediction(i, 1, flagged=i < 10, degraded=i % 5 == 0) for i in range(30)]
    values += [_prediction(100 + i, 2, flagged=False, degraded=False) for i in range(10)]
    values += [b"\xff\xff not protobuf", b""]
    await _publish(kafka, values)

    name = "mlops_monitoring_predictions_total"
    _wait_for(lambda: monitoring.total(name) == 40, "40 predictions counted", monitoring)
    v1 = {"model_name": "fraud_detector", "model_version": "1", "route": "production"}
    assert monitoring.sample(name, **v1, decision="decline") == 10
    assert monitoring.sample(name, **v1, decision="approve") == 20
    assert (
        monitoring.sample(
            name, model_name="fraud_detector", model_version="2", route="canary", decision="approve"
        )
        == 10
    )
    assert (
        monitoring.sample(
            "mlops_monitoring_degraded_predictions_total",
            model_name="fraud_detector",
            model_version="1",
        )
        == 6
    )
    assert (
        monitoring.sample(
            "mlops_monitoring_fraud_probability_count",
            model_name="fraud_detector",
            model_version="1",
        )
        == 30
    )
    assert monitoring.total("mlops_monitoring_prediction_log_delay_seconds_count") == 40
    _wait_for(
        lambda: monitoring.total("mlops_monitoring_records_rejected_total") == 2,
        "2 rejected records",
        monitoring,
    )
    assert (
        monitoring.sample("mlops_monitoring_records_rejected_total", reason_code="empty_record")
        == 1
    )
    # every partition read to the end: lag 0 on each, reported from the fetch high watermark
    topic = Topics.from_settings(kafka).predictions

    def lags() -> dict[str, float]:
        return {
            dict(labels)["partition"]: value
            for (n, labels), value in monitoring.samples().items()
            if n == "mlops_monitoring_consumer_lag_records" and dict(labels)["topic"] == topic
        }

    _wait_for(
        lambda: len(lags()) == kafka.partitions and set(lags().values()) == {0.0},
        "lag 0 on every partition",
        monitoring,
    )
    assert monitoring.stop() == 0  # SIGTERM: a clean stop

    # A new process resumes after the committed offsets. The new records (version 3) go to
    # every partition after the old ones: had it re-read anything, the old records would be
    # counted before the new ones.
    restarted = start_monitoring()
    await _publish(
        kafka,
        [_prediction(200 + i, 3, flagged=False, degraded=False) for i in range(6)],
        every_partition=True,
    )
    v3 = {"model_name": "fraud_detector", "model_version": "3", "route": "production"}
    _wait_for(
        lambda: restarted.sample(name, **v3, decision="approve") == 6,
        "6 new predictions counted",
        restarted,
    )
    assert restarted.total(name) == 6
    assert restarted.total("mlops_monitoring_records_rejected_total") == 0
