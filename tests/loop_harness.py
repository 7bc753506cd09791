"""The closed loop on a real local stack (tests and the loop benchmark).

- ``LoopStack``: `mlops stack up` on free ports with a var directory of its own (every
  component a real process: Tansu, Redis, Triton, MLflow, Prometheus, the seven services),
  `mlops bootstrap` for the first production model, `mlops stack down` at the end; the
  autopilot's API, the registry and the lifecycle topic as the test reads them.
- ``run_traffic``: live simulated card payments published to Kafka *and* scored through
  serving's Predict (``PredictTraffic``), with labels after a delay, until a condition holds.
- ``constant_candidate``: a deliberately bad model (one constant probability) registered
  through the registry's normal path with a held-out set on which it looks better than
  production (the labels are the rows production scores lowest: a labelling bug in the
  candidate's data), so the gate lets it through and only the live judgement can stop it.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import json
import math
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
import httpx
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from google.protobuf.json_format import ParseDict

from services.cli.localstack import StackSettings
from services.cli.simulate import Predictor, PublishStats, publish
from services.cli.simulator import SimEvent, SimulationConfig, TrafficSimulator
from services.shared import run_contract as rc
from services.shared.codecs import header
from services.shared.kafka import create_consumer
from services.shared.proto.mlops.v1 import events_pb2, models_pb2, predictor_pb2
from services.shared.registry_client import RegistryClient
from services.shared.settings import PROJECT_ROOT, KafkaSettings, RegistryClientSettings
from services.shared.topics import Topics

# the loop's timings for a test: the mechanism, with the smallest samples that still decide
# (the benchmark runs the defaults)
FAST_LOOP = {
    "MLOPS_AUTOPILOT_TICK_S": "1",
    "MLOPS_AUTOPILOT_JUDGE_INTERVAL_S": "4",
    "MLOPS_AUTOPILOT_COOLDOWN_S": "0",
    "MLOPS_AUTOPILOT_TRAINING_TIMEOUT_S": "300",  # a failed training is asked again sooner
    "MLOPS_AUTOPILOT_MIN_NEW_LABELS": "100",
    "MLOPS_AUTOPILOT_PAIRED_MIN_PAIRS": "200",
    "MLOPS_AUTOPILOT_PAIRED_MIN_POSITIVES": "10",
    "MLOPS_AUTOPILOT_SETTLE_S": "5",
    "MLOPS_AUTOPILOT_CANARY_PERCENT": "20",
    "MLOPS_AUTOPILOT_CANARY_MIN_REQUESTS": "60",
    "MLOPS_AUTOPILOT_CANARY_MIN_S": "12",
    "MLOPS_AUTOPILOT_WATCH_S": "10",
    "MLOPS_STACK_SCRAPE_INTERVAL_S": "2",
    "MLOPS_REGISTRY_RETIRE_GRACE_S": "5",
    "MLOPS_TRAINING_PARAM_EPOCHS": "15",
    # the shift under test is a concept shift; the data detectors meanwhile see the 1 h and
    # 24 h counts still filling up after half an hour of history (real drift in that world)
    # and would start cycles of their own that hold the concept event back
    "MLOPS_AUTOPILOT_DRIFT_KINDS": '["concept"]',
    # the concept detector's baseline: 1,000 labelled outcomes (not 2,000) so that a test's
    # shift can come a minute into the traffic; its threshold is still calibrated to the
    # same false-alarm rate
    "MLOPS_MONITORING_DRIFT_CONCEPT_WARMUP": "1000",
}


# the simulated world of the loop's tests and benchmark: live traffic at RATE transactions/s
# over USERS card holders, after a bootstrap history (HISTORY_DAYS) about the same people (the
# same seed, users and merchants) and as dense per card holder as that traffic, so that the
# first model sees live traffic like what it was trained on (the default history, 3 payments a
# day, would make every live card holder look like a burst of fraud)
SEED = 42
RATE = 20.0
USERS = 2000
FRAUD_RATE = 0.05
HISTORY_DAYS = 0.02


def _free_ports(names: list[str]) -> dict[str, str]:
    with contextlib.ExitStack() as held:  # held together: no two components share a port
        sockets = [held.enter_context(socket.create_server(("127.0.0.1", 0))) for _ in names]
        return {
            f"MLOPS_STACK_{name.upper()}": str(sock.getsockname()[1])
            for name, sock in zip(names, sockets, strict=True)
        }


class LoopStack:
    def __init__(self, var_dir: Path, overrides: dict[str, str] | None = None) -> None:
        names = [name for name in StackSettings.model_fields if name.endswith("_port")]
        self.var_dir = var_dir
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("MLOPS_")},
            **_free_ports(names),
            "MLOPS_STACK_VAR_DIR": str(var_dir),
            "COLUMNS": "200",
            **(overrides or {}),
        }
        self.settings = StackSettings(
            var_dir=var_dir,
            **{
                n: int(self.env[f"MLOPS_STACK_{n.upper()}"])
                for n in names
                if f"MLOPS_STACK_{n.upper()}" in self.env
            },
        )

    def mlops(self, *args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "services.cli.main", *args],
            env=self.env,
            cwd=PROJECT_ROOT,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def up(self) -> None:
        result = self.mlops("stack", "up", "--timeout", "300")
        if result.returncode != 0:
            raise RuntimeError(f"mlops stack up failed:\n{result.stdout}\n{result.stderr}")
        exports = self.mlops("stack", "env").stdout
        for line in exports.splitlines():
            name, _, value = line.removeprefix("export ").partition("=")
            self.env[name] = value.strip("'")

    def bootstrap(
        self, rate: float = RATE, users: int = USERS, fraud_rate: float = FRAUD_RATE
    ) -> str:
        result = self.mlops(
            "bootstrap",
            "--days",
            str(HISTORY_DAYS),
            "--transactions-per-user-per-day",
            str(rate * 86_400 / users),
            "--users",
            str(users),
            "--seed",
            str(SEED),
            "--fraud-rate",
            str(fraud_rate),
            "--timeout",
            "300",
        )
        if result.returncode != 0:
            raise RuntimeError(f"mlops bootstrap failed:\n{result.stdout}\n{result.stderr}")
        return result.stdout

    def down(self) -> None:
        self.mlops("stack", "down", timeout=180)

    # ------------------------------------------------------------------ reading

    @property
    def kafka(self) -> KafkaSettings:
        return KafkaSettings(
            bootstrap=self.env["MLOPS_KAFKA_BOOTSTRAP"], broker_flavor="tansu", partitions=4
        )

    @property
    def serving_address(self) -> str:
        return f"127.0.0.1:{self.settings.serving_grpc_port}"

    def registry(self, actor: str = "test") -> RegistryClient:
        return RegistryClient(
            RegistryClientSettings(
                address=self.env["MLOPS_REGISTRY_CLIENT_ADDRESS"],
                token_file=Path(self.env["MLOPS_REGISTRY_CLIENT_TOKEN_FILE"]),
            ),
            actor=actor,
        )

    @property
    def loop_url(self) -> str:
        return self.env["MLOPS_AUTOPILOT_CLIENT_URL"]

    def loop_status(self) -> dict[str, Any]:
        return dict(httpx.get(f"{self.loop_url}/api/v1/loop", timeout=5).json())

    def loop_history(self) -> list[dict[str, Any]]:
        body = httpx.get(f"{self.loop_url}/api/v1/loop/history?limit=100", timeout=5).json()
        return list(body["cycles"])

    def cycle_of(self, version: int) -> dict[str, Any] | None:
        return next((c for c in self.loop_history() if c["candidate_version"] == version), None)


async def lifecycle_events(
    kafka: KafkaSettings, quiet_s: float = 2.0
) -> list[models_pb2.ModelEvent]:
    """Every ModelEvent on models.lifecycle so far (read until ``quiet_s`` brings nothing)."""
    topic = Topics.from_settings(kafka).lifecycle
    consumer = create_consumer(kafka, topic, group_id=None, client_id="test-lifecycle")
    await consumer.start()
    events: list[models_pb2.ModelEvent] = []
    try:
        quiet_since = time.monotonic()
        while time.monotonic() - quiet_since < quiet_s:
            batches = await consumer.getmany(timeout_ms=300)
            for records in batches.values():
                for record in records:
                    assert header(record.headers, "message-type") == "mlops.v1.ModelEvent"
                    event = models_pb2.ModelEvent()
                    event.ParseFromString(record.value)
                    events.append(event)
                    quiet_since = time.monotonic()
    finally:
        await consumer.stop()
    return sorted(events, key=lambda e: e.occurred_at.ToNanoseconds())


@dataclass(frozen=True, slots=True)
class PredictOutcome:
    sent_at: float  # time.monotonic() when the call was made
    transaction_id: str
    is_fraud: bool
    ok: bool
    code: str  # "OK" or the gRPC status code's name
    version: int
    route: int
    declined: bool
    latency_s: float


class RecordingPredictor(Predictor):
    """``mlops simulate``'s Predictor (one call per transaction, before it is published),
    keeping every answer: which version answered on which route, the decision, the latency,
    and the simulator's ground truth."""

    def __init__(self, address: str) -> None:
        super().__init__(address, timeout_s=2.0)
        self.truth: dict[str, bool] = {}
        self.outcomes: list[PredictOutcome] = []

    async def predict(self, value: dict[str, Any], stats: PublishStats) -> None:
        transaction = ParseDict(value, events_pb2.Transaction(), ignore_unknown_fields=True)
        is_fraud = self.truth.pop(transaction.transaction_id, False)
        sent = time.monotonic()
        try:
            answer = await self._stub.Predict(
                predictor_pb2.PredictRequest(transaction=transaction), timeout=self.timeout_s
            )
        except grpc.aio.AioRpcError as exc:
            stats.predict_errors[exc.code().name] = stats.predict_errors.get(exc.code().name, 0) + 1
            self.outcomes.append(
                PredictOutcome(
                    sent,
                    transaction.transaction_id,
                    is_fraud,
                    False,
                    exc.code().name,
                    0,
                    0,
                    False,
                    time.monotonic() - sent,
                )
            )
            return
        stats.predictions += 1
        self.outcomes.append(
            PredictOutcome(
                sent,
                transaction.transaction_id,
                is_fraud,
                True,
                "OK",
                int(answer.model_version),
                int(answer.route),
                answer.decision == predictor_pb2.DECISION_DECLINE,
                time.monotonic() - sent,
            )
        )

    @property
    def failed(self) -> list[PredictOutcome]:
        return [o for o in self.outcomes if not o.ok]

    def latency_quantile(self, q: float, since: float = 0.0, until: float = math.inf) -> float:
        values = sorted(o.latency_s for o in self.outcomes if o.ok and since <= o.sent_at < until)
        return values[min(len(values) - 1, int(q * len(values)))] if values else math.nan


@dataclass
class TrafficRun:
    traffic: RecordingPredictor
    started: float  # time.monotonic()
    started_at: datetime
    drift_at_s: float | None


async def run_traffic(
    stack: LoopStack,
    until: Callable[[], bool],
    *,
    rate: float = RATE,
    label_delay_s: float = 5.0,
    fraud_rate: float = FRAUD_RATE,
    concept_drift_at: float | None = None,
    timeout_s: float = 600.0,
    seed: int = SEED,
    users: int = USERS,
    poll_s: float = 2.0,
) -> TrafficRun:
    """Live traffic (Predict, then Kafka) until ``until()`` holds (checked every ``poll_s``
    in a thread) or ``timeout_s`` passes; returns every Predict outcome."""
    config = SimulationConfig(
        seed=seed,
        users=users,
        fraud_rate=fraud_rate,
        transactions_per_user_per_day=rate * 86_400 / users,  # the bootstrap history's
        label_delay_s=label_delay_s,
        concept_drift_at=concept_drift_at,
    )
    simulator = TrafficSimulator(config)
    started_at = datetime.now(UTC)
    stop = asyncio.Event()
    traffic = RecordingPredictor(stack.serving_address)

    def events() -> Iterator[SimEvent]:
        for event in simulator.live(started_at, duration_s=timeout_s):
            if stop.is_set():
                return
            if event.kind == "transaction" and event.expect == "valid":
                traffic.truth[str(event.value["transaction_id"])] = bool(event.is_fraud)
            yield event

    started = time.monotonic()

    async def watch() -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if await asyncio.to_thread(until):
                break
            await asyncio.sleep(poll_s)
        stop.set()

    watcher = asyncio.create_task(watch())
    try:
        await publish(events(), stack.kafka, realtime=True, predictor=traffic)
    finally:
        stop.set()
        await watcher
    return TrafficRun(traffic, started, started_at, concept_drift_at)


# ----------------------------------------------------------------------------- a bad candidate


def _constant_torchscript(probability: float) -> bytes:
    import torch

    class Constant(torch.nn.Module):
        def __init__(self, value: float) -> None:
            super().__init__()
            self.value = value

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.full((x.shape[0], 1), self.value, dtype=torch.float32)

    scripted = torch.jit.script(Constant(probability))
    buffer = io.BytesIO()
    torch.jit.save(scripted, buffer)
    return buffer.getvalue()


def constant_candidate(stack: LoopStack, probability: float = 0.05) -> models_pb2.ModelVersion:
    """Register a constant model whose held-out set makes it look better than production."""
    import mlflow
    from mlflow.tracking import MlflowClient

    from services.training.fit import load_torchscript, scores

    registry = stack.registry("test:bad-candidate")
    production = registry.get_version(alias="production")
    client = MlflowClient(tracking_uri=stack.env["MLOPS_MLFLOW_TRACKING_URI"])
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        test_set = pq.read_table(
            client.download_artifacts(production.run_id, rc.TEST_SET_ARTIFACT, str(folder))
        )
        features = np.stack(
            [test_set.column(n).to_numpy().astype(np.float32) for n in production.feature_names],
            axis=1,
        )
        model = load_torchscript(
            Path(
                client.download_artifacts(production.run_id, rc.MODEL_ARTIFACT, str(folder))
            ).read_bytes()
        )
        production_scores = scores(model, features)
        # the "frauds" of this held-out set are rows production scores lowest, and its
        # legitimate rows all score higher (ties would hide the inversion)
        # (distinct scores: a tie of frauds at the bottom would rank as one step, whose
        # precision is the base rate)
        _, first = np.unique(production_scores, return_index=True)
        frauds = first[: max(10, int(len(production_scores) * probability))]
        legit = np.flatnonzero(production_scores > production_scores[frauds].max())
        rows = np.concatenate([frauds, legit])
        labels = np.r_[np.ones(len(frauds), np.int64), np.zeros(len(legit), np.int64)]
        subset = test_set.take(pa.array(rows))
        crafted = subset.set_column(
            subset.column_names.index(rc.LABEL_COLUMN), rc.LABEL_COLUMN, pa.array(labels)
        )
        probability = len(frauds) / len(rows)  # calibrated on its own held-out set
        payload = _constant_torchscript(probability)
        sha = hashlib.sha256(payload).hexdigest()
        (folder / "model").mkdir(exist_ok=True)
        (folder / "evaluation").mkdir(exist_ok=True)
        (folder / rc.MODEL_ARTIFACT).write_bytes(payload)
        pq.write_table(crafted, folder / rc.TEST_SET_ARTIFACT)
        experiment = client.get_run(production.run_id).info.experiment_id
        run = client.create_run(
            experiment,
            run_name="bad-candidate",
            tags={
                rc.TAG_MODEL_SHA256: sha,
                rc.TAG_THRESHOLD: "0.5",
                rc.TAG_FEATURE_NAMES: json.dumps(list(production.feature_names)),
            },
        )
        client.log_artifact(run.info.run_id, str(folder / rc.MODEL_ARTIFACT), "model")
        client.log_artifact(run.info.run_id, str(folder / rc.TEST_SET_ARTIFACT), "evaluation")
        client.set_terminated(run.info.run_id, "FINISHED")
    del mlflow
    with registry:
        return registry.register(run.info.run_id, sha, description="a constant: bad on purpose")
