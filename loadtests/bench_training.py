"""Benchmark: training time vs data volume (the training service's own pipeline).

    .venv/bin/python loadtests/bench_training.py      (what `make bench` runs)
    .venv/bin/python loadtests/bench_training.py --sizes 20000,80000 --repeats 1

The data: the simulator's history (``TrafficSimulator.history``, the world `mlops bootstrap`
publishes: 2,000 users, 3 transactions a day each, every transaction labelled) turned into
the offline store's files by the platform's own code, without a broker: ingestion's
validation (``EventRouter``) and archive rows, the features service's windows
(``UserActivity``, ``MerchantActivity``, ``TransactionLabelJoin``) and its feature-log writer.
One history is generated for the largest size; each size is its first N transactions (the
archive of a platform that has run for N / 6,000 days), with their labels and the feature
rows as of before the cut.

Timed, per size and repetition: ``TrainingPipeline.train`` on a snapshot of that archive, what
the training service runs for every request before it talks to MLflow and the registry:

- build: the point-in-time training set (Feast historical retrieval, DuckDB over Parquet);
- fit: the MLP (``fit_fraud_mlp``: up to 40 epochs, early stopping), threshold, test metrics;
- rest: the gradient-boosting baseline, the TorchScript export and the drift reference.

Each training runs in a fresh process (its memory is its own, not the history's): its CPU
seconds (all its threads) are the primary figure, as on a shared machine they vary much less
than wall time; wall seconds are reported too, with the load average; and its peak resident
memory. Memory bounds the default sizes (10k-40k): the point-in-time join grows faster than
the rows (docs/scaling.md), 40k rows peak at ~2 GB; mind the machine before larger ones.
The baseline is the smallest size of the same run: time ratio vs rows ratio says how training
grows with data. Medians over the repetitions (training is seeded and deterministic: the
repetitions repeat the same work, so they differ only by machine noise). Table to stdout and
var/bench/training.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from services.cli.simulate import record_value  # noqa: E402
from services.cli.simulator import SimulationConfig, TrafficSimulator  # noqa: E402
from services.features.events import (  # noqa: E402
    MerchantFact,
    TransactionRef,
    decode_label,
    decode_transaction,
)
from services.features.label_join import TransactionLabelJoin  # noqa: E402
from services.features.main import feature_log_writers  # noqa: E402
from services.features.offline_log import StampedRow  # noqa: E402
from services.features.settings import FeaturesSettings  # noqa: E402
from services.features.windows import (  # noqa: E402
    FeatureRow,
    MerchantActivity,
    UserActivity,
    WindowPolicy,
)
from services.ingestion.archive import (  # noqa: E402
    ArchiveFile,
    ArchiveRow,
    OfflineArchive,
    label_row,
    transaction_row,
)
from services.ingestion.routing import Accepted, EventRouter  # noqa: E402
from services.shared.datasets import create_snapshot  # noqa: E402
from services.shared.settings import FeastSettings, StorageSettings  # noqa: E402
from services.shared.topics import Topics  # noqa: E402
from services.shared.usecase.features import MERCHANT_VIEW, USER_VIEW  # noqa: E402
from services.training.fit import EpochReport  # noqa: E402
from services.training.pipeline import TrainingPipeline  # noqa: E402
from services.training.settings import TrainingSettings  # noqa: E402
from services.training.tracking import ExperimentTracker  # noqa: E402

# memory bounds the sizes: the point-in-time join grows faster than the rows (see report)
SIZES = (10_000, 20_000, 40_000)
REPEATS = 3
WORLD = SimulationConfig()  # `mlops bootstrap`'s world
DAY_US = 86_400_000_000
OUTPUT = ROOT / "var" / "bench" / "training.md"


def progress(message: str) -> None:
    print(f"[bench_training] {message}", flush=True)


@dataclasses.dataclass(frozen=True)
class Record:
    """What ingestion's router reads from a product topic (its ConsumedRecord)."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: tuple[tuple[str, bytes], ...] = ()
    timestamp: int | None = None


class NoLog:
    """The features service persists facts in faust tables; here nothing needs them back."""

    def put(self, key: tuple[str, ...], value: list[Any], partition: int) -> None:
        pass

    def remove(self, key: tuple[str, ...], partition: int) -> None:
        pass


@dataclasses.dataclass
class History:
    """The archive's rows and the feature rows of one simulated history, in event order."""

    transactions: list[tuple[int, ArchiveRow]] = dataclasses.field(default_factory=list)
    labels: list[tuple[str, ArchiveRow]] = dataclasses.field(default_factory=list)
    features: dict[str, list[FeatureRow]] = dataclasses.field(
        default_factory=lambda: {USER_VIEW: [], MERCHANT_VIEW: []}
    )

    def cut_us(self, rows: int) -> int:
        """Event time of the first transaction not in the first ``rows``."""
        if rows < len(self.transactions):
            return self.transactions[rows][0]
        return self.transactions[-1][0] + 1


def simulate(transactions: int) -> History:
    """The first ``transactions`` of a history through ingestion and the features service."""
    topics = Topics()
    router = EventRouter(topics)
    policy = WindowPolicy()
    users = UserActivity(NoLog(), policy)
    merchants = MerchantActivity(NoLog(), policy)
    join = TransactionLabelJoin(
        NoLog(), retention_us=8 * DAY_US, label_hold_us=DAY_US, max_pending=1_000_000
    )
    days = transactions / (WORLD.users * WORLD.transactions_per_user_per_day) * 1.2 + 1
    end = datetime(2026, 6, 1, tzinfo=UTC)
    simulator = TrafficSimulator(WORLD)
    history = History()
    position = 0

    def merchant(fact: MerchantFact) -> None:
        nonlocal position
        position += 1
        row = merchants.apply(fact, position, 0).row
        if row is not None:
            history.features[MERCHANT_VIEW].append(row)

    for offset, event in enumerate(simulator.history(end - timedelta(days=days), end)):
        # past the last transaction needed, until every label of those has come (the
        # simulator's label delay is at most 1.5 x 120 s)
        if len(history.transactions) > transactions and (
            event.at.timestamp() * 1e6 > history.cut_us(transactions) + 3600 * 1e6
        ):
            break
        topic = topics.transactions if event.kind == "transaction" else topics.labels
        record = Record(topic, 0, offset, event.key.encode(), record_value(event))
        routed = router.route(record, now=event.at)
        if not isinstance(routed, Accepted) or routed.output.value is None:
            continue  # the history has no invalid records; nothing is dropped here
        value = routed.output.value
        if event.kind == "transaction":
            txn = decode_transaction(value)
            history.transactions.append((txn.event_time_us, transaction_row(value)))
            row = users.apply(txn, offset, 0).row
            if row is not None:
                history.features[USER_VIEW].append(row)
            merchant(
                MerchantFact(
                    "txn",
                    txn.merchant_id,
                    txn.transaction_id,
                    txn.event_time_us,
                    False,
                    txn.event_time_us,
                    txn.ingested_us,
                )
            )
            ref = TransactionRef(txn.transaction_id, txn.merchant_id, txn.event_time_us)
            fact = join.on_transaction(ref, 0).fact
            if fact is not None:
                merchant(fact)
        else:
            label = decode_label(value)
            history.labels.append((label.transaction_id, label_row(value)))
            fact = join.on_label(label, 0).fact
            if fact is not None:
                merchant(fact)
    return history


def write_archive(history: History, rows: int, data_dir: Path) -> StorageSettings:
    """The offline store of a platform that has archived the history's first ``rows``."""
    storage = StorageSettings(data_dir=data_dir)
    cut = history.cut_us(rows)
    kept = history.transactions[:rows]
    ids = {row.event_id for _, row in kept}
    labels = [row for transaction_id, row in history.labels if transaction_id in ids]
    archive = OfflineArchive(storage.offline_dir)
    for dataset, dataset_rows in (("transactions", [r for _, r in kept]), ("labels", labels)):
        by_day: dict[int, list[tuple[Any, ...]]] = {}
        for row in dataset_rows:
            by_day.setdefault(row.event_day, []).append(row.values)
        offset = 0
        for day, values in sorted(by_day.items()):
            archive.write(ArchiveFile(dataset, 0, day, offset, offset + len(values) - 1, values))
            offset += len(values)
    writers = feature_log_writers(FeaturesSettings(storage=storage))
    created = int(time.time() * 1e6)
    for view, feature_rows in history.features.items():
        # rows as of before the cut: a row's event time is its entity's clock
        stamped = [
            StampedRow(r, created + i) for i, r in enumerate(feature_rows) if r.event_time_us < cut
        ]
        writers[view].write(stamped)
    return storage


class StageClock:
    """The pipeline's progress callback, timing its stages (CPU of this process, and wall)."""

    def __init__(self) -> None:
        self.marks: list[tuple[str, float, float]] = []
        self.epochs = 0

    def mark(self, name: str) -> None:
        self.marks.append((name, time.process_time(), time.perf_counter()))

    def stage(self, name: str) -> None:
        if name.startswith("training on"):
            self.mark("fit")
        elif name.startswith("training the gradient-boosting"):
            self.mark("rest")

    def epoch(self, report: EpochReport) -> None:
        self.epochs = report.epoch

    def durations(self) -> dict[str, tuple[float, float]]:
        """stage -> (CPU s, wall s); the stages between consecutive marks."""
        out = {}
        for (name, cpu, wall), (_, next_cpu, next_wall) in zip(
            self.marks, self.marks[1:], strict=False
        ):
            out[name] = (next_cpu - cpu, next_wall - wall)
        return out


@dataclasses.dataclass
class Run:
    rows: int
    train_rows: int
    epochs: int
    stages: dict[str, tuple[float, float]]
    rss_before_mb: float = 0.0
    peak_rss_mb: float = 0.0

    def cpu(self, stage: str | None = None) -> float:
        if stage is None:
            return sum(c for c, _ in self.stages.values())
        return self.stages[stage][0]

    @property
    def wall(self) -> float:
        return sum(w for _, w in self.stages.values())


def train_once(storage: StorageSettings, rows: int, project: str) -> Run:
    settings = TrainingSettings(storage=storage, feast=FeastSettings(project=project))
    # train() records nothing: the tracker (MLflow) and the registry are not called
    pipeline = TrainingPipeline(settings, ExperimentTracker(settings.mlflow), None)
    snapshot = create_snapshot(storage)
    clock = StageClock()
    clock.mark("build")
    trained = pipeline.train(snapshot, settings.params, clock)
    clock.mark("end")
    labelled = len(trained.split.train) + len(trained.split.validation) + len(trained.split.test)
    # every archived transaction has its label (the history runs past the cut until it has)
    assert labelled == rows, f"{labelled} labelled rows in the training set, {rows} archived"
    return Run(rows, len(trained.split.train), trained.epochs_run, clock.durations())


def _rss_mb() -> float:
    """Resident memory of this process now (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def train_in_child(data_dir: Path, rows: int, project: str) -> Run:
    """One training in a fresh process, as the service trains: its memory is its own (not
    the simulated history's), so its peak resident memory is the training's."""
    result = subprocess.run(
        [
            sys.executable,
            __file__,
            "--train",
            str(data_dir),
            "--rows",
            str(rows),
            "--project",
            project,
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        raise SystemExit(f"training {rows:,} rows failed:\n{result.stderr[-4000:]}")
    outcome = json.loads(result.stdout.strip().splitlines()[-1])
    return Run(
        rows,
        outcome["train_rows"],
        outcome["epochs"],
        {k: (v[0], v[1]) for k, v in outcome["stages"].items()},
        outcome["rss_before_mb"],
        outcome["peak_rss_mb"],
    )


def child(data_dir: Path, rows: int, project: str) -> int:
    # what a running service has loaded already: the lazily imported libraries of train()
    import duckdb  # noqa: F401
    import feast  # noqa: F401
    import sklearn.ensemble  # noqa: F401

    before = _rss_mb()
    run = train_once(StorageSettings(data_dir=data_dir), rows, project)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    print(
        json.dumps(
            {
                "train_rows": run.train_rows,
                "epochs": run.epochs,
                "stages": run.stages,
                "rss_before_mb": before,
                "peak_rss_mb": peak,
            }
        )
    )
    return 0


def least_squares(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Slope and intercept of y = a x + b."""
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx
    return slope, my - slope * mx


def median_run(runs: list[Run], value: Callable[[Run], float]) -> float:
    return statistics.median(value(r) for r in runs)


def report(results: dict[int, list[Run]], loads: list[float], repeats: int) -> str:
    sizes = sorted(results)
    base = sizes[0]
    base_cpu = median_run(results[base], lambda r: r.cpu())
    lines = [
        "## Training time vs data volume",
        "",
        f"`TrainingPipeline.train` (the training service's own code: point-in-time training "
        f"set through Feast, MLP fit with early stopping, baseline, export) on the first N "
        f"labelled transactions of one simulated history (`mlops bootstrap`'s world: "
        f"{WORLD.users:,} users, {WORLD.transactions_per_user_per_day:g} transactions a day "
        f"each, ~{WORLD.fraud_rate:.0%} fraud), archived and feature-logged by ingestion's and "
        f"the features service's code without a broker. One torch thread (the service's "
        f"setting). Each training in a fresh process with the libraries train() imports "
        f"already loaded (TorchScript's first compilation is in 'rest'). Medians of {repeats} "
        f"repetitions; CPU = CPU seconds of the training process (all threads), the figure to "
        f"size nodes with; peak memory = the process's peak resident memory (imports "
        f"included), and its growth from the start of the training; wall seconds depend on "
        f"what else ran: this 2-core machine was shared "
        f"with other work, 1-minute load average {min(loads):.1f}-{max(loads):.1f} during "
        f"the run.",
        "",
        "| labelled rows | train rows | epochs run | build CPU s | fit CPU s | rest CPU s "
        "| total CPU s | wall s | rows/CPU s | rows ratio | CPU ratio | peak memory MB "
        "| peak - start MB |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    totals = []
    for size in sizes:
        runs = results[size]
        total = median_run(runs, lambda r: r.cpu())
        totals.append(total)
        lines.append(
            f"| {size:,} | {runs[0].train_rows:,} | {runs[0].epochs} "
            f"| {median_run(runs, lambda r: r.cpu('build')):.1f} "
            f"| {median_run(runs, lambda r: r.cpu('fit')):.1f} "
            f"| {median_run(runs, lambda r: r.cpu('rest')):.1f} "
            f"| {total:.1f} | {median_run(runs, lambda r: r.wall):.1f} "
            f"| {size / total:,.0f} | {size / base:.1f} | {total / base_cpu:.2f} "
            f"| {median_run(runs, lambda r: r.peak_rss_mb):,.0f} "
            f"| {median_run(runs, lambda r: r.peak_rss_mb - r.rss_before_mb):,.0f} |"
        )
    lines.append("")
    if len(sizes) >= 2:
        slope, intercept = least_squares([float(s) for s in sizes], totals)

        def growth(value: Callable[[Run], float]) -> str:
            """Log-log slopes between consecutive sizes: 1 linear, 2 quadratic."""
            medians = [median_run(results[s], value) for s in sizes]
            return ", ".join(
                f"{math.log(b / a) / math.log(y / x):.2f}" if a > 0 and b > 0 else "n/a"
                for (x, a), (y, b) in itertools.pairwise(zip(sizes, medians, strict=True))
            )

        lines.append(
            f"Slope (least squares over the sizes, total CPU): **{slope * 100_000:.1f} CPU s "
            f"per 100,000 labelled rows**, intercept {intercept:.1f} s. Growth exponents "
            f"between consecutive sizes (1 = linear, 2 = quadratic): total CPU "
            f"{growth(lambda r: r.cpu())}; build {growth(lambda r: r.cpu('build'))}; fit per "
            f"epoch {growth(lambda r: r.cpu('fit') / max(r.epochs, 1))}; memory growth "
            f"{growth(lambda r: r.peak_rss_mb - r.rss_before_mb)}. Early stopping makes the "
            f"epoch count, and so the fit time, depend on the data, not only on its size."
        )
        lines.append("")
    lines.append(
        "Per repetition (rows: total CPU s / wall s): "
        + "; ".join(
            f"{s:,}: " + ", ".join(f"{r.cpu():.1f}/{r.wall:.1f}" for r in results[s]) for s in sizes
        )
    )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default=",".join(str(s) for s in SIZES))
    parser.add_argument("--repeats", type=int, default=REPEATS)
    parser.add_argument("--train", type=Path, help=argparse.SUPPRESS)  # the child's data dir
    parser.add_argument("--rows", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--project", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.train is not None:
        return child(args.train, args.rows, args.project)
    sizes = sorted(int(s) for s in args.sizes.split(","))
    loads = [os.getloadavg()[0]]
    started = time.perf_counter()
    progress(f"simulating {sizes[-1]:,} transactions through ingestion and features")
    history = simulate(sizes[-1])
    if len(history.transactions) < sizes[-1]:
        raise SystemExit(f"the history has only {len(history.transactions)} transactions")
    progress(f"simulated in {time.perf_counter() - started:.0f} s")
    results: dict[int, list[Run]] = {s: [] for s in sizes}
    with tempfile.TemporaryDirectory(prefix="bench-training-") as tmp:
        for size in sizes:
            write_archive(history, size, Path(tmp) / str(size))
        del history
        for repeat in range(args.repeats):
            for size in sizes:  # interleaved: drift of the machine's load hits every size
                run = train_in_child(Path(tmp) / str(size), size, f"bench{size}r{repeat}")
                results[size].append(run)
                loads.append(os.getloadavg()[0])
                progress(
                    f"repetition {repeat + 1}/{args.repeats}, {size:,} rows: "
                    f"{run.cpu():.1f} CPU s ({run.wall:.1f} s wall), {run.epochs} epochs, "
                    f"peak {run.peak_rss_mb:,.0f} MB"
                )
    text = report(results, loads, args.repeats)
    print(text)
    OUTPUT.parent.mkdir(parents=True, exist_ok=True)
    OUTPUT.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
