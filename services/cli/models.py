"""`mlops models`: the model registry from the command line.

    mlops models list                          every version: role, traffic, metrics, gate
    mlops models routes                        the routing table: who answers, who is mirrored
    mlops models show production|canary|N      one version in detail, with its gate result
    mlops models promote N                     N becomes production (the old one is archived)
    mlops models promote N --to canary -p 20   N takes 20% of traffic as canary
    mlops models promote 0 --to canary         removes the canary
    mlops models rollback                      the previous production version comes back
    mlops models lineage N                     version -> run -> snapshot -> features -> code
    mlops models reproduce N                   retrain from N's lineage and compare

The registry's address and token come from ``MLOPS_REGISTRY_CLIENT_ADDRESS`` and
``MLOPS_REGISTRY_CLIENT_TOKEN`` (or the token file the local stack writes).
"""

from __future__ import annotations

import getpass
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated

import typer
from rich import box
from rich.console import Console
from rich.table import Table

from services.shared.errors import PlatformError
from services.shared.model_aliases import ALIASES, PRODUCTION, served_alias
from services.shared.proto.mlops.v1 import models_pb2
from services.shared.registry_client import RegistryClient
from services.shared.settings import RegistryClientSettings

app = typer.Typer(
    help="List, inspect, promote, roll back and reproduce model versions (the registry's "
    "address and token: MLOPS_REGISTRY_CLIENT_ADDRESS / MLOPS_REGISTRY_CLIENT_TOKEN).",
    no_args_is_help=True,
)
console = Console(highlight=False)


@contextmanager
def _registry() -> Iterator[RegistryClient]:
    client = RegistryClient(RegistryClientSettings(), actor=f"cli:{getpass.getuser()}")
    try:
        yield client
    except PlatformError as exc:
        console.print(f"[bold red]✗[/] {type(exc).__name__}: {exc.message}")
        raise typer.Exit(1) from None
    finally:
        client.close()


def _stage(version: models_pb2.ModelVersion) -> str:
    return models_pb2.ModelStage.Name(version.stage).removeprefix("MODEL_STAGE_").lower()


def _metric(version: models_pb2.ModelVersion, name: str, digits: int = 4) -> str:
    value = version.metrics.get(name)
    return "" if value is None else f"{value:.{digits}f}"


def _gate(version: models_pb2.ModelVersion) -> str:
    if not version.HasField("gate"):
        return ""
    return _GATE_OUTCOMES.get(version.gate.outcome, "passed" if version.gate.passed else "rejected")


_GATE_OUTCOMES = {
    models_pb2.GATE_OUTCOME_PASSED: "passed",
    models_pb2.GATE_OUTCOME_FAILED: "rejected",
    models_pb2.GATE_OUTCOME_INSUFFICIENT_DATA: "insufficient data",
}


@app.command("list")
def list_versions() -> None:
    """Every version of the model: its role (aliases, else stage), traffic share, test
    metrics, gate; 80 columns wide."""
    with _registry() as registry:
        versions = registry.list_versions()
        name = registry.model_name
    if not versions:
        console.print(f"{name} has no versions yet (mlops train, or mlops bootstrap)")
        return
    # fits 80 columns: no borders, short headers (the caption says what they mean)
    table = Table(
        title=name,
        box=box.SIMPLE_HEAD,
        padding=0,
        pad_edge=False,
        caption="role: the aliases serving routes by, else the stage; on the test set: PR-AUC, "
        "base (the gradient-boosting baseline's PR-AUC), ECE; thresh: the decision threshold; "
        "created: UTC",
        caption_justify="left",
    )
    for column in ("v", "role", "traffic", "PR-AUC", "base", "ECE", "thresh"):
        table.add_column(column, justify="left" if column == "role" else "right", no_wrap=True)
    table.add_column("gate", no_wrap=True)
    table.add_column("created", no_wrap=True)
    for v in versions:
        table.add_row(
            str(v.version),
            ",".join(v.aliases) or _stage(v),
            f"{v.traffic_percent} %" if v.aliases else "",
            _metric(v, "test_pr_auc", 3),
            _metric(v, "baseline_test_pr_auc", 3),
            _metric(v, "test_calibration_error", 3),
            f"{v.threshold:.3f}",
            _gate(v),
            v.created_at.ToDatetime().strftime("%m-%d %H:%M"),
        )
    console.print(table)


@app.command()
def routes() -> None:
    """The registry's routing table: which versions answer (and with what share of traffic),
    which are mirrored, with their decision thresholds."""
    with _registry() as registry:
        table_rows = registry.routing_table()
        name = registry.model_name
    if not table_rows:
        console.print(f"{name} has no production version: nothing is routed")
        return
    table = Table(title=f"{name} routing")
    for column in ("alias", "version", "traffic %", "answers", "threshold"):
        table.add_column(column, justify="left" if column in ("alias", "answers") else "right")
    for route in table_rows:
        table.add_row(
            served_alias(route),
            str(route.version),
            str(route.traffic_percent),
            "mirrored (logged only)" if route.shadow else "returned to callers",
            f"{route.threshold:.4f}",
        )
    console.print(table)


def _selector(target: str) -> tuple[int, str]:
    if target in ALIASES:
        return 0, target
    try:
        version = int(target)
    except ValueError:
        raise typer.BadParameter(
            f"expected a version number or one of {', '.join(ALIASES)}"
        ) from None
    return version, ""


@app.command()
def show(
    target: Annotated[str, typer.Argument(help="A version number, or production/canary/shadow.")],
) -> None:
    """One version in detail: stage, traffic, artifact checksum, metrics and gate result."""
    version, alias = _selector(target)
    with _registry() as registry:
        v = registry.get_version(version=version, alias=alias)
    table = Table(show_header=False, title=f"{v.model_name} v{v.version}")
    table.add_column("field", style="bold")
    table.add_column("value")
    rows = [
        ("stage", _stage(v)),
        ("aliases", ", ".join(v.aliases) or "-"),
        ("traffic %", str(v.traffic_percent)),
        ("threshold", f"{v.threshold:.6f}"),
        ("run", v.run_id),
        ("artifact sha256", v.artifact_sha256),
        ("created", v.created_at.ToDatetime().isoformat()),
        ("description", v.description or "-"),
    ]
    if v.HasField("gate"):
        g = v.gate
        rows += [
            ("gate", f"{_gate(v)}: {g.reason}"),
            (
                "gate numbers",
                f"{g.metric} {g.candidate_value:.4f} vs v{g.baseline_version} "
                f"{g.baseline_value:.4f} (margin {g.margin}); ECE "
                f"{g.candidate_calibration_error:.4f} vs {g.baseline_calibration_error:.4f}",
            ),
        ]
        if g.test:
            rows.append(
                (
                    "gate test",
                    f"{g.test}: improvement {g.statistic:+.4f}, {g.confidence:.0%} interval "
                    f"[{g.interval_low:+.4f}, {g.interval_high:+.4f}], {g.rows} rows with "
                    f"{g.positives} frauds, {g.resamples} resamples",
                )
            )
            rows.append(
                (
                    "calibration test",
                    f"ECE improvement {g.calibration_statistic:+.4f}, {g.confidence:.0%} "
                    f"interval [{g.calibration_interval_low:+.4f}, "
                    f"{g.calibration_interval_high:+.4f}] (paired bootstrap)",
                )
            )
    rows += [(name, f"{value:.6f}") for name, value in sorted(v.metrics.items())]
    for name, value in rows:
        table.add_row(name, value)
    console.print(table)


def _changed(v: models_pb2.ModelVersion, what: str) -> None:
    console.print(
        f"[green]✓[/] {what}: {v.model_name} v{v.version} is {_stage(v)}"
        + (f" ({v.traffic_percent}% of traffic)" if v.aliases else "")
    )


@app.command()
def promote(
    version: Annotated[int, typer.Argument(help="The version (0 removes a canary or shadow).")],
    to: Annotated[
        str, typer.Option("--to", help="production (default), canary or shadow.")
    ] = PRODUCTION,
    percent: Annotated[
        int,
        typer.Option(
            "--percent", "-p", help="Canary: share of traffic; shadow: share mirrored (1-100)."
        ),
    ] = 0,
    reason: Annotated[str, typer.Option(help="Recorded on the lifecycle event.")] = "",
) -> None:
    """Move an alias: VERSION becomes production (the old one is archived), canary or shadow.

    Triton serves the change before the command returns."""
    if to not in ALIASES:
        raise typer.BadParameter(f"--to must be one of {', '.join(ALIASES)}")
    with _registry() as registry:
        v = registry.set_alias(to, version, traffic_percent=percent, reason=reason)
    _changed(v, f"{to} {'removed' if version == 0 else 'set'}")


@app.command()
def rollback(
    reason: Annotated[str, typer.Option(help="Recorded on the lifecycle event.")] = "",
) -> None:
    """Put the previous production version back into production (the current is archived)."""
    with _registry() as registry:
        v = registry.rollback(reason or f"manual rollback by {getpass.getuser()}")
    _changed(v, "rolled back")


@app.command()
def lineage(version: Annotated[int, typer.Argument(help="The version.")]) -> None:
    """Where VERSION came from: MLflow run, dataset snapshot, feature definitions, code."""
    with _registry() as registry:
        record = registry.lineage(version)
    table = Table(show_header=False, title=f"lineage of {record.model_name} v{record.version}")
    table.add_column("field", style="bold")
    table.add_column("value")
    for name, value in (
        ("MLflow run", f"{record.run_id} (experiment {record.experiment_id})"),
        ("training request", record.training_request_id),
        ("dataset snapshot", record.dataset_snapshot_id),
        ("dataset sha256", record.dataset_sha256),
        ("feature service", record.feature_service),
        ("feature definitions sha256", record.feature_definitions_sha256),
        ("code commit", record.code_commit),
        ("artifact sha256", record.artifact_sha256),
    ):
        table.add_row(name, value)
    for name, value in sorted(record.params.items()):
        table.add_row(f"param {name}", value)
    for name in ("test_pr_auc", "test_roc_auc", "test_calibration_error", "baseline_test_pr_auc"):
        if name in record.metrics:
            table.add_row(f"metric {name}", f"{record.metrics[name]:.6f}")
    console.print(table)


@app.command()
def reproduce(version: Annotated[int, typer.Argument(help="The version to reproduce.")]) -> None:
    """Retrain VERSION from its lineage here and compare metrics and weights with it.

    Same snapshot, parameters and seed; on CPU the weights must come out bit-identical to
    the registered TorchScript model's. Exit code 0 when metrics and weights are identical."""
    from services.cli.train import RichProgress, progress_bar
    from services.training.main import build_pipeline
    from services.training.settings import TrainingSettings

    with _registry() as registry:
        record = registry.lineage(version)
    settings = TrainingSettings().model_copy(update={"register_models": False})
    pipeline = build_pipeline(settings)
    console.print(
        f"reproducing v{version} from snapshot [bold]{record.dataset_snapshot_id}[/] "
        f"(run {record.run_id})"
    )
    try:
        with progress_bar() as bar:
            report = pipeline.reproduce(record, RichProgress(bar))
    except PlatformError as exc:
        console.print(f"[bold red]✗[/] {type(exc).__name__}: {exc.message}")
        raise typer.Exit(1) from None
    for warning in report.warnings:
        console.print(f"[yellow]![/] {warning}")
    _report_line("metrics identical", report.metrics_identical)
    for name, (recorded, reproduced) in report.metric_differences.items():
        console.print(f"    {name}: recorded {recorded!r}, reproduced {reproduced!r}")
    _report_line(
        f"weights identical (state dict sha256 {report.reproduced_weights_sha256[:16]}…)",
        report.weights_identical,
    )
    raise typer.Exit(0 if report.identical else 1)


def _report_line(text: str, ok: bool) -> None:
    console.print(f"[green]✓[/] {text}" if ok else f"[bold red]✗[/] {text}: NO")
