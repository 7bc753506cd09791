"""A whole local stack on ports of its own, for the stack benchmark and the chaos run.

``OwnStack`` starts what ``make up`` starts (``mlops stack up`` then ``mlops bootstrap``) with
its own var directory and a block of ports, so it never meets a developer's stack; it stops,
starts and kills programs through supervisord and measures the CPU of every process of the
stack (psutil). ``PredictLoad`` is the Predict client both use: a closed loop of concurrent
calls over one gRPC channel, the same requests every time.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from services.cli import localinfra  # noqa: E402
from services.cli.localstack import LocalStack, StackSettings, Supervisor  # noqa: E402

MLOPS = str(Path(sys.executable).with_name("mlops"))
SERVICES = ("ingestion", "features", "training", "registry", "serving", "monitoring")
PORT_OFFSETS = {
    "KAFKA": 92,
    "REDIS": 79,
    "TRITON_HTTP": 0,
    "TRITON_GRPC": 1,
    "TRITON_METRICS": 2,
    "PROMETHEUS": 90,
    "MLFLOW": 50,
    "SERVING_GRPC": 51,
    "REGISTRY_GRPC": 52,
    **{f"{s.upper()}_METRICS": 11 + i for i, s in enumerate(SERVICES)},
    "AUTOPILOT_METRICS": 17,
    "DASHBOARD": 18,
    "DASHBOARD_METRICS": 19,
}


def progress(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def cores_between(
    before: dict[str, float], after: dict[str, float], seconds: float
) -> dict[str, float]:
    """Cores each program used between two ``cpu_totals``."""
    return {
        name: max(spent - before.get(name, 0.0), 0.0) / seconds for name, spent in after.items()
    }


@dataclass
class OwnStack:
    var_dir: Path
    port_base: int
    env: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.env = {
            **os.environ,
            "MLOPS_STACK_VAR_DIR": str(self.var_dir),
            **{
                f"MLOPS_STACK_{name}_PORT": str(self.port_base + offset)
                for name, offset in PORT_OFFSETS.items()
            },
        }
        settings = StackSettings(
            var_dir=self.var_dir,
            **{
                f"{name.lower()}_port": self.port_base + offset
                for name, offset in PORT_OFFSETS.items()
            },
        )
        self.stack = LocalStack(settings)
        self.supervisor = Supervisor(self.stack)

    @property
    def serving_address(self) -> str:
        return f"127.0.0.1:{self.port_base + PORT_OFFSETS['SERVING_GRPC']}"

    def ports_free(self) -> bool:
        return not any(
            localinfra.port_open("127.0.0.1", self.port_base + offset, timeout=0.2)
            for offset in PORT_OFFSETS.values()
        )

    def mlops(self, *args: str, check: bool = True, log: Path | None = None) -> int:
        out = open(log, "ab") if log else subprocess.DEVNULL  # noqa: SIM115
        try:
            done = subprocess.run(
                [MLOPS, *args], env=self.client_env(), stdout=out, stderr=out, check=False
            )
        finally:
            if log:
                out.close()  # type: ignore[union-attr]
        if check and done.returncode != 0:
            raise RuntimeError(f"mlops {' '.join(args)} failed ({done.returncode}); see {log}")
        return done.returncode

    def client_env(self) -> dict[str, str]:
        return {**self.env, **self.stack.client_environment()}

    def up(self, log: Path) -> float:
        """``make up``: start everything, make the first model; seconds it took."""
        started = time.monotonic()
        self.mlops("stack", "up", log=log)
        self.mlops("bootstrap", log=log)
        return time.monotonic() - started

    def down(self, log: Path) -> None:
        self.mlops("stack", "down", check=False, log=log)

    def simulate(self, log: Path, *args: str) -> subprocess.Popen[bytes]:
        out = open(log, "ab")  # noqa: SIM115
        return subprocess.Popen(
            [MLOPS, "simulate", *args], env=self.client_env(), stdout=out, stderr=out
        )

    def programs(self) -> dict[str, Any]:
        return self.supervisor.programs()

    def pid(self, program: str) -> int:
        return int(self.programs()[program].pid)

    def stop(self, *programs: str) -> None:
        for program in programs:
            self.supervisor.stop_program(program)

    def start(self, *programs: str) -> None:
        for program in programs:
            self.supervisor.start_program(program)

    def kill(self, program: str) -> int:
        """kill -9 the program's process group (what a crash of it and its children is)."""
        pid = self.pid(program)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(os.getpgid(pid), signal.SIGKILL)
        return pid

    def wait_running(self, program: str, old_pid: int, timeout_s: float = 60.0) -> float:
        started = time.monotonic()
        localinfra.wait_until(
            lambda: (p := self.programs()[program]).state == "RUNNING" and p.pid != old_pid,
            timeout_s,
            f"{program} respawned",
            interval_s=0.05,
        )
        return time.monotonic() - started

    def wait_healthy(self, timeout_s: float = 180.0) -> None:
        components = self.stack.components()
        localinfra.wait_until(
            lambda: all(h.ok for h in self.stack.health(components).values()),
            timeout_s,
            "every component healthy",
            interval_s=0.5,
        )

    def processes(self) -> dict[str, list[psutil.Process]]:
        """Every live process of the stack (children included) by program."""
        found: dict[str, list[psutil.Process]] = {}
        for entry in self.stack.processes():
            try:
                found.setdefault(entry.program, []).append(psutil.Process(entry.pid))
            except psutil.NoSuchProcess:
                continue
        return found

    def cpu_totals(self) -> dict[str, float]:
        """CPU seconds (user + system) each program's processes have used so far."""
        out: dict[str, float] = {}
        for name, ps in self.processes().items():
            spent = 0.0
            for p in ps:
                try:
                    t = p.cpu_times()
                    spent += t.user + t.system
                except psutil.NoSuchProcess:
                    continue
            out[name] = spent
        return out

    def cpu(self, seconds: float) -> dict[str, float]:
        """Cores each program used over ``seconds`` (user + system, all its processes)."""
        before = self.cpu_totals()
        time.sleep(seconds)
        return cores_between(before, self.cpu_totals(), seconds)

    def wait_settled(self, max_cores: float = 0.3, timeout_s: float = 180.0) -> float:
        """Seconds until every consumer group that reads as records come (ingestion's,
        features', monitoring's reading of predictions.log) has no lag and the whole stack then
        uses at most ``max_cores`` over 2 s: a backlog left by a stopped consumer, or by a load
        the stack fell behind on, worked off. (CPU alone was not enough: a service restarted
        seconds earlier had not begun to read its backlog when the stack looked at rest.)"""
        started = time.monotonic()
        while asyncio.run(self.consumer_lag()) != 0 or sum(self.cpu(2.0).values()) > max_cores:
            if time.monotonic() - started > timeout_s:
                break
            time.sleep(0.5)  # between polls of the broker
        return time.monotonic() - started

    async def consumer_lag(self) -> int:
        """Records not yet read by the groups that read everything as it comes (-1: the
        broker did not answer)."""
        from aiokafka.errors import KafkaError

        from services.cli.bootstrap import read_backlog
        from services.features.settings import FeaturesSettings
        from services.ingestion.settings import IngestionSettings
        from services.monitoring.reader import counted_from
        from services.monitoring.settings import MonitoringSettings
        from services.shared.kafka import committed_offsets, consumer_groups_lag
        from services.shared.topics import Topics

        with environment(self.client_env()):
            ingestion, features = IngestionSettings(), FeaturesSettings()
            monitoring = MonitoringSettings()
        predictions = Topics.from_settings(monitoring.kafka).predictions
        try:
            pipeline = await read_backlog(ingestion, features)
            group = monitoring.group_id
            uncommitted = (await consumer_groups_lag(monitoring.kafka, {group: [predictions]}))[
                group
            ]
            committed = await committed_offsets(monitoring.kafka, group, uncommitted)
        except (KafkaError, OSError, TimeoutError):  # the broker may be coming back
            return -1
        # monitoring commits up to the predictions still waiting for their labels; where it
        # has read (and counted) to is in the commit's metadata
        unread = 0
        for tp, lag in uncommitted.items():
            offset, metadata = committed.get(tp, (0, ""))
            unread += max(lag - (counted_from(offset, metadata) - offset), 0)
        return pipeline.total + unread

    def rss_mib(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for name, ps in self.processes().items():
            for p in ps:
                try:
                    out[name] = out.get(name, 0.0) + p.memory_info().rss / 2**20
                except psutil.NoSuchProcess:
                    continue
        return out


@contextlib.contextmanager
def environment(env: dict[str, str]) -> Iterator[None]:
    """The stack's client environment, for the settings classes to read."""
    saved = dict(os.environ)
    os.environ.update(env)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


@contextlib.contextmanager
def stack_for(
    name: str, port_base: int, attach: Path | None = None, keep: bool = False
) -> Iterator[tuple[OwnStack, float | None]]:
    """A stack of its own in var/``name`` (started as ``make up`` does, on ``port_base``'s
    block; stopped at the end unless ``keep``) and the seconds it took to come up; or, with
    ``attach`` (a running stack's var dir, ``port_base`` its ports), that one, as it is."""
    if attach is not None:
        yield OwnStack(attach.resolve(), port_base), None
        return
    var_dir = ROOT / "var" / name
    log = ROOT / "var" / f"{name}.log"
    stack = OwnStack(var_dir, port_base)
    if not stack.ports_free():
        sys.exit(f"ports {port_base}..{port_base + 92} are in use: --port-base")
    shutil.rmtree(var_dir, ignore_errors=True)
    log.parent.mkdir(parents=True, exist_ok=True)  # a fresh clone has no var/
    log.unlink(missing_ok=True)
    progress(f"starting the stack in var/{name} (log var/{name}.log)")
    try:
        up_s = stack.up(log)
        progress(f"stack up and first model in production in {up_s:.0f} s")
        yield stack, up_s
    finally:
        if not keep:
            progress("stopping the stack")
            stack.down(log)


def predict_payloads(count: int = 2000, seed: int = 7) -> list[bytes]:
    from datetime import UTC, datetime

    from services.shared.proto.mlops.v1 import events_pb2, predictor_pb2

    rng = random.Random(seed)
    now = datetime.now(UTC).isoformat()
    return [
        predictor_pb2.PredictRequest(
            transaction=events_pb2.Transaction(
                transaction_id=f"load-{seed}-{i}",
                user_id=f"user-{rng.randrange(2000)}",
                merchant_id=f"merchant-{rng.randrange(200)}",
                amount=round(rng.uniform(1, 500), 2),
                currency="EUR",
                channel=("web", "pos", "app")[i % 3],
                country=("FR", "DE", "US", "GB", "ES")[rng.randrange(5)],
                event_time=now,
            )
        ).SerializeToString()
        for i in range(count)
    ]


PREDICT = "/mlops.v1.Predictor/Predict"


@dataclass
class LoadResult:
    seconds: float
    ok: int = 0
    failed: int = 0
    latencies: list[float] = field(default_factory=list)
    errors: dict[str, int] = field(default_factory=dict)
    # (start, end) of every span without a successful answer, in seconds from the start
    gaps: list[tuple[float, float]] = field(default_factory=list)

    @property
    def rate(self) -> float:
        return self.ok / self.seconds if self.seconds else 0.0

    def quantile_ms(self, q: float) -> float:
        if not self.latencies:
            return float("nan")
        ordered = sorted(self.latencies)
        return 1000 * ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    @property
    def success(self) -> float:
        total = self.ok + self.failed
        return self.ok / total if total else float("nan")

    @property
    def longest_gap_s(self) -> float:
        return max((b - a for a, b in self.gaps), default=0.0)


async def predict_load(
    address: str,
    seconds: float,
    *,
    concurrency: int = 32,
    rate: float | None = None,
    timeout_s: float = 1.0,
    payloads: list[bytes] | None = None,
    stop: asyncio.Event | None = None,
) -> LoadResult:
    """A closed loop of ``concurrency`` callers (or an open loop at ``rate`` calls/s)."""
    import grpc

    payloads = payloads or predict_payloads()
    result = LoadResult(seconds)
    async with grpc.aio.insecure_channel(address) as channel:
        call = channel.unary_unary(PREDICT, request_serializer=None, response_deserializer=None)
        loop = asyncio.get_running_loop()
        start = loop.time()
        end = start + seconds
        last_ok = start
        counter = iter(range(10**12))

        async def one() -> None:
            nonlocal last_ok
            i = next(counter)
            sent = time.perf_counter()
            try:
                await call(payloads[i % len(payloads)], timeout=timeout_s)
            except grpc.aio.AioRpcError as exc:
                result.failed += 1
                name = exc.code().name
                result.errors[name] = result.errors.get(name, 0) + 1
                return
            now = loop.time()
            if now - last_ok > 0.25:  # a span without answers worth reporting
                result.gaps.append((last_ok - start, now - start))
            last_ok = now
            result.ok += 1
            result.latencies.append(time.perf_counter() - sent)

        def going() -> bool:
            return loop.time() < end and not (stop is not None and stop.is_set())

        if rate is None:

            async def worker() -> None:
                while going():
                    await one()

            await asyncio.gather(*(worker() for _ in range(concurrency)))
        else:
            pending: set[asyncio.Task[None]] = set()
            n = 0
            while going():
                n += 1
                task = asyncio.ensure_future(one())
                pending.add(task)
                task.add_done_callback(pending.discard)
                await asyncio.sleep(max(start + n / rate - loop.time(), 0))
            await asyncio.gather(*pending)
        if loop.time() - last_ok > 0.25:
            result.gaps.append((last_ok - start, loop.time() - start))
        result.seconds = loop.time() - start
    return result


async def time_to_answer(address: str, timeout_s: float = 60.0) -> float:
    """Seconds until one Predict succeeds (polled every 20 ms, each try on a new connection).

    A new connection per try measures when the server answers again. A client that keeps one
    channel waits out gRPC's reconnect backoff on top (1 s, then x1.6 per failed try, unless
    its channel sets ``grpc.initial_reconnect_backoff_ms``): measured with one channel, the
    same restarts read 1.0-2.3 s."""
    import grpc

    payload = predict_payloads(1, seed=99)[0]
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        async with grpc.aio.insecure_channel(address) as channel:
            call = channel.unary_unary(PREDICT, request_serializer=None, response_deserializer=None)
            try:
                await call(payload, timeout=0.5, wait_for_ready=False)
                return time.monotonic() - started
            except grpc.aio.AioRpcError:
                pass
        await asyncio.sleep(0.02)
    raise TimeoutError(f"no Predict answer from {address} in {timeout_s} s")


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")
