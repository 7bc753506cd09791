"""Benchmark of the ingestion service against a raw aiokafka consume-and-produce loop.

    .venv/bin/python loadtests/bench_ingestion.py            (what `make bench` runs)

Everything runs on this machine on free ports: a Tansu broker and a Redis. For each repetition
the same input (simulated traffic: transactions and labels, a few invalid records and
duplicates, JSON as product services send it) is published to fresh topics, then consumed by:

1. Baseline: a raw aiokafka loop in its own process: getmany, send every record's bytes
   unchanged to one output topic, await every acknowledgement, commit. The same batch size
   and producer settings as the service; no decoding, validation, duplicate check or archive.
2. Ingestion (validator): ``python -m services.ingestion`` with ``role=validator``: decode,
   validate, deduplicate in Redis, produce validated protobuf / dead letters, commit.
3. Two validator processes in the group (the service scales by partitions).
4. The validator with the archive beside it in a second process (``role=archive``).
5. Both in one process (``role=all``, the default): the archive competes for its core.

Throughput is the records consumed divided by the time between the first and the last output
record (producer timestamps), so process start-up and group joins are not counted. CPU per
record is the CPU time the target's processes spent in that window (sampled from /proc), over
the records. Medians over the repetitions; ratios against the baseline of the same
repetition. Table to stdout and var/bench/ingestion.md.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from aiokafka import AIOKafkaConsumer, TopicPartition  # noqa: E402
from redis import Redis  # noqa: E402
from rich.progress import Progress  # noqa: E402

from services.cli import localinfra  # noqa: E402
from services.cli.simulate import publish  # noqa: E402
from services.cli.simulator import SimulationConfig, TrafficSimulator  # noqa: E402
from services.shared.kafka import create_consumer, create_producer, ensure_topics  # noqa: E402
from services.shared.settings import KafkaSettings  # noqa: E402
from services.shared.topics import Topics  # noqa: E402

# Each target's measured window is only a few seconds long and this machine is shared:
# single runs swing by +-20 %. Five repetitions of twice the records keep the median steady.
REPETITIONS = 5
HISTORY_DAYS = 6  # of simulated traffic: ~120,000 input records per run
BATCH = 1000  # records per poll, as the service's default batch_max_records
PARTITIONS = 4
TARGET = 0.7
# service processes of each target (MLOPS_INGESTION_ROLE of each)
TARGETS = {
    "ingestion (validator)": ["validator"],
    "ingestion (2 validator processes)": ["validator", "validator"],
    "ingestion + archive (2 processes)": ["validator", "archive"],
    "ingestion + archive (1 process)": ["all"],
}


def progress(message: str) -> None:
    print(f"[bench_ingestion {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def _kafka(bootstrap: str, prefix: str) -> KafkaSettings:
    return KafkaSettings(
        bootstrap=bootstrap,
        topic_prefix=prefix,
        broker_flavor="tansu",
        partitions=PARTITIONS,
        session_timeout_ms=6000,
    )


# ============================================================================ baseline


async def baseline_loop(kafka: KafkaSettings, expected: int) -> None:
    """Consume the product topics and forward every record unchanged, at-least-once."""
    topics = Topics.from_settings(kafka)
    consumer = create_consumer(
        kafka,
        topics.transactions,
        topics.labels,
        group_id=f"{kafka.topic_prefix}baseline",
        client_id="baseline",
        max_poll_records=BATCH,
    )
    producer = create_producer(kafka, client_id="baseline")
    await consumer.start()
    await producer.start()
    done = 0
    try:
        while done < expected:
            batch = await consumer.getmany(timeout_ms=200, max_records=BATCH)
            if not batch:
                continue
            futures = [
                await producer.send(topics.validated, r.value, key=r.key, headers=r.headers)
                for records in batch.values()
                for r in records
            ]
            await asyncio.gather(*futures)
            await consumer.commit({tp: rs[-1].offset + 1 for tp, rs in batch.items() if rs})
            done += len(futures)
    finally:
        await producer.stop()
        await consumer.stop()


# ============================================================================ measurement


async def _end_offsets(kafka: KafkaSettings, topics: list[str]) -> dict[TopicPartition, int]:
    consumer = create_consumer(kafka, group_id=None, client_id="bench")
    await consumer.start()
    try:
        return await consumer.end_offsets(
            [TopicPartition(t, p) for t in topics for p in range(PARTITIONS)]
        )
    finally:
        await consumer.stop()


async def _wait_committed(
    kafka: KafkaSettings,
    group: str,
    topics: list[str],
    processes: list[subprocess.Popen[bytes]],
) -> None:
    ends = await _end_offsets(kafka, topics)
    consumer = AIOKafkaConsumer(bootstrap_servers=kafka.bootstrap, group_id=group)
    await consumer.start()
    try:
        deadline = time.monotonic() + 600
        while True:
            committed = {tp: await consumer.committed(tp) or 0 for tp in ends}
            if all(committed[tp] >= end for tp, end in ends.items()):
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"{group} did not finish")
            if any(p.poll() is not None for p in processes):
                raise RuntimeError(f"a process of {group} exited; see its log")
            await asyncio.sleep(0.2)
    finally:
        await consumer.stop()


async def _output_window(kafka: KafkaSettings, topics: list[str]) -> tuple[int, float, float]:
    """(records, first, last): producer timestamps (epoch seconds) of the output records."""
    ends = await _end_offsets(kafka, topics)
    consumer = create_consumer(kafka, group_id=None, client_id="bench-reader")
    await consumer.start()
    first, last, count = float("inf"), 0.0, 0
    try:
        consumer.assign(list(ends))
        await consumer.seek_to_beginning(*ends)
        while count < sum(ends.values()):
            for records in (await consumer.getmany(timeout_ms=500, max_records=10_000)).values():
                for r in records:
                    first, last = min(first, r.timestamp), max(last, r.timestamp)
                    count += 1
    finally:
        await consumer.stop()
    return count, first / 1000, last / 1000


class CpuSampler:
    """Samples the CPU time (user + system) of some processes, to tell the CPU they spent
    between two wall-clock moments: a measure that contention on a shared machine distorts
    far less than throughput."""

    def __init__(self, pids: list[int]) -> None:
        self.pids = pids
        self.samples: list[tuple[float, float]] = []
        self._tick = os.sysconf("SC_CLK_TCK")

    def _cpu(self) -> float:
        total = 0.0
        for pid in self.pids:
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            total += (int(fields[11]) + int(fields[12])) / self._tick  # utime, stime
        return total

    async def run(self) -> None:
        while True:
            self.samples.append((time.time(), self._cpu()))
            await asyncio.sleep(0.05)

    def between(self, start: float, end: float) -> float:
        def at(moment: float) -> float:
            before = [c for t, c in self.samples if t <= moment]
            return before[-1] if before else self.samples[0][1]

        return at(end) - at(start)


def _spawn(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as handle:
        return subprocess.Popen(
            args, env={**os.environ, **env}, stdout=handle, stderr=subprocess.STDOUT, cwd=ROOT
        )


def _service_env(
    kafka: KafkaSettings, redis_port: int, data_dir: Path, role: str
) -> dict[str, str]:
    return {
        "MLOPS_KAFKA_BOOTSTRAP": kafka.bootstrap,
        "MLOPS_KAFKA_TOPIC_PREFIX": kafka.topic_prefix,
        "MLOPS_KAFKA_BROKER_FLAVOR": "tansu",
        "MLOPS_KAFKA_PARTITIONS": str(PARTITIONS),
        "MLOPS_KAFKA_SESSION_TIMEOUT_MS": "6000",
        "MLOPS_REDIS_PORT": str(redis_port),
        "MLOPS_STORAGE_DATA_DIR": str(data_dir),
        "MLOPS_INGESTION_METRICS_PORT": "0",
        "MLOPS_INGESTION_ROLE": role,
        "MLOPS_INGESTION_DEDUP_NAMESPACE": f"{kafka.topic_prefix}dedup",
        "MLOPS_INGESTION_GROUP_ID": f"{kafka.topic_prefix}ingestion",
        "MLOPS_INGESTION_ARCHIVE_GROUP_ID": f"{kafka.topic_prefix}ingestion-archive",
        "MLOPS_LOG_LEVEL": "WARNING",
    }


async def _prepare(bootstrap: str, events: list, label: str) -> tuple[KafkaSettings, int]:
    kafka = _kafka(bootstrap, f"b{uuid.uuid4().hex[:8]}.")
    await ensure_topics(kafka)
    stats = await publish(events, kafka, rate=None)
    progress(f"{label}: {stats.records:,} input records published")
    return kafka, stats.records


async def run_target(
    target: str, bootstrap: str, redis_pid: int, redis_port: int, events: list, work: Path
) -> tuple[float, float]:
    """(records/s, CPU microseconds per record) of one target on a fresh copy of the input."""
    kafka, records = await _prepare(bootstrap, events, target)
    topics = Topics.from_settings(kafka)
    log = work / f"{target}.log"
    processes: list[subprocess.Popen[bytes]] = []
    if target == "baseline":
        command = [sys.executable, __file__, "--baseline-worker", kafka.bootstrap]
        processes.append(_spawn([*command, kafka.topic_prefix, str(records)], {}, log))
        group, outputs = f"{kafka.topic_prefix}baseline", [topics.validated]
        pids = [p.pid for p in processes]
    else:
        # every run starts from an empty Redis: the claims of earlier runs (hashes of a few
        # hundred thousand fields) would make later runs pay for growing larger hashes
        Redis(port=redis_port).flushall()
        data_dir = work / f"data-{kafka.topic_prefix}"
        for role in TARGETS[target]:
            env = _service_env(kafka, redis_port, data_dir, role)
            processes.append(_spawn([sys.executable, "-m", "services.ingestion"], env, log))
        group = f"{kafka.topic_prefix}ingestion"
        outputs = [topics.validated, topics.validated_labels, topics.dlq]
        pids = [p.pid for p in processes] + [redis_pid]  # the duplicate check's cost included
    sampler = CpuSampler(pids)
    sampling = asyncio.create_task(sampler.run())
    try:
        await _wait_committed(kafka, group, [topics.transactions, topics.labels], processes)
        await asyncio.sleep(0.2)  # one more CPU sample after the last output
    finally:
        sampling.cancel()
        for process in processes:
            process.terminate()
        for process in processes:
            process.wait(60)
    count, first, last = await _output_window(kafka, outputs)
    cpu_us = sampler.between(first, last) / max(count, 1) * 1e6
    progress(f"{target}: {count:,} outputs in {last - first:.2f}s, {cpu_us:.0f} us CPU/record")
    return records / (last - first), cpu_us


def _table(results: dict[str, list[tuple[float, float]]], records: int, repetitions: int) -> str:
    baseline = results["baseline"]
    lines = [
        "## Ingestion throughput",
        "",
        f"{records:,} input records (JSON transactions and labels, ~2 % invalid, ~1 % duplicates) "
        f"per run, {PARTITIONS} partitions, Tansu broker and Redis on this machine (Redis "
        "emptied before each run, so that every run claims ids into an empty hash), "
        f"{repetitions} repetitions, each running every target in turn. Throughput ratio: the "
        "target's records/s over the baseline's in the same repetition (the baseline is a raw "
        "aiokafka consume-and-produce loop); median over repetitions; target >= "
        f"{TARGET} for ingestion. CPU: user+system CPU of the target's processes (for ingestion "
        "including the Redis server) per record while it produced its outputs; the CPU ratio "
        "(baseline CPU / target CPU) is what the throughput ratio would be on an otherwise idle "
        "core, and varies much less than throughput when the machine is shared.",
        "",
        "| target | records/s (median) | runs (records/s) | throughput ratio | "
        "CPU us/record (median) | CPU ratio |",
        "|---|---:|---|---:|---:|---:|",
    ]
    for name, values in results.items():
        rates = [v[0] for v in values]
        cpus = [v[1] for v in values]
        ratios = [v[0] / b[0] for v, b in zip(values, baseline, strict=True)]
        cpu_ratios = [b[1] / v[1] for v, b in zip(values, baseline, strict=True)]
        lines.append(
            f"| {name} | {statistics.median(rates):,.0f} | "
            f"{', '.join(f'{r:,.0f}' for r in rates)} | {statistics.median(ratios):.2f} | "
            f"{statistics.median(cpus):.0f} | {statistics.median(cpu_ratios):.2f} |"
        )
    return "\n".join(lines) + "\n"


async def main(repetitions: int, only: list[str] | None) -> None:
    work = Path(tempfile.mkdtemp(prefix="bench-ingestion-"))
    kafka_port, redis_port = localinfra.free_port(), localinfra.free_port()
    progress("starting Tansu and Redis")
    broker = localinfra.RunningProcess(localinfra.tansu(kafka_port), work / "tansu.log")
    redis = localinfra.RunningProcess(localinfra.redis(redis_port, None), work / "redis.log")
    try:
        config = SimulationConfig(
            seed=7, transactions_per_user_per_day=5, invalid_fraction=0.02, duplicate_fraction=0.01
        )
        end = datetime.now(UTC) - timedelta(minutes=1)
        events = list(TrafficSimulator(config).history(end - timedelta(days=HISTORY_DAYS), end))
        progress(f"workload: {len(events):,} records")
        targets = ["baseline", *(only or TARGETS)]
        results: dict[str, list[tuple[float, float]]] = {t: [] for t in targets}
        with Progress(transient=True) as bar:
            task = bar.add_task("benchmark runs", total=repetitions * len(targets))
            for repetition in range(repetitions):
                for target in targets:
                    rate, cpu_us = await run_target(
                        target,
                        f"127.0.0.1:{kafka_port}",
                        redis.process.pid,
                        redis_port,
                        events,
                        work,
                    )
                    results[target].append((rate, cpu_us))
                    progress(
                        f"run {repetition + 1}/{repetitions} {target}: {rate:,.0f} records/s, "
                        f"{cpu_us:.0f} us CPU/record"
                    )
                    bar.advance(task)
        table = _table(results, len(events), repetitions)
        print(table)
        out = ROOT / "var" / "bench" / "ingestion.md"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(table)
        progress(f"wrote {out.relative_to(ROOT)}")
    finally:
        redis.stop()
        broker.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline-worker", nargs=3, metavar=("BOOTSTRAP", "PREFIX", "RECORDS"))
    parser.add_argument(
        "--repetitions",
        type=int,
        default=REPETITIONS,
        help=f"repetitions of every target (default {REPETITIONS}; fewer while iterating)",
    )
    parser.add_argument(
        "--target",
        action="append",
        choices=list(TARGETS),
        help="run only this target beside the baseline (repeatable; default: all of them)",
    )
    args = parser.parse_args()
    if args.baseline_worker:
        bootstrap, prefix, expected = args.baseline_worker
        import uvloop  # the event loop the services run on (services/shared/runtime.py)

        uvloop.run(baseline_loop(_kafka(bootstrap, prefix), int(expected)))
    else:
        asyncio.run(main(args.repetitions, args.target))
