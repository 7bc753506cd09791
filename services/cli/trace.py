"""`mlops trace TRANSACTION_ID`: the story of one prediction (services/shared/prediction_trace.py).

What serving answered (every answer logged for that transaction: production or canary, and
shadow copies), with the exact model inputs it used; the label if one arrived; the version's
lineage (training run, dataset snapshot, feature definitions hash, code commit); and the
model inputs recomputed offline, point in time, with each difference from what serving used
(training-serving skew for this one request). ``--json`` prints the same as the dashboard's
GET /api/v1/trace/{id}.
"""

from __future__ import annotations

import asyncio
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from services.shared.errors import PlatformError
from services.shared.prediction_trace import PredictionTrace, PredictionTracer
from services.shared.settings import (
    FeastSettings,
    KafkaSettings,
    RedisSettings,
    RegistryClientSettings,
    StorageSettings,
)

console = Console(highlight=False)


def trace(
    transaction_id: Annotated[str, typer.Argument(help="The transaction to explain.")],
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the trace as JSON (as the dashboard's API).")
    ] = False,
    max_scan: Annotated[
        int,
        typer.Option(
            help="Read at most this many of the newest records of the transaction's "
            "predictions.log partition.",
        ),
    ] = 2_000_000,
) -> None:
    """Explain one prediction: answer, version and route, the features serving used, the
    label, the version's lineage, and the features recomputed offline (skew)."""
    tracer = PredictionTracer(
        KafkaSettings(),
        StorageSettings(),
        FeastSettings(),
        RedisSettings(),
        RegistryClientSettings(),
        max_scan_records=max_scan,
    )
    if not as_json:
        console.print(
            f"tracing {transaction_id}: reading predictions.log, the label, the lineage, "
            "then recomputing the features offline (a few seconds)…"
        )
    try:
        result = asyncio.run(tracer.trace(transaction_id))
    except PlatformError as exc:
        console.print(f"[bold red]✗[/] {type(exc).__name__}: {exc.message}")
        raise typer.Exit(1) from None
    if as_json:
        print(result.model_dump_json(indent=2))
        return
    show(result, console)


def show(result: PredictionTrace, console: Console) -> None:
    """The trace for a person, on ``console``."""
    t = result.transaction
    console.print(
        f"\n[bold]{result.transaction_id}[/]: {t.get('amount')} {t.get('currency')} by "
        f"{t.get('user_id')} at {t.get('merchant_id')} ({t.get('channel')}, "
        f"{t.get('country')}), event time {t.get('event_time')}"
    )
    answers = Table(title="What serving answered")
    for column in ("route", "version", "probability", "decision", "degraded", "ms", "at"):
        answers.add_column(column)
    for a in result.answers:
        answers.add_row(
            a.route,
            f"{a.model_name} v{a.model_version}",
            f"{a.fraud_probability:.4f}",
            a.decision,
            "yes" if a.degraded else "no",
            f"{a.latency_ms:.1f}",
            a.predicted_at,
        )
    console.print(answers)
    if result.label:
        verdict = "fraud" if result.label.is_fraud else "legitimate"
        console.print(
            f"label: [bold]{verdict}[/] (arrived {result.label.ingested_at}, {result.label.source})"
        )
    else:
        console.print(f"label: {result.label_status}")
    if result.lineage:
        ln = result.lineage
        console.print(
            f"lineage of v{ln.version}: run {ln.run_id}, dataset snapshot "
            f"{ln.dataset_snapshot_id} (sha256 {ln.dataset_sha256[:12]}), feature definitions "
            f"{ln.feature_definitions_sha256[:12]}"
            + (" [yellow](changed since)[/]" if ln.feature_definitions_changed else "")
            + f", code {ln.code_commit[:12]}"
        )
    else:
        console.print(f"lineage: {result.lineage_status}")
    if result.recomputation is None:
        console.print(f"offline recomputation: {result.recomputation_status}")
        return
    rc = result.recomputation
    table = Table(title=f"Model inputs: served vs recomputed offline as of {rc.as_of}")
    for column in ("input", "served", "offline", "difference", ""):
        table.add_column(column, justify="right" if column != "input" else "left")
    for c in rc.inputs:
        table.add_row(
            c.name,
            "-" if c.served is None else f"{c.served:.6g}",
            f"{c.offline:.6g}",
            "-" if c.difference is None else f"{c.difference:+.3g}",
            "[bold red]skew[/]" if c.skewed else "",
        )
    console.print(table)
    console.print(result.recomputation_status)
