"""`mlops bootstrap`: the first production model of a fresh platform, so Predict works at once.

1. If the registry already has a production version, nothing to do (``--force`` trains anyway;
   the gate then decides as for any candidate).
2. Simulated history (``TrafficSimulator.history``: ``--days`` of backdated transactions and
   their labels) is published to Kafka, as product services would; by default only when the
   offline store holds no transactions yet, so a re-run after a timeout does not publish twice.
3. Wait, with progress and a deadline, until the platform has processed it: the ingestion
   archive holds every transaction and label published (counted against the offline store's
   counts from before, so earlier data does not fool the check), and the consumer groups of
   ingestion and features have no lag on any of their topics (both commit an offset only once
   its outputs are durable). Feature rows are not counted against transactions: events that
   arrive later than the allowed lateness are dropped by design, and reported.
4. Snapshot the offline store, train in this process (progress shown), register: the first
   version passes the gate and becomes production.
5. Check that Triton serves it: the version is ready and answers a tiny inference.

The local stack runs it after ``make up`` when there is no production model. Settings come from
the environment like every other command (``MLOPS_KAFKA_*``, ``MLOPS_STORAGE_*``,
``MLOPS_MLFLOW_*``, ``MLOPS_REGISTRY_CLIENT_*``, ``MLOPS_TRITON_*``, ``MLOPS_TRAINING_*``).
"""

from __future__ import annotations

import asyncio
import getpass
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Annotated

import pyarrow.parquet as pq
import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from services.cli.simulator import SimulationConfig, TrafficSimulator
from services.cli.train import console, retrain_request, run_local
from services.features.settings import FeaturesSettings
from services.ingestion.settings import IngestionSettings
from services.registry.triton_repository import TritonModelRepository
from services.shared.datasets import LABELS, TRANSACTIONS, create_snapshot
from services.shared.errors import NotFound, PlatformError
from services.shared.kafka import consumer_groups_lag
from services.shared.registry_client import RegistryClient
from services.shared.settings import StorageSettings, TritonSettings
from services.shared.topics import Topics
from services.shared.usecase.features import MERCHANT_VIEW, MODEL_INPUTS, USER_VIEW
from services.training.settings import TrainingSettings

USER_ROWS = f"features/{USER_VIEW}"
MERCHANT_ROWS = f"features/{MERCHANT_VIEW}"
TRACKED = (TRANSACTIONS, LABELS, USER_ROWS, MERCHANT_ROWS)
_LABELS = {
    TRANSACTIONS: "transactions archived",
    LABELS: "labels archived",
    USER_ROWS: "user feature rows logged",
    MERCHANT_ROWS: "merchant feature rows logged",
}


def offline_rows(storage: StorageSettings) -> dict[str, int]:
    """Rows per dataset in the offline store (complete files only, not ones being written)."""
    counts = dict.fromkeys(TRACKED, 0)
    root = storage.offline_dir
    for dataset in TRACKED:
        directory = root / dataset
        if not directory.exists():
            continue
        for path in directory.rglob("*.parquet"):
            if any(part.startswith(".") for part in path.relative_to(root).parts):
                continue
            try:
                counts[dataset] += pq.ParquetFile(path).metadata.num_rows
            except (OSError, ValueError):
                continue  # renamed or removed between listing and reading
    return counts


@dataclass(frozen=True)
class CatchUp:
    """How many new rows the archive must gain for the published history to be archived."""

    baseline: dict[str, int]
    expected: dict[str, int]

    @classmethod
    def for_history(cls, baseline: dict[str, int], transactions: int, labels: int) -> CatchUp:
        # ingestion archives exactly once: the counts are exact
        return cls(baseline, {TRANSACTIONS: transactions, LABELS: labels})

    @classmethod
    def nothing_new(cls, baseline: dict[str, int]) -> CatchUp:
        return cls(baseline, {})

    def gained(self, now: dict[str, int]) -> dict[str, int]:
        return {d: now.get(d, 0) - self.baseline.get(d, 0) for d in TRACKED}

    def missing(self, now: dict[str, int]) -> dict[str, int]:
        gained = self.gained(now)
        return {d: n - gained[d] for d, n in self.expected.items() if gained[d] < n}


@dataclass(frozen=True)
class Backlog:
    """Records the consumers between Kafka and the offline store have not processed yet.

    Both services commit an input offset only once what it produced is durable (archive files,
    validated records, feature rows online and offline, re-keyed facts), so a group with no
    lag has finished with everything published before the lag was read.
    """

    ingestion: int
    features: int

    @property
    def total(self) -> int:
        return self.ingestion + self.features


def backlog_groups(
    ingestion: IngestionSettings, features: FeaturesSettings
) -> dict[str, list[str]]:
    """The consumer groups whose lag is the platform's backlog, with their topics, in the
    order records flow through them."""
    topics = Topics.from_settings(ingestion.kafka)
    return {
        ingestion.group_id: [topics.transactions, topics.labels],
        ingestion.archive_group_id: [topics.validated, topics.validated_labels],
        features.group_id: features.input_topics(),
    }


async def read_backlog(ingestion: IngestionSettings, features: FeaturesSettings) -> Backlog:
    """Ingestion's groups first, then the features service's (one connection; the end offsets
    are read after every group's commits): ingestion feeds features, so with no ingestion lag
    a zero features lag covers everything ingestion produced."""
    lag = await consumer_groups_lag(ingestion.kafka, backlog_groups(ingestion, features))
    return Backlog(
        ingestion=sum(lag[ingestion.group_id].values())
        + sum(lag[ingestion.archive_group_id].values()),
        features=sum(lag[features.group_id].values()),
    )


def wait_for_catch_up(
    storage: StorageSettings,
    target: CatchUp,
    backlog: Callable[[], Backlog],
    timeout_s: float,
    on_poll: Callable[[dict[str, int], Backlog], None] | None = None,
    interval_s: float = 1.0,
) -> dict[str, int]:
    """Poll until the archive holds ``target`` and no consumer group has a backlog.

    Returns the offline store's row counts; raises TimeoutError naming what lags.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        now = offline_rows(storage)
        missing = target.missing(now)
        behind = backlog()
        if on_poll is not None:
            on_poll(target.gained(now), behind)
        if not missing and not behind.total:
            return now
        if time.monotonic() > deadline:
            detail = [f"{_LABELS[d]}: {n} missing" for d, n in missing.items()]
            if behind.ingestion:
                detail.append(f"ingestion: {behind.ingestion} records not processed")
            if behind.features:
                detail.append(f"features: {behind.features} records not processed")
            raise TimeoutError(
                f"the platform did not process the history within {timeout_s:.0f}s "
                f"({', '.join(detail)}); are the ingestion and features services running? "
                "(mlops stack status)"
            )
        time.sleep(interval_s)


def _progress() -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
    )


_WORLD = SimulationConfig()  # the simulator's defaults, which `mlops simulate` shares


def _publish_history(
    settings: TrainingSettings, days: float, world: SimulationConfig
) -> tuple[int, int]:
    from services.cli.simulate import PublishStats, publish

    # the world and per-user rate of `mlops simulate` with the same options: its live traffic
    # continues this history as the same process
    simulator = TrafficSimulator(world)
    end = datetime.now(UTC)
    events = simulator.history(end - timedelta(days=days), end)
    with _progress() as bar:
        task = bar.add_task("publishing simulated history", total=None)

        def report(stats: PublishStats) -> None:
            bar.update(task, completed=stats.records)

        stats = asyncio.run(publish(events, settings.kafka, progress=report))
    valid = stats.transactions - stats.invalid - stats.duplicates
    console.print(
        f"[green]✓[/] published {valid} transactions ({stats.fraud} fraud) and {stats.labels} "
        f"labels in {stats.seconds:.1f}s"
    )
    return valid, stats.labels


def _wait_for_pipeline(
    settings: TrainingSettings, target: CatchUp, timeout_s: float
) -> dict[str, int]:
    ingestion, features = IngestionSettings(), FeaturesSettings()

    def backlog() -> Backlog:
        return asyncio.run(read_backlog(ingestion, features))

    with _progress() as bar:
        archived = {d: bar.add_task(_LABELS[d], total=n) for d, n in target.expected.items()}
        processing = bar.add_task("ingestion and features backlog (records)", total=None)

        def show(gained: dict[str, int], behind: Backlog) -> None:
            for dataset, task in archived.items():
                bar.update(task, completed=min(gained[dataset], target.expected[dataset]))
            bar.update(processing, completed=behind.total)

        try:
            now = wait_for_catch_up(settings.storage, target, backlog, timeout_s, show)
        except TimeoutError as exc:
            console.print(f"[bold red]✗[/] {exc}")
            raise typer.Exit(1) from None
        except (PlatformError, OSError) as exc:
            console.print(f"[bold red]✗[/] could not read consumer lag: {exc}")
            raise typer.Exit(1) from None
    console.print("[green]✓[/] ingestion archive and feature logs have caught up")
    return now


def _report_feature_rows(gained: dict[str, int]) -> None:
    """One user and one merchant row per transaction unless some arrived too late."""
    transactions = gained[TRANSACTIONS]
    for dataset in (USER_ROWS, MERCHANT_ROWS):
        if gained[dataset] < transactions:
            console.print(
                f"[yellow]![/] {_LABELS[dataset]}: {gained[dataset]} for {transactions} "
                "transactions; the others arrived later than the features service's allowed "
                "lateness (MLOPS_FEATURES_ALLOWED_LATENESS_S) and were dropped "
                "(mlops_features_late_events_dropped_total)"
            )


def _production_version(settings: TrainingSettings) -> int:
    with RegistryClient(settings.registry) as registry:
        try:
            return int(registry.get_version(alias="production").version)
        except NotFound:
            return 0


def bootstrap(
    days: Annotated[float, typer.Option(help="Days of simulated history to publish.")] = 7.0,
    users: Annotated[int, typer.Option(help="Simulated card holders.")] = 2000,
    merchants: Annotated[int, typer.Option(help="Simulated merchants.")] = _WORLD.merchants,
    transactions_per_user_per_day: Annotated[
        float,
        typer.Option(
            help="Average transactions per user and day; `mlops simulate` with the same value "
            "(and users, merchants, seed) continues this history at users x this / 86,400 "
            "transactions per second."
        ),
    ] = _WORLD.transactions_per_user_per_day,
    daily_rhythm: Annotated[
        bool, typer.Option(help="Traffic follows the time of day (quiet nights).")
    ] = False,
    seed: Annotated[int, typer.Option(help="Simulation seed.")] = 42,
    fraud_rate: Annotated[
        float, typer.Option(help="Share of simulated transactions that are fraud.")
    ] = 0.02,
    timeout: Annotated[
        float, typer.Option(help="Seconds to wait for ingestion and features to catch up.")
    ] = 900.0,
    simulate: Annotated[
        bool | None,
        typer.Option(
            help="Publish simulated history first. Default: only when the offline store holds "
            "no transactions yet (a re-run after a timeout does not publish it twice); "
            "--no-simulate trains on what the platform already has.",
            show_default=False,
        ),
    ] = None,
    force: Annotated[
        bool, typer.Option(help="Train even if a production model exists (the gate decides).")
    ] = False,
) -> None:
    """Make the first production model: simulate history, wait for it, train, register.

    Nothing to do if production exists (unless --force); exit 0 once Triton serves production.
    """
    settings = TrainingSettings()
    model = settings.registry.model_name
    try:
        existing = _production_version(settings)
    except PlatformError as exc:
        console.print(f"[bold red]✗[/] registry at {settings.registry.address}: {exc.message}")
        raise typer.Exit(1) from None
    if existing and not force:
        console.print(f"[green]✓[/] {model} v{existing} is in production: nothing to bootstrap")
        return

    baseline = offline_rows(settings.storage)
    if simulate is None:
        simulate = baseline[TRANSACTIONS] == 0
        if not simulate:
            console.print(
                f"• the offline store holds {baseline[TRANSACTIONS]} transactions: training on "
                "them (--simulate publishes simulated history anyway)"
            )
    target = CatchUp.nothing_new(baseline)
    if simulate:
        try:
            world = SimulationConfig(
                seed=seed,
                users=users,
                merchants=merchants,
                fraud_rate=fraud_rate,
                transactions_per_user_per_day=transactions_per_user_per_day,
                daily_rhythm=daily_rhythm,
            )
            transactions, labels = _publish_history(settings, days, world)
        except (PlatformError, OSError) as exc:
            console.print(f"[bold red]✗[/] could not publish to {settings.kafka.bootstrap}: {exc}")
            raise typer.Exit(1) from None
        target = CatchUp.for_history(baseline, transactions, labels)
    now = _wait_for_pipeline(settings, target, timeout)
    _report_feature_rows(target.gained(now))

    snapshot = create_snapshot(settings.storage)
    console.print(
        f"[green]✓[/] dataset snapshot [bold]{snapshot.id}[/] "
        f"({snapshot.rows(TRANSACTIONS)} transactions, {snapshot.rows(LABELS)} labels)"
    )
    actor = f"cli:{getpass.getuser()}"
    request = retrain_request(model, "bootstrap", actor, snapshot.id)
    if not run_local(settings, request, actor):
        raise typer.Exit(1)
    if not served_by_triton(settings, TritonSettings()):
        raise typer.Exit(1)


def served_by_triton(settings: TrainingSettings, triton: TritonSettings) -> bool:
    """Production is ready in Triton and answers a tiny inference."""
    try:
        version = _production_version(settings)
    except PlatformError as exc:
        console.print(f"[bold red]✗[/] registry: {exc.message}")
        return False
    if not version:
        console.print("[bold red]✗[/] the registry has no production version")
        return False
    repository = TritonModelRepository(triton, settings.registry.model_name)
    try:
        ready = repository.ready_versions()
    except PlatformError as exc:
        console.print(f"[bold red]✗[/] Triton at {triton.grpc_url}: {exc.message}")
        return False
    if version not in ready or not repository.probe(version, len(MODEL_INPUTS)):
        console.print(f"[bold red]✗[/] Triton does not serve v{version} (ready: {ready})")
        return False
    console.print(
        f"[green]✓[/] Triton serves {settings.registry.model_name} v{version} as production: "
        "Predict works"
    )
    return True
