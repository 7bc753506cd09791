"""Benchmark of the serving service against the Triton ceiling and a naive per-request server.

    .venv/bin/python loadtests/bench_serving.py            (what `make bench` runs)

Everything runs in one go on this machine, on free ports: Redis (Feast's online store, filled
with the Feast SDK), Triton (one TorchScript FraudMLP version), the Tansu broker (for
predictions.log) and a stand-in registry answering the start-up routing read. Then, each
target loaded by a separate load-generator process (grpc.aio, pre-serialised requests, so
the generator's own cost per call is small and the same for every target):

1. Triton-only: ModelInfer with the precomputed features of the same transactions, one row per
   call (the practical ceiling: no features to read, no validation, no logging).
2. Naive: a gRPC server (thread pool) that, per request, validates, calls the Feast SDK's
   ``get_online_features`` and tritonclient's ``infer``: no batching, nothing shared but the
   clients.
3. Serving: ``python -m services.serving`` as deployed (micro-batched direct Redis reads,
   batched Triton calls, predictions.log through Kafka).

Closed loop at the same concurrency gives each target's maximum throughput (median of the
repetitions); open loop at fixed rates (50 % and 90 % of serving's maximum, latency measured
from each request's scheduled send time, so a stall counts against the server) gives the
latency at load. A second table compares online-feature reads (Feast SDK vs the direct
reader) per batch size. The table goes to stdout and var/bench/serving.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from services.cli import localinfra  # noqa: E402
from services.shared.settings import (  # noqa: E402
    FeastSettings,
    RedisSettings,
    StorageSettings,
    TritonSettings,
)

MODEL = "fraud_detector"
N_USERS = 20_000
N_MERCHANTS = 1_000
N_REQUESTS = 8_192  # distinct pre-serialised requests, cycled
CONCURRENCY = 64
# client connections the load spreads over (product services are many clients; a serving
# process with several workers gets connections, not calls, from the kernel)
CHANNELS = 8
CLOSED_SECONDS = 8.0
OPEN_SECONDS = 8.0
WARMUP_SECONDS = 2.0
REPETITIONS = 3
PREDICT = "/mlops.v1.Predictor/Predict"
MODEL_INFER = "/inference.GRPCInferenceService/ModelInfer"


def progress(message: str) -> None:
    print(f"[bench_serving {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# ============================================================================ workload


def synthetic_features(now: float) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    rng = np.random.default_rng(7)
    users = [
        {
            "user_id": f"user-{i}",
            "user_txn_count_1h": int(rng.integers(0, 5)),
            "user_txn_count_24h": int(rng.integers(0, 40)),
            "user_amount_sum_24h": float(rng.gamma(2.0, 80.0)),
            "user_amount_mean_7d": float(rng.gamma(2.0, 40.0)),
            "user_distinct_merchants_24h": int(rng.integers(0, 10)),
            "user_last_txn_epoch": now - float(rng.exponential(3600.0)),
            "user_home_country": ["FR", "DE", "US", "GB"][int(rng.integers(0, 4))],
        }
        for i in range(N_USERS)
    ]
    merchants = [
        {
            "merchant_id": f"merchant-{i}",
            "merchant_txn_count_24h": int(rng.integers(0, 5000)),
            "merchant_fraud_rate_7d": float(rng.beta(1, 50)),
            "merchant_labels_7d": int(rng.integers(0, 300)),
        }
        for i in range(N_MERCHANTS)
    ]
    return users, merchants


def synthetic_transactions() -> list[Any]:
    from services.shared.proto.mlops.v1 import events_pb2

    rng = np.random.default_rng(11)
    when = (datetime.now(UTC) - timedelta(minutes=1)).isoformat()
    txns = []
    for i in range(N_REQUESTS):
        # 1 in 20 users was never seen (defaults), as new card holders are
        user = int(rng.integers(0, int(N_USERS * 1.05)))
        txns.append(
            events_pb2.Transaction(
                transaction_id=f"bench-{i}",
                user_id=f"user-{user}",
                merchant_id=f"merchant-{int(rng.integers(0, N_MERCHANTS))}",
                amount=float(np.round(rng.gamma(2.0, 50.0) + 0.5, 2)),
                currency="EUR",
                channel=["web", "pos", "app"][i % 3],
                country=["FR", "DE", "US", "GB", "ES"][int(rng.integers(0, 5))],
                event_time=when,
            )
        )
    return txns


def feature_matrix(
    txns: list[Any], users: list[dict[str, Any]], merchants: list[dict[str, Any]]
) -> np.ndarray:
    from services.shared.usecase.features import (
        MERCHANT_FEATURES,
        USER_FEATURES,
        TransactionColumns,
        model_inputs,
    )

    by_user = {u["user_id"]: u for u in users}
    by_merchant = {m["merchant_id"]: m for m in merchants}
    online: dict[str, list[Any]] = {n: [] for n in [*USER_FEATURES, *MERCHANT_FEATURES]}
    for txn in txns:
        for name in USER_FEATURES:
            online[name].append(by_user.get(txn.user_id, {}).get(name))
        for name in MERCHANT_FEATURES:
            online[name].append(by_merchant.get(txn.merchant_id, {}).get(name))
    return model_inputs(
        TransactionColumns(
            amount=np.array([t.amount for t in txns]),
            channel=[t.channel for t in txns],
            country=[t.country for t in txns],
            event_time_epoch=np.array(
                [datetime.fromisoformat(t.event_time).timestamp() for t in txns]
            ),
        ),
        online,
    )


def predict_payloads(txns: list[Any]) -> list[bytes]:
    from services.shared.proto.mlops.v1 import predictor_pb2

    return [predictor_pb2.PredictRequest(transaction=t).SerializeToString() for t in txns]


def infer_payloads(matrix: np.ndarray) -> list[bytes]:
    from tritonclient.grpc import service_pb2

    from services.shared.usecase.features import TRITON_INPUT, TRITON_OUTPUT

    payloads = []
    for row in matrix:
        request = service_pb2.ModelInferRequest(model_name=MODEL, model_version="1")
        tensor = request.inputs.add()
        tensor.name = TRITON_INPUT
        tensor.datatype = "FP32"
        tensor.shape.extend([1, matrix.shape[1]])
        request.outputs.add().name = TRITON_OUTPUT
        request.raw_input_contents.append(np.ascontiguousarray(row, np.float32).tobytes())
        payloads.append(request.SerializeToString())
    return payloads


def torchscript_model() -> bytes:
    import torch

    from services.shared.usecase.features import MODEL_INPUTS
    from services.shared.usecase.model import FraudMLP

    torch.manual_seed(3)
    n = len(MODEL_INPUTS)
    model = FraudMLP(torch.zeros(n), torch.ones(n) * 3.0).eval()
    buffer = io.BytesIO()
    torch.jit.save(torch.jit.script(model), buffer)
    return buffer.getvalue()


# ============================================================================ load generator


@dataclass
class LoadResult:
    target: str
    mode: str
    offered_rps: float | None
    achieved_rps: float
    ok: int
    errors: int
    p50_ms: float
    p95_ms: float
    p99_ms: float
    error_sample: str = ""
    calls: int = 0  # every call made, warm-up included (for CPU per call)
    cpu_us: dict[str, float] | None = None  # CPU per call by process group

    @classmethod
    def from_run(
        cls,
        target: str,
        mode: str,
        offered: float | None,
        latencies: list[float],
        errors: int,
        seconds: float,
        error_sample: str,
    ) -> LoadResult:
        ms = np.array(latencies) * 1000.0 if latencies else np.array([float("nan")])
        return cls(
            target=target,
            mode=mode,
            offered_rps=offered,
            achieved_rps=len(latencies) / seconds,
            ok=len(latencies),
            errors=errors,
            p50_ms=float(np.percentile(ms, 50)),
            p95_ms=float(np.percentile(ms, 95)),
            p99_ms=float(np.percentile(ms, 99)),
            error_sample=error_sample,
        )


async def _generate(args: argparse.Namespace) -> LoadResult:
    import grpc

    payloads = [bytes.fromhex(line) for line in Path(args.payloads).read_text().split()]
    method = PREDICT if args.kind == "predict" else MODEL_INFER
    channels = [
        grpc.aio.insecure_channel(
            args.address, options=[("grpc.use_local_subchannel_pool", 1), ("channel", i)]
        )
        for i in range(args.channels)
    ]
    calls = [
        c.unary_unary(method, request_serializer=None, response_deserializer=None) for c in channels
    ]
    latencies: list[float] = []
    errors = 0
    error_sample = ""
    sent = 0
    loop = asyncio.get_running_loop()

    # loop.time() has millisecond resolution under uvloop: latencies use perf_counter
    clock = time.perf_counter

    async def one(i: int, sent_at: float, record: bool) -> None:
        nonlocal errors, error_sample, sent
        sent += 1
        try:
            await calls[i % len(calls)](payloads[i % len(payloads)], timeout=args.timeout)
        except grpc.aio.AioRpcError as exc:
            if record:
                errors += 1
                error_sample = error_sample or f"{exc.code().name}: {exc.details()}"
            return
        if record:
            latencies.append(clock() - sent_at)

    async def closed(seconds: float, record: bool) -> None:
        end = loop.time() + seconds
        counter = iter(range(10**12))

        async def worker() -> None:
            while loop.time() < end:
                await one(next(counter), clock(), record)

        await asyncio.gather(*(worker() for _ in range(args.concurrency)))

    async def opened(seconds: float, rate: float, record: bool) -> None:
        start = clock()
        total = int(seconds * rate)
        pending: set[asyncio.Task[None]] = set()
        for i in range(total):
            scheduled = start + i / rate
            delay = scheduled - clock()
            if delay > 0:
                await asyncio.sleep(delay)
            task = loop.create_task(one(i, scheduled, record))
            pending.add(task)
            task.add_done_callback(pending.discard)
        if pending:
            await asyncio.gather(*pending)

    for channel in channels:
        await channel.channel_ready()
    cpu_started = time.process_time()
    if args.mode == "closed":
        await closed(WARMUP_SECONDS, False)
        started = loop.time()
        await closed(args.seconds, True)
        elapsed = loop.time() - started
        offered = None
    else:
        await opened(WARMUP_SECONDS, args.rate, False)
        started = loop.time()
        await opened(args.seconds, args.rate, True)
        elapsed = args.seconds
        offered = args.rate
    for channel in channels:
        await channel.close()
    result = LoadResult.from_run(
        args.target, args.mode, offered, latencies, errors, elapsed, error_sample
    )
    result.calls = sent
    result.cpu_us = {"load generator": time.process_time() - cpu_started}  # seconds, here
    return result


def run_generator(args: argparse.Namespace) -> None:
    with contextlib.suppress(ImportError):
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    result = asyncio.run(_generate(args))
    print(json.dumps(result.__dict__))


def cpu_seconds(groups: list[int]) -> float:
    """CPU time (user + system) of every live process in the given process groups."""
    total = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) in groups:  # pgrp
            total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def load(
    target: str,
    kind: str,
    address: str,
    payloads: Path,
    *,
    mode: str,
    accounted: dict[str, list[int]],
    concurrency: int = CONCURRENCY,
    channels: int = 1,
    rate: float = 0.0,
    seconds: float = CLOSED_SECONDS,
) -> LoadResult:
    """One load-generator run; ``accounted`` names the process groups whose CPU is charged
    to the target (server-side) besides the generator's own."""
    command = [
        sys.executable,
        __file__,
        "generate",
        f"--target={target}",
        f"--kind={kind}",
        f"--address={address}",
        f"--payloads={payloads}",
        f"--mode={mode}",
        f"--concurrency={concurrency}",
        f"--rate={rate}",
        f"--seconds={seconds}",
        f"--channels={channels}",
    ]
    before = {name: cpu_seconds(groups) for name, groups in accounted.items()}
    output = subprocess.run(command, check=False, capture_output=True, text=True, cwd=ROOT)
    if output.returncode != 0:
        raise RuntimeError(f"load generator for {target} failed:\n{output.stderr[-2000:]}")
    result = LoadResult(**json.loads(output.stdout.strip().splitlines()[-1]))
    calls = max(result.calls, 1)
    generator_cpu_s = (result.cpu_us or {}).get("load generator", 0.0)
    result.cpu_us = {
        name: (cpu_seconds(groups) - before[name]) / calls * 1e6
        for name, groups in accounted.items()
    }
    result.cpu_us["load generator"] = generator_cpu_s / calls * 1e6
    progress(
        f"{target:<12} {mode:<6} "
        + (f"offered {rate:7.0f}/s " if mode == "open" else f"c={concurrency:<3} ")
        + f"-> {result.achieved_rps:7.0f}/s p50 {result.p50_ms:6.2f} p99 {result.p99_ms:6.2f} ms"
        + " cpu/call "
        + " ".join(f"{k}={v:.0f}us" for k, v in result.cpu_us.items())
        + (f" errors {result.errors} ({result.error_sample})" if result.errors else "")
    )
    return result


# ============================================================================ naive baseline


def run_naive_server(args: argparse.Namespace) -> None:
    """The straightforward server: per request, the Feast SDK and tritonclient, nothing shared
    across requests but the two clients (one per worker thread)."""
    import grpc
    import tritonclient.grpc as tritongrpc

    from services.shared.errors import InvalidArgument
    from services.shared.featurestore import open_store
    from services.shared.proto.mlops.v1 import predictor_pb2, predictor_pb2_grpc
    from services.shared.usecase.features import (
        TRITON_INPUT,
        TRITON_OUTPUT,
        TransactionColumns,
        model_inputs,
    )
    from services.shared.usecase.schemas import transaction_fields, validate_transaction

    feast, redis, storage, triton = (
        FeastSettings(),
        RedisSettings(),
        StorageSettings(),
        TritonSettings(),
    )
    local = threading.local()

    def clients() -> tuple[Any, Any, Any]:
        if not hasattr(local, "store"):
            local.store = open_store(feast, redis, storage)
            local.service = local.store.get_feature_service(feast.feature_service)
            local.triton = tritongrpc.InferenceServerClient(triton.grpc_url)
        return local.store, local.service, local.triton

    class Naive(predictor_pb2_grpc.PredictorServicer):
        def Predict(self, request: Any, context: Any) -> Any:
            store, service, client = clients()
            try:
                valid = validate_transaction(
                    transaction_fields(request.transaction), now=datetime.now(UTC)
                )
            except InvalidArgument as exc:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
            online = store.get_online_features(
                service, [{"user_id": valid.user_id, "merchant_id": valid.merchant_id}]
            ).to_dict()
            matrix = model_inputs(
                TransactionColumns(
                    amount=np.array([valid.amount]),
                    channel=[valid.channel],
                    country=[valid.country],
                    event_time_epoch=np.array([valid.event_time.timestamp()]),
                ),
                online,
            )
            tensor = tritongrpc.InferInput(TRITON_INPUT, list(matrix.shape), "FP32")
            tensor.set_data_from_numpy(matrix)
            result = client.infer(MODEL, [tensor], model_version="1")
            score = float(result.as_numpy(TRITON_OUTPUT)[0][0])
            return predictor_pb2.PredictResponse(
                transaction_id=valid.transaction_id,
                fraud_probability=score,
                decision=predictor_pb2.DECISION_DECLINE
                if score >= 0.5
                else predictor_pb2.DECISION_APPROVE,
                model_name=MODEL,
                model_version=1,
            )

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=args.workers))
    # the stubs declare every RPC abstract; the baseline implements Predict only
    predictor_pb2_grpc.add_PredictorServicer_to_server(Naive(), server)  # type: ignore[abstract]
    server.add_insecure_port(f"127.0.0.1:{args.port}")
    server.start()
    print("ready", flush=True)
    server.wait_for_termination()


# ============================================================================ orchestration


class StandInRegistry:
    """Answers serving's start-up routing read (production = v1) from a thread."""

    def __init__(self) -> None:
        import grpc

        from services.shared.proto.mlops.v1 import models_pb2, registry_pb2_grpc

        class Servicer(registry_pb2_grpc.ModelRegistryServicer):
            def GetModelVersion(self, request: Any, context: Any) -> Any:
                if request.alias != "production":
                    context.abort(grpc.StatusCode.NOT_FOUND, "no such alias")
                return models_pb2.ModelVersion(
                    model_name=MODEL, version=1, aliases=["production"], threshold=0.5
                )

        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        # serving's start-up read is GetModelVersion; nothing else is called here
        registry_pb2_grpc.add_ModelRegistryServicer_to_server(Servicer(), self.server)  # type: ignore[abstract]
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()

    def stop(self) -> None:
        self.server.stop(None)


@contextlib.contextmanager
def child(command: list[str], env: dict[str, str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    with log.open("ab") as out:
        process = subprocess.Popen(
            command, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True
        )
    try:
        yield process
    finally:
        process.terminate()
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def wait_serving(address: str, timeout_s: float, process: subprocess.Popen[bytes]) -> None:
    """Until the service's health says SERVING on several fresh connections in a row (with
    several workers, each connection may reach a different one)."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.monotonic() + timeout_s
    in_a_row = 0
    while in_a_row < 16:
        if process.poll() is not None:
            raise RuntimeError(f"{address}: the server exited ({process.returncode})")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{address} not serving after {timeout_s:.0f}s")
        with grpc.insecure_channel(address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1)
                serving = reply.status == health_pb2.HealthCheckResponse.SERVING
            except grpc.RpcError:
                serving = False
        in_a_row = in_a_row + 1 if serving else 0
        if not serving:
            time.sleep(0.2)


def wait_port(port: int, timeout_s: float, process: subprocess.Popen[bytes]) -> None:
    localinfra.wait_until(
        lambda: localinfra.port_open("127.0.0.1", port),
        timeout_s,
        f"port {port}",
        alive=lambda: process.poll() is None,
    )


def feature_read_comparison(store: Any, feast: FeastSettings, redis: RedisSettings) -> list[str]:
    """Time per batch of the Feast SDK's online read vs the direct reader."""
    from services.serving.online_features import OnlineFeatureLayout, OnlineFeatureReader

    layout = OnlineFeatureLayout.from_store(store, feast.feature_service)
    service = store.get_feature_service(feast.feature_service)
    rows = [
        {"user_id": f"user-{i}", "merchant_id": f"merchant-{i % N_MERCHANTS}"} for i in range(256)
    ]
    lines = [
        "| rows per read | Feast SDK get_online_features (ms) | serving's reader (ms) | speed-up |",
        "|---:|---:|---:|---:|",
    ]

    async def direct(batch: list[dict[str, str]], repeat: int) -> list[float]:
        reader = OnlineFeatureReader(
            redis, layout, timeout_s=1.0, retry_interval_s=0.1, pool_size=2
        )
        entities = {k: [r[k] for r in batch] for k in ("user_id", "merchant_id")}
        times = []
        try:
            for _ in range(repeat):
                started = time.perf_counter()
                await reader.read(entities)
                times.append(time.perf_counter() - started)
        finally:
            await reader.close()
        return times

    for size in (1, 16, 64, 256):
        batch = rows[:size]
        sdk = []
        for _ in range(30):
            started = time.perf_counter()
            store.get_online_features(service, batch).to_dict()
            sdk.append(time.perf_counter() - started)
        ours = asyncio.run(direct(batch, 30))
        sdk_ms, ours_ms = statistics.median(sdk) * 1e3, statistics.median(ours) * 1e3
        lines.append(f"| {size} | {sdk_ms:.2f} | {ours_ms:.2f} | {sdk_ms / ours_ms:.1f}x |")
    return lines


def run_benchmark(args: argparse.Namespace) -> None:
    import pandas as pd
    from feast.data_source import PushMode

    from services.registry.triton_repository import TritonModelRepository, sha256_hex
    from services.shared.featurestore import apply_definitions, open_store
    from services.shared.usecase.features import MODEL_INPUTS

    work = Path(tempfile.mkdtemp(prefix="bench-serving-"))
    processes: list[localinfra.RunningProcess] = []
    registry: StandInRegistry | None = None
    try:
        load_before = os.getloadavg()[0]
        progress("starting Redis, Triton and the broker on free ports")
        redis_port = localinfra.free_port()
        redis_process = localinfra.RunningProcess(
            localinfra.redis(redis_port, None), work / "redis.log"
        )
        processes.append(redis_process)
        kafka_port = localinfra.free_port()
        kafka_process = localinfra.RunningProcess(localinfra.tansu(kafka_port), work / "tansu.log")
        processes.append(kafka_process)
        repository = work / "triton_models"
        repository.mkdir()
        triton_ports = [localinfra.free_port() for _ in range(3)]
        triton_process = localinfra.RunningProcess(
            localinfra.triton(triton_ports[0], triton_ports[1], triton_ports[2], repository),
            work / "triton.log",
        )
        processes.append(triton_process)
        triton = TritonSettings(
            http_port=triton_ports[0],
            grpc_port=triton_ports[1],
            metrics_port=triton_ports[2],
            model_repository=repository,
        )
        redis = RedisSettings(port=redis_port)
        feast = FeastSettings(project=f"bench{uuid.uuid4().hex[:6]}")
        storage = StorageSettings(data_dir=work / "data")

        progress("publishing the model to Triton")
        model = torchscript_model()
        published = TritonModelRepository(triton, MODEL)
        published.write_version(1, model, sha256_hex(model))
        published.write_config([1], len(MODEL_INPUTS))
        published.load()

        progress(f"pushing {N_USERS} users and {N_MERCHANTS} merchants with the Feast SDK")
        store = open_store(feast, redis, storage)
        apply_definitions(store, feast, storage.offline_dir)
        now = datetime.now(UTC)
        users, merchants = synthetic_features(now.timestamp())
        for source, rows in (("user_activity_push", users), ("merchant_activity_push", merchants)):
            frame = pd.DataFrame(rows)
            frame["event_timestamp"] = now
            frame["created_timestamp"] = now
            store.push(source, frame, to=PushMode.ONLINE)

        progress("comparing online-feature reads (Feast SDK vs direct reader)")
        read_table = feature_read_comparison(store, feast, redis)

        txns = synthetic_transactions()
        matrix = feature_matrix(txns, users, merchants)
        predict_file, infer_file = work / "predict.hex", work / "infer.hex"
        predict_file.write_text("\n".join(p.hex() for p in predict_payloads(txns)))
        infer_file.write_text("\n".join(p.hex() for p in infer_payloads(matrix)))

        registry = StandInRegistry()
        env = {
            **os.environ,
            "MLOPS_REDIS_HOST": "127.0.0.1",
            "MLOPS_REDIS_PORT": str(redis_port),
            "MLOPS_TRITON_HOST": "127.0.0.1",
            "MLOPS_TRITON_GRPC_PORT": str(triton.grpc_port),
            "MLOPS_TRITON_HTTP_PORT": str(triton.http_port),
            "MLOPS_FEAST_PROJECT": feast.project,
            "MLOPS_STORAGE_DATA_DIR": str(storage.data_dir),
            "MLOPS_KAFKA_BOOTSTRAP": f"127.0.0.1:{kafka_port}",
            "MLOPS_KAFKA_BROKER_FLAVOR": "tansu",
            "MLOPS_REGISTRY_CLIENT_ADDRESS": f"127.0.0.1:{registry.port}",
            "MLOPS_REGISTRY_CLIENT_MODEL_NAME": MODEL,
            "MLOPS_LOG_LEVEL": "WARNING",
        }
        serving_port, naive_port = localinfra.free_port(), localinfra.free_port()
        serving_metrics_port = localinfra.free_port()
        serving_env = {
            **env,
            "MLOPS_SERVING_PORT": str(serving_port),
            "MLOPS_SERVING_METRICS_PORT": str(serving_metrics_port),
            "MLOPS_SERVING_WORKERS": str(args.serving_workers),
        }
        serving_cmd = [sys.executable, "-m", "services.serving"]
        naive_cmd = [sys.executable, __file__, "naive", f"--port={naive_port}", "--workers=8"]
        triton_address = triton.grpc_url
        serving_address = f"127.0.0.1:{serving_port}"
        naive_address = f"127.0.0.1:{naive_port}"

        with (
            child(serving_cmd, serving_env, work / "serving.log") as serving_process,
            child(naive_cmd, env, work / "naive.log") as naive_process,
        ):
            progress("waiting for the serving service and the naive server")
            wait_serving(serving_address, 120, serving_process)
            wait_port(naive_port, 120, naive_process)
            groups = {
                "redis": [redis_process.process.pid],
                "broker": [kafka_process.process.pid],
                "triton": [triton_process.process.pid],
                "naive": [naive_process.pid],
                "serving": [serving_process.pid],
            }
            targets = [
                ("triton-only", "infer", triton_address, infer_file, ["triton"]),
                ("naive", "predict", naive_address, predict_file, ["naive", "triton", "redis"]),
                (
                    "serving",
                    "predict",
                    serving_address,
                    predict_file,
                    ["serving", "triton", "redis", "broker"],
                ),
            ]
            targets = [t for t in targets if t[0] in args.only.split(",")]
            closed: dict[str, list[LoadResult]] = {t[0]: [] for t in targets}
            for repetition in range(args.repetitions):
                progress(f"closed loop, concurrency {CONCURRENCY}, round {repetition + 1}")
                for name, kind, address, payloads, charged in targets:
                    closed[name].append(
                        load(
                            name,
                            kind,
                            address,
                            payloads,
                            mode="closed",
                            channels=args.channels,
                            seconds=args.seconds,
                            accounted={g: groups[g] for g in charged},
                        )
                    )
            best = {
                name: statistics.median(r.achieved_rps for r in runs)
                for name, runs in closed.items()
            }
            open_runs: dict[tuple[str, int], LoadResult] = {}
            if args.skip_open or len(targets) < 3:
                return
            for share in (50, 90):
                for name, kind, address, payloads, charged in targets:
                    # the naive server cannot take serving's rates (its queue would only
                    # grow): it gets the same shares of its own maximum
                    reference = best["naive"] if name == "naive" else best["serving"]
                    rate = reference * share / 100
                    open_runs[(name, share)] = load(
                        name,
                        kind,
                        address,
                        payloads,
                        mode="open",
                        channels=args.channels,
                        rate=rate,
                        seconds=args.seconds,
                        accounted={g: groups[g] for g in charged},
                    )
            counters = serving_counters(serving_metrics_port)
        table = render(
            closed, best, open_runs, read_table, counters, (load_before, os.getloadavg()[0])
        )
        print(table)
        out = ROOT / "var" / "bench" / "serving.md"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(table + "\n")
        progress(f"wrote {out.relative_to(ROOT)}")
    finally:
        if registry is not None:
            registry.stop()
        for process in reversed(processes):
            process.stop()


def serving_counters(metrics_port: int) -> dict[str, float]:
    """What the serving service counted: degraded answers, dropped logs, batch sizes."""
    import urllib.request

    wanted = {
        "mlops_serving_degraded_total",
        "mlops_serving_prediction_log_dropped_total",
        "mlops_serving_feature_batch_rows_sum",
        "mlops_serving_feature_batch_rows_count",
    }
    counters = dict.fromkeys(wanted, 0.0)
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as reply:
        for line in reply.read().decode().splitlines():
            name, _, value = line.partition(" ")
            if name in wanted:
                counters[name] = float(value)
    return counters


def _median(runs: list[LoadResult], field: str) -> float:
    return statistics.median(getattr(r, field) for r in runs)


def _cpu(runs: list[LoadResult], group: str) -> float:
    return statistics.median((r.cpu_us or {}).get(group, 0.0) for r in runs)


def render(
    closed: dict[str, list[LoadResult]],
    best: dict[str, float],
    open_runs: dict[tuple[str, int], LoadResult],
    read_table: list[str],
    counters: dict[str, float],
    load_average: tuple[float, float],
) -> str:
    serving, naive, ceiling = best["serving"], best["naive"], best["triton-only"]
    p99_serving = _median(closed["serving"], "p99_ms")
    p99_naive = _median(closed["naive"], "p99_ms")
    rounds = len(closed["serving"])

    def verdict(ok: bool) -> str:
        return "met" if ok else "NOT met"

    lines = [
        "## Serving (gRPC Predict)",
        "",
        "Setup measured: serving with only its dependencies (Triton, Redis, a broker) on the "
        "machine, none of the other services running; the stack as `make up` leaves it (every "
        "service, the simulator's traffic) is measured by loadtests/bench_stack.py below. "
        f"One Predict per call; {N_REQUESTS} distinct transactions over {N_USERS} users (5 % "
        f"never seen) and {N_MERCHANTS} merchants, features pushed with the Feast SDK. Load from "
        "a separate grpc.aio process with pre-serialised requests. Closed loop at "
        f"{CONCURRENCY} concurrent calls, {rounds} rounds of {int(CLOSED_SECONDS)} s per target "
        "(interleaved), medians. Triton, Redis, the broker, the servers and the load generator "
        "share the machine's cores; 1-minute load average "
        f"{load_average[0]:.1f} before and {load_average[1]:.1f} after the run.",
        "",
        "| target | max throughput (req/s) | p50 (ms) | p95 (ms) | p99 (ms) | errors "
        "| server CPU per call (us) | all server-side CPU per call (us) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    labels = {
        "triton-only": ("Triton only: precomputed features, 1 row per call", "triton"),
        "naive": ("naive: Feast SDK + tritonclient per request (8 threads)", "naive"),
        "serving": ("serving service (python -m services.serving)", "serving"),
    }
    for name, (label, own) in labels.items():
        runs = closed[name]
        everything = statistics.median(
            sum(v for k, v in (r.cpu_us or {}).items() if k != "load generator") for r in runs
        )
        lines.append(
            f"| {label} | {best[name]:.0f} | {_median(runs, 'p50_ms'):.2f} | "
            f"{_median(runs, 'p95_ms'):.2f} | {_median(runs, 'p99_ms'):.2f} | "
            f"{sum(r.errors for r in runs)} | {_cpu(runs, own):.0f} | {everything:.0f} |"
        )
    batches = counters["mlops_serving_feature_batch_rows_count"]
    lines += [
        "",
        "| ratio | value | target | |",
        "|---|---:|---:|---|",
        f"| serving / naive throughput | {serving / naive:.1f}x | >= 3x | "
        f"{verdict(serving >= 3 * naive)} |",
        f"| serving / Triton-only throughput | {serving / ceiling:.0%} | >= 50% | "
        f"{verdict(serving >= 0.5 * ceiling)} |",
        f"| serving p99 / naive p99 (closed loop, same concurrency) | "
        f"{p99_serving / p99_naive:.2f} | <= 1 | {verdict(p99_serving <= p99_naive)} |",
        "",
        "Open loop: requests sent at a fixed rate, latency measured from each request's "
        "scheduled send time (a stall counts against the server). Rates are 50 % and 90 % of "
        "the serving service's maximum; the naive server gets 50 % and 90 % of its own.",
        "",
        "| target | offered (req/s) | achieved (req/s) | p50 (ms) | p95 (ms) | p99 (ms) | errors |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for (name, share), run in sorted(open_runs.items(), key=lambda kv: (kv[0][0], kv[0][1])):
        of = "its own" if name == "naive" else "serving's"
        lines.append(
            f"| {name} at {share} % of {of} max | {run.offered_rps or 0:.0f} | "
            f"{run.achieved_rps:.0f} | {run.p50_ms:.2f} | {run.p95_ms:.2f} | {run.p99_ms:.2f} | "
            f"{run.errors} |"
        )
    lines += [
        "",
        "During the whole run the serving service answered "
        f"{counters['mlops_serving_degraded_total']:.0f} calls degraded (default features), "
        f"dropped {counters['mlops_serving_prediction_log_dropped_total']:.0f} prediction "
        "records, and read features "
        f"{counters['mlops_serving_feature_batch_rows_sum'] / max(batches, 1):.1f} rows per "
        "Redis round trip on average (micro-batching).",
        "",
        "Online-feature reads of the user and merchant views (why serving reads Feast's Redis "
        "layout itself), median of 30 reads:",
        "",
        *read_table,
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    sub = parser.add_subparsers(dest="command")
    gen = sub.add_parser("generate", help="(internal) one load-generator run; prints JSON")
    gen.add_argument("--target", required=True)
    gen.add_argument("--kind", choices=["predict", "infer"], required=True)
    gen.add_argument("--address", required=True)
    gen.add_argument("--payloads", required=True)
    gen.add_argument("--mode", choices=["closed", "open"], required=True)
    gen.add_argument("--concurrency", type=int, default=CONCURRENCY)
    gen.add_argument("--rate", type=float, default=0.0)
    gen.add_argument("--seconds", type=float, default=CLOSED_SECONDS)
    gen.add_argument("--timeout", type=float, default=30.0)
    gen.add_argument("--channels", type=int, default=1)
    naive = sub.add_parser("naive", help="(internal) run the naive baseline server")
    naive.add_argument("--port", type=int, required=True)
    naive.add_argument("--workers", type=int, default=8)
    parser.add_argument("--repetitions", type=int, default=REPETITIONS)
    parser.add_argument("--seconds", type=float, default=CLOSED_SECONDS)
    parser.add_argument(
        "--only",
        default="triton-only,naive,serving",
        help="targets to measure (comma separated; the table needs all three)",
    )
    parser.add_argument("--skip-open", action="store_true", help="closed loop only")
    parser.add_argument(
        "--serving-workers", type=int, default=1, help="MLOPS_SERVING_WORKERS of the service"
    )
    parser.add_argument(
        "--channels", type=int, default=CHANNELS, help="client connections of the generator"
    )
    args = parser.parse_args()
    if args.command == "generate":
        run_generator(args)
    elif args.command == "naive":
        run_naive_server(args)
    else:
        run_benchmark(args)


if __name__ == "__main__":
    main()
