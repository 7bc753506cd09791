"""`mlops train`: ask the training service for a model, or train one right here.

Without ``--local`` a RetrainRequest goes to ``training.requests`` (the training service picks
it up; ``--wait`` waits for its ``TrainingResult`` on ``training.results``); with ``--local``
the same pipeline runs in this process, with progress, and registers the result with the
registry (unless ``--no-register``). Settings come from the environment
(``MLOPS_TRAINING_*``, ``MLOPS_MLFLOW_*``, ``MLOPS_STORAGE_*``, ``MLOPS_REGISTRY_CLIENT_*``).
"""

from __future__ import annotations

import asyncio
import getpass
import time
import uuid
from collections.abc import Callable
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


async def request_and_wait(
    settings: TrainingSettings,
    request: monitoring_pb2.RetrainRequest,
    timeout_s: float,
    on_wait: Callable[[float], None] = lambda _: None,
) -> monitoring_pb2.TrainingResult | None:
    """Publish ``request`` and wait up to ``timeout_s`` for its ``TrainingResult`` on
    training.results (read from where the topic ended before the request was sent, so the
    result cannot be missed); None when none came in time. ``on_wait`` gets the seconds
    waited, about once a second."""
    from aiokafka import TopicPartition
    from google.protobuf.message import DecodeError

    from services.shared.kafka import create_consumer, ensure_topics
    from services.shared.topics import Topics

    topic = Topics.from_settings(settings.kafka).training_results
    await ensure_topics(settings.kafka, [topic], timeout_s=10)
    consumer = create_consumer(settings.kafka, group_id=None, client_id="mlops-cli")
    await consumer.start()
    try:
        numbers = consumer.partitions_for_topic(topic) or set(range(settings.kafka.partitions))
        partitions = [TopicPartition(topic, p) for p in sorted(numbers)]
        consumer.assign(partitions)
        await consumer.seek_to_end(*partitions)
        for partition in partitions:
            await consumer.position(partition)  # fixed now, before the request exists
        await publish_request(settings, request)
        started = time.monotonic()
        while (waited := time.monotonic() - started) < timeout_s:
            on_wait(waited)
            for records in (await consumer.getmany(timeout_ms=1000)).values():
                for record in records:
                    try:
                        result = monitoring_pb2.TrainingResult.FromString(record.value or b"")
                    except DecodeError:
                        continue  # not a result (nothing to wait for in it)
                    if result.request_id == request.request_id:
                        return result
        return None
    finally:
        await consumer.stop()


def _print_result(result: monitoring_pb2.TrainingResult) -> bool:
    """One line for an operator; True when the training gave a candidate."""
    if result.status == monitoring_pb2.TRAINING_STATUS_FAILED:
        console.print(
            f"[bold red]✗[/] training {result.request_id} failed after {result.seconds:.0f} s "
            f"({result.error_code}): {result.error}"
        )
        return False
    what = "trained" if result.status == monitoring_pb2.TRAINING_STATUS_TRAINED else "reused"
    console.print(
        f"[green]✓[/] {what} in {result.seconds:.0f} s: candidate v{result.version} (MLflow "
        f"run {result.run_id}); the registry's gate decides (mlops models show "
        f"{result.version})"
    )
    return True


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
    wait: Annotated[
        bool,
        typer.Option(
            "--wait",
            help="Wait for the training service's result (training.results) and print it: "
            "the candidate version, or why it failed. Exit 1 if it failed or none came.",
        ),
    ] = False,
    timeout: Annotated[
        float, typer.Option(help="With --wait: seconds to wait for the result.")
    ] = 1800.0,
) -> None:
    """Train a fraud model: ask the training service, or run it here (--local).

    Tracked in MLflow, then registered: the evaluation gate decides canary or rejection.
    """
    settings = TrainingSettings()
    requested_by = f"cli:{getpass.getuser()}"
    request = retrain_request(
        settings.registry.model_name, reason, requested_by, snapshot, drift_onset
    )
    if not local and wait:
        with console.status(f"training {request.request_id}: waiting for the service") as status:
            try:
                result = asyncio.run(
                    request_and_wait(
                        settings,
                        request,
                        timeout,
                        lambda waited: status.update(
                            f"training {request.request_id}: waiting for the service "
                            f"({waited:.0f} s of at most {timeout:.0f})"
                        ),
                    )
                )
            except PlatformError as exc:
                console.print(f"[bold red]✗[/] {exc.message}")
                raise typer.Exit(1) from None
        if result is None:
            console.print(
                f"[bold red]✗[/] no result for {request.request_id} within {timeout:.0f} s "
                "(is the training service running? see its log)"
            )
            raise typer.Exit(1)
        raise typer.Exit(0 if _print_result(result) else 1)
    if not local:
        try:
            asyncio.run(publish_request(settings, request))
        except PlatformError as exc:
            console.print(f"[bold red]✗[/] {exc.message}")
            raise typer.Exit(1) from None
        console.print(
            f"[green]✓[/] training requested: [bold]{request.request_id}[/] on "
            f"{settings.kafka.topic_prefix}training.requests (--wait follows it to its result; "
            "or the training service's log, MLflow)"
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
