"""`mlops train`: ask the training service for a model, or train one right here.

Without ``--local`` a RetrainRequest goes to ``training.requests`` (the training service picks
it up); with ``--local`` the same pipeline runs in this process, with progress, and registers
the result with the registry (unless ``--no-register``). Settings come from the environment
(``MLOPS_TRAINING_*``, ``MLOPS_MLFLOW_*``, ``MLOPS_STORAGE_*``, ``MLOPS_REGISTRY_CLIENT_*``).
"""

from __future__ import annotations

import asyncio
import getpass
import uuid
from datetime import UTC, datetime
from typing import Annotated

import typer
from google.protobuf.timestamp_pb2 import Timestamp
from rich.console import Console
from rich.progress import BarColumn, Progress, TaskID, TextColumn, TimeElapsedColumn
from rich.table import Table

from services.shared.errors import PlatformError
from services.shared.proto.mlops.v1 import models_pb2, monitoring_pb2
from services.training.fit import EpochReport
from services.training.settings import TrainingSettings

console = Console(highlight=False)


class RichProgress:
    """Training progress on the terminal: stages as lines, epochs as a bar."""

    def __init__(self, progress: Progress) -> None:
        self.progress = progress
        self.task: TaskID | None = None

    def stage(self, name: str) -> None:
        self.progress.console.print(f"[cyan]•[/] {name}")

    def epoch(self, report: EpochReport) -> None:
        if self.task is None:
            self.task = self.progress.add_task("epochs", total=report.epochs)
        marker = " [green]best[/]" if report.improved else ""
        self.progress.update(
            self.task,
            completed=report.epoch,
            description=(
                f"epoch {report.epoch}/{report.epochs} loss {report.train_loss:.4f} "
                f"val PR-AUC {report.validation_pr_auc:.4f}{marker}"
            ),
        )


def progress_bar() -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    )


def retrain_request(
    model_name: str,
    reason: str,
    requested_by: str,
    snapshot: str,
    drift_onset: datetime | None = None,
) -> monitoring_pb2.RetrainRequest:
    now = Timestamp()
    now.GetCurrentTime()
    request = monitoring_pb2.RetrainRequest(
        request_id=f"req-{uuid.uuid4().hex[:12]}",
        model_name=model_name,
        reason=reason,
        requested_by=requested_by,
        dataset_snapshot_id=snapshot,
        requested_at=now,
    )
    if drift_onset is not None:  # an operator names the shift: the run trains around it
        onset = drift_onset if drift_onset.tzinfo else drift_onset.replace(tzinfo=UTC)
        request.drift.event_id = f"operator-{uuid.uuid4().hex[:8]}"
        request.drift.detector = "operator"
        request.drift.model_name = model_name
        request.drift.onset_at.FromDatetime(onset.astimezone(UTC))
        request.drift.detected_at.CopyFrom(now)
    return request


async def publish_request(
    settings: TrainingSettings, request: monitoring_pb2.RetrainRequest
) -> None:
    from services.shared.codecs import protobuf_headers
    from services.shared.kafka import create_producer, ensure_topics
    from services.shared.topics import Topics

    topic = Topics.from_settings(settings.kafka).training_requests
    await ensure_topics(settings.kafka, [topic], timeout_s=10)
    producer = create_producer(settings.kafka, client_id="mlops-cli", linger_ms=0)
    await producer.start()
    try:
        await producer.send_and_wait(
            topic,
            request.SerializeToString(),
            key=request.model_name.encode(),
            headers=protobuf_headers(request),
        )
    finally:
        await producer.stop()


def train(
    local: Annotated[
        bool,
        typer.Option(
            "--local", help="Train in this process (with progress) instead of asking the service."
        ),
    ] = False,
    reason: Annotated[
        str, typer.Option(help="Why: manual, schedule, drift, bootstrap (recorded on the run).")
    ] = "manual",
    snapshot: Annotated[
        str,
        typer.Option(help="Dataset snapshot id to train on; empty: snapshot the archive now."),
    ] = "",
    register: Annotated[
        bool, typer.Option(help="Register the result with the registry (--local only).")
    ] = True,
    drift_onset: Annotated[
        datetime | None,
        typer.Option(
            help="When a shift began (ISO time, UTC if no zone): train and test around it, as "
            "a drift-triggered run does (the most recent labelled traffic after it is held "
            "out for the gate, post-onset rows weigh more in training).",
            formats=["%Y-%m-%dT%H:%M:%S%z", "%Y-%m-%dT%H:%M:%S", "%Y-%m-%d %H:%M:%S"],
        ),
    ] = None,
) -> None:
    """Train a fraud model: ask the training service, or run it here (--local).

    Tracked in MLflow, then registered: the evaluation gate decides canary or rejection.
    """
    settings = TrainingSettings()
    requested_by = f"cli:{getpass.getuser()}"
    request = retrain_request(
        settings.registry.model_name, reason, requested_by, snapshot, drift_onset
    )
    if not local:
        try:
            asyncio.run(publish_request(settings, request))
        except PlatformError as exc:
            console.print(f"[bold red]✗[/] {exc.message}")
            raise typer.Exit(1) from None
        console.print(
            f"[green]✓[/] training requested: [bold]{request.request_id}[/] on "
            f"{settings.kafka.topic_prefix}training.requests (follow it in the training "
            "service's log or MLflow)"
        )
        return
    outcome = run_local(
        settings.model_copy(update={"register_models": register}), request, requested_by
    )
    raise typer.Exit(0 if outcome else 1)


def run_local(
    settings: TrainingSettings, message: monitoring_pb2.RetrainRequest, actor: str
) -> bool:
    """Run the pipeline in-process with progress; prints the outcome. False on failure."""
    from services.training.main import build_pipeline
    from services.training.pipeline import TrainingRequest

    pipeline = build_pipeline(settings, actor=actor)
    request = TrainingRequest.from_proto(message)
    console.print(f"training [bold]{request.request_id}[/] ({request.reason})")
    try:
        with progress_bar() as bar:
            outcome = pipeline.run(request, RichProgress(bar))
    except PlatformError as exc:
        console.print(f"[bold red]✗[/] {type(exc).__name__}: {exc.message}")
        return False
    table = Table(title=f"run {outcome.run_id}", show_header=True)
    table.add_column("metric (test period)")
    table.add_column("model", justify="right")
    table.add_column("baseline", justify="right")
    for name in ("pr_auc", "roc_auc", "precision", "recall", "calibration_error", "threshold"):
        table.add_row(
            name,
            f"{outcome.metrics.get('test_' + name, float('nan')):.4f}",
            f"{outcome.metrics.get('baseline_test_' + name, float('nan')):.4f}",
        )
    console.print(table)
    if outcome.version is not None:
        version = outcome.version
        stage = models_pb2.ModelStage.Name(version.stage).removeprefix("MODEL_STAGE_").lower()
        console.print(
            f"[green]✓[/] registered as version [bold]{version.version}[/]: {stage}"
            + (f" — {version.gate.reason}" if version.gate.reason else "")
        )
    return True
