"""Chaos under load: every component killed in turn while traffic flows; what it cost.

    .venv/bin/python loadtests/chaos.py                       (`make chaos`: a stack of its own)
    .venv/bin/python loadtests/chaos.py --faults ingestion,serving --window 20
    .venv/bin/python loadtests/chaos.py --attach var --port-base 9000   (a running stack)

Starts what ``make up`` starts (``mlops stack up`` + ``mlops bootstrap``, in var/chaos-stack on
ports of its own, loadtests/stack_harness.py) unless ``--attach`` names a running one. Then,
for each fault of ``--faults`` in turn, with the simulator's default traffic (20
transactions/s, labels ~2 minutes later; published here, so that every broker
acknowledgement is recorded) and a Predict load (``--rate`` calls/s, open loop):

1. ``--at`` seconds into a ``--window``: kill -9 the program's process group (supervisord
   respawns it), or for ``kafka`` stop and start the broker (Tansu keeps its topics in memory:
   a restart loses them); measures the time until the component is healthy again and until
   Predict answers again (polled every 20 ms from the fault on);
2. the traffic pauses; the time until ingestion and features have no lag (``lag_s``);
3. every transaction the broker acknowledged in this round is in the offline archive exactly
   once (events lost: acknowledged, never archived; duplicated: archived more than once);
4. every user of the round: the online features (Feast) equal a recomputation from all of
   the user's archived transactions (the reference of tests/integration/features_harness.py).

Last, with the Predict load running, the newest other version is promoted to production and
rolled back (``--no-promotion`` skips it; a stack with a single version trains a second one
first through ``mlops train``): failed Predict calls during each. Prints one table row per
fault (RELIABILITY.md's table) and writes var/chaos.md. Every figure shares the machine with
whatever else runs on it: say what (the load average is printed).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import math
import sys
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "tests" / "integration"))

from loadtests.stack_harness import (  # noqa: E402
    LoadResult,
    OwnStack,
    environment,
    predict_load,
    progress,
    stack_for,
    time_to_answer,
)

FAULTS = (
    "ingestion",
    "features",
    "training",
    "registry",
    "serving",
    "monitoring",
    "triton",
    "redis",
    "mlflow",
    "kafka",
)
# the stack's components as their health probes name them
COMPONENT = {"kafka": "kafka", "triton": "triton", "redis": "redis", "mlflow": "mlflow"}


# ----------------------------------------------------------------------------- traffic


class Traffic:
    """The simulator's live traffic, published here so that each acknowledgement is known."""

    def __init__(self, env: dict[str, str], seed: int = 42, rate: float = 20.0) -> None:
        from services.cli.simulator import SimulationConfig, TrafficSimulator
        from services.shared.settings import KafkaSettings

        with environment(env):
            self.kafka = KafkaSettings()
        self.simulator = TrafficSimulator(SimulationConfig(seed=seed, rate=rate))
        self.acked: list[str] = []  # valid transaction ids the broker acknowledged, in order
        self.refused = 0  # records the broker did not acknowledge (the fault's doing)
        self.flowing = asyncio.Event()
        self.flowing.set()
        self._in_flight: set[asyncio.Future[Any]] = set()

    async def run(self, stop: asyncio.Event) -> None:
        from aiokafka import AIOKafkaProducer
        from aiokafka.errors import KafkaError

        from services.cli.simulate import record_value
        from services.shared.kafka import security_options
        from services.shared.topics import Topics

        topics = Topics.from_settings(self.kafka)
        producer = AIOKafkaProducer(
            bootstrap_servers=self.kafka.bootstrap,
            client_id="chaos-traffic",
            acks="all",
            linger_ms=20,
            request_timeout_ms=10_000,
            **security_options(self.kafka),
        )
        await producer.start()
        started = time.monotonic()
        first: datetime | None = None
        try:
            for event in self.simulator.live(datetime.now(UTC)):
                first = first or event.at
                while True:  # paused: the clock of the simulation stands still
                    wait = (event.at - first).total_seconds() - (time.monotonic() - started)
                    if stop.is_set():
                        return
                    if not self.flowing.is_set():
                        paused = time.monotonic()
                        await self.flowing.wait()
                        started += time.monotonic() - paused
                        continue
                    if wait > 0.002:
                        await asyncio.sleep(min(wait, 0.5))
                        continue
                    break
                topic = topics.labels if event.kind == "label" else topics.transactions
                tx_id = event.value.get("transaction_id", "")
                valid_tx = event.kind == "transaction" and event.expect == "valid"
                try:
                    future = await producer.send(topic, record_value(event), key=event.key.encode())
                except KafkaError:
                    self.refused += 1
                    continue
                self._in_flight.add(future)
                future.add_done_callback(
                    lambda f, tx_id=tx_id, valid_tx=valid_tx: self._settled(f, tx_id, valid_tx)
                )
        finally:
            with contextlib.suppress(Exception):
                await producer.stop()

    def _settled(self, future: asyncio.Future[Any], tx_id: str, valid_tx: bool) -> None:
        self._in_flight.discard(future)
        if future.cancelled() or future.exception() is not None:
            self.refused += 1
        elif valid_tx:
            self.acked.append(tx_id)

    async def pause(self) -> None:
        """Stop publishing and wait until every record sent is acknowledged or refused."""
        self.flowing.clear()
        if self._in_flight:
            await asyncio.wait(list(self._in_flight))

    def resume(self) -> None:
        self.flowing.set()


# ----------------------------------------------------------------------------- checks


class Checks:
    """Lag, the archive's exactly-once and the online features, against the running stack."""

    def __init__(self, env: dict[str, str]) -> None:
        from services.features.settings import FeaturesSettings
        from services.ingestion.settings import IngestionSettings
        from services.shared.featurestore import open_store
        from services.shared.settings import FeastSettings, RedisSettings, StorageSettings

        with environment(env):
            self.ingestion = IngestionSettings()
            self.features = FeaturesSettings()
            self.storage = StorageSettings()
            feast = FeastSettings()
            self.store = open_store(feast, RedisSettings(), self.storage)
            self.feature_service = feast.feature_service
        # where the features service reports an input partition whose commits stopped
        self.features_log = Path(env.get("MLOPS_STACK_VAR_DIR", "var")) / "log" / "features.log"

    async def wait_no_lag(self, timeout_s: float = 300.0) -> float:
        """Seconds until ingestion's and the features service's groups have no lag."""
        from services.cli.bootstrap import read_backlog

        started = time.monotonic()
        while True:
            with contextlib.suppress(Exception):  # the broker may still be coming back
                backlog = await read_backlog(self.ingestion, self.features)
                if backlog.total == 0:
                    return time.monotonic() - started
            if time.monotonic() - started > timeout_s:
                await self._report_lag()
                return math.inf
            await asyncio.sleep(0.5)

    async def _report_lag(self) -> None:
        """Which group lags on which partition (what a run that never caught up needs)."""
        from services.cli.bootstrap import backlog_groups
        from services.shared.kafka import consumer_groups_lag

        try:
            groups = backlog_groups(self.ingestion, self.features)
            lag = await consumer_groups_lag(self.ingestion.kafka, groups)
        except Exception as error:  # noqa: BLE001 - a report, not a check
            progress(f"  lag unreadable: {error!r}")
            return
        for group, partitions in lag.items():
            for tp, behind in sorted(partitions.items()):
                if behind:
                    progress(f"  lag: {group} {tp.topic}[{tp.partition}] {behind} records behind")
        with contextlib.suppress(OSError):
            stalls = [
                line
                for line in self.features_log.read_text().splitlines()
                if "input_partition_stalled" in line
            ]
            for line in stalls[-8:]:
                progress(f"  features: {line}")

    def archived(self) -> tuple[collections.Counter[str], dict[str, list[Any]]]:
        """Every archived transaction id with its count; the rows by user."""
        import pyarrow.parquet as pq

        from services.ingestion.archive import OfflineArchive

        counts: collections.Counter[str] = collections.Counter()
        by_user: dict[str, list[Any]] = collections.defaultdict(list)
        columns = ["transaction_id", "user_id", "merchant_id", "amount", "country", "event_time"]
        for path, *_ in OfflineArchive(self.storage.offline_dir).files("transactions"):
            table = pq.read_table(path, columns=columns, partitioning=None).to_pylist()
            for row in table:
                counts[row["transaction_id"]] += 1
                by_user[row["user_id"]].append(row)
        return counts, by_user

    def feature_differences(
        self, users: set[str], by_user: dict[str, list[Any]]
    ) -> list[tuple[str, str, Any, Any]]:
        """(user, feature, online, recomputed) for every feature that differs."""
        from features_harness import US, Txn, online_features, user_features

        wanted = sorted(u for u in users if by_user.get(u))
        if not wanted:  # nothing of the round archived: the lost count says it
            return []
        online, _ = online_features(self.store, self.feature_service, wanted, [])
        differences = []
        for user in wanted:
            seen: dict[str, Txn] = {}
            for row in by_user[user]:
                seen[row["transaction_id"]] = Txn(
                    row["transaction_id"],
                    user,
                    row["merchant_id"],
                    row["amount"],
                    row["country"],
                    int(row["event_time"].timestamp() * US),
                )
            reference = user_features(list(seen.values()))
            for name, want in reference.items():
                got = online[user].get(name)
                if not _same(got, want):
                    differences.append((user, name, got, want))
        return differences


def _same(got: Any, want: Any) -> bool:
    if isinstance(want, float) and isinstance(got, int | float):
        return math.isclose(got, want, rel_tol=1e-6, abs_tol=1e-6)
    return bool(got == want)


# ----------------------------------------------------------------------------- one fault


@dataclass
class Row:
    fault: str
    load: LoadResult
    recovery_s: float
    answer_s: float
    lag_s: float
    acked: int
    lost: int
    duplicated: int
    refused: int
    users_checked: int
    feature_differences: list[tuple[str, str, Any, Any]] = field(default_factory=list)
    load_average: float = 0.0


async def inject(stack: OwnStack, fault: str, faulted: asyncio.Event) -> float:
    """Kill -9 ``fault`` (restart the broker for kafka), setting ``faulted`` once it is down;
    seconds until it is healthy again."""
    components = [c for c in stack.stack.components() if c.name == COMPONENT.get(fault, fault)]
    started = time.monotonic()
    if fault == "kafka":
        await asyncio.to_thread(stack.stop, "kafka")
        faulted.set()
        await asyncio.to_thread(stack.start, "kafka")
    else:
        old = await asyncio.to_thread(stack.kill, fault)
        faulted.set()
        await asyncio.to_thread(stack.wait_running, fault, old, 120.0)

    def healthy() -> bool:
        return all(h.ok for h in stack.stack.health(components).values())

    while not await asyncio.to_thread(healthy):
        if time.monotonic() - started > 180:
            return math.inf
        await asyncio.sleep(0.1)
    return time.monotonic() - started


async def one_fault(
    stack: OwnStack, fault: str, traffic: Traffic, checks: Checks, args: argparse.Namespace
) -> Row:
    first = len(traffic.acked)
    refused = traffic.refused
    load = asyncio.ensure_future(predict_load(stack.serving_address, args.window, rate=args.rate))
    await asyncio.sleep(args.at)
    faulted = asyncio.Event()
    recovering = asyncio.ensure_future(inject(stack, fault, faulted))
    await faulted.wait()
    # from the fault on: a probe that left before it would measure nothing
    answered = asyncio.ensure_future(time_to_answer(stack.serving_address, timeout_s=180))
    recovery = await recovering
    with contextlib.suppress(TimeoutError):
        answer_s = await answered
    if not answered.done() or answered.exception() is not None:
        answer_s = math.inf
    result = await load
    await traffic.pause()
    lag_s = await checks.wait_no_lag()
    round_ids = traffic.acked[first:]
    counts, by_user = await asyncio.to_thread(checks.archived)
    lost = sum(1 for t in round_ids if counts[t] == 0)
    duplicated = sum(1 for t in set(round_ids) if counts[t] > 1)
    round_set = set(round_ids)
    users = {
        u for u, rows in by_user.items() if any(r["transaction_id"] in round_set for r in rows)
    }
    differences = await asyncio.to_thread(checks.feature_differences, users, by_user)
    traffic.resume()
    return Row(
        fault,
        result,
        recovery,
        answer_s,
        lag_s,
        len(round_ids),
        lost,
        duplicated,
        traffic.refused - refused,
        len(users),
        differences,
        psutil.getloadavg()[0],
    )


# ----------------------------------------------------------------------------- promotion


async def promotion_under_load(stack: OwnStack, args: argparse.Namespace) -> list[str]:
    """Promote the newest other version, then roll back, each under the Predict load."""
    from services.shared.registry_client import RegistryClient
    from services.shared.settings import RegistryClientSettings

    with environment(stack.client_env()):
        settings = RegistryClientSettings()
    lines = []
    with RegistryClient(settings) as registry:
        versions = registry.list_versions()
        production = [v.version for v in versions if "production" in v.aliases]
        others = [v.version for v in versions if v.version not in production]
        if not production or not others:
            return [f"promotion/rollback: not measured (versions {[v.version for v in versions]})"]
        target = max(others)
        for what, change in (
            (f"promote v{target} to production", lambda: registry.set_alias("production", target)),
            ("rollback", lambda: registry.rollback("chaos: rollback under load")),
        ):
            load = asyncio.ensure_future(
                predict_load(stack.serving_address, args.window, rate=args.rate)
            )
            await asyncio.sleep(args.at)
            started = time.monotonic()
            await asyncio.to_thread(change)
            took = time.monotonic() - started
            result = await load
            lines.append(
                f"{what} (took {took:.2f} s): Predict {result.ok} answered, {result.failed} "
                f"failed {result.errors or ''}, longest gap {result.longest_gap_s:.2f} s"
            )
    return lines


# ----------------------------------------------------------------------------- main


def render(rows: list[Row], promotion: list[str], args: argparse.Namespace) -> str:
    lines = [
        f"Chaos run: {len(rows)} faults, Predict at {args.rate:g}/s (open loop, 1 s deadline) "
        f"over {args.window:g} s windows with the fault at {args.at:g} s; the simulator's "
        "default traffic (20 transactions/s). Load average at each row's end is given: the "
        "machine is shared.",
        "",
        "| fault | Predict success during the window | longest gap | Predict answers again "
        "after | component healthy after | lag zero after | acknowledged | lost | duplicated "
        "| online features = archive recomputation | load avg | reproduce |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        fault = "broker restart" if r.fault == "kafka" else f"kill -9 {r.fault}"
        features = (
            f"yes ({r.users_checked} users)"
            if not r.feature_differences
            else f"**no**: {len(r.feature_differences)} differences in {r.users_checked} users, "
            f"e.g. {r.feature_differences[0]}"
        )
        lines.append(
            f"| {fault} | {r.load.success:.2%} ({r.load.ok:,} of {r.load.ok + r.load.failed:,}"
            f"{', ' + str(r.load.errors) if r.load.errors else ''}) | "
            f"{r.load.longest_gap_s:.2f} s | {r.answer_s:.2f} s | {r.recovery_s:.2f} s | "
            f"{r.lag_s:.1f} s | {r.acked:,} | {r.lost:,} | {r.duplicated:,} | {features} | "
            f"{r.load_average:.1f} | `python loadtests/chaos.py --faults {r.fault}` |"
        )
    if rows and any(r.refused for r in rows):
        lines += [
            "",
            "Records the broker refused (not acknowledged, so not counted as lost): "
            + ", ".join(f"{r.fault} {r.refused}" for r in rows if r.refused),
        ]
    lines += ["", *promotion]
    return "\n".join(lines) + "\n"


async def run(stack: OwnStack, args: argparse.Namespace) -> tuple[list[Row], list[str]]:
    traffic = Traffic(stack.client_env())
    checks = Checks(stack.client_env())
    stop = asyncio.Event()
    publishing = asyncio.create_task(traffic.run(stop))
    rows: list[Row] = []
    promotion: list[str] = []
    try:
        progress("traffic flowing; 10 s before the first fault")
        await asyncio.sleep(10)
        for fault in args.faults:
            progress(f"{fault}: fault at {args.at:g} s of a {args.window:g} s Predict window")
            row = await one_fault(stack, fault, traffic, checks, args)
            rows.append(row)
            progress(
                f"  success {row.load.success:.2%}, gap {row.load.longest_gap_s:.2f} s, answers "
                f"again after {row.answer_s:.2f} s, healthy after {row.recovery_s:.2f} s, lag "
                f"zero after {row.lag_s:.1f} s, acked {row.acked} lost {row.lost} duplicated "
                f"{row.duplicated}, feature differences {len(row.feature_differences)} "
                f"({row.users_checked} users); load {row.load_average:.1f}"
            )
        if args.promotion:
            progress("promotion and rollback under load")
            promotion = await promotion_under_load(stack, args)
            for line in promotion:
                progress(f"  {line}")
    finally:
        stop.set()
        traffic.resume()
        await publishing
    return rows, promotion


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port-base", type=int, default=23500)
    parser.add_argument("--attach", type=Path, help="var dir of a running stack to use")
    parser.add_argument("--faults", default=",".join(FAULTS))
    parser.add_argument("--rate", type=float, default=50.0)
    parser.add_argument("--window", type=float, default=30.0)
    parser.add_argument("--at", type=float, default=5.0)
    parser.add_argument("--no-promotion", dest="promotion", action="store_false")
    parser.add_argument("--keep", action="store_true", help="Leave the stack running")
    parser.add_argument("--out", type=Path, default=ROOT / "var" / "chaos.md")
    args = parser.parse_args()
    args.faults = [f for f in args.faults.split(",") if f]
    unknown = set(args.faults) - set(FAULTS)
    if unknown:
        sys.exit(f"unknown faults {sorted(unknown)}; known: {', '.join(FAULTS)}")

    with stack_for("chaos-stack", args.port_base, args.attach, args.keep) as (stack, _):
        rows, promotion = asyncio.run(run(stack, args))
    report = render(rows, promotion, args)
    print(report)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(report)


if __name__ == "__main__":
    main()
