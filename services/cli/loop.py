"""`mlops loop`: the autopilot (the closed loop) from the command line.

    mlops loop status             the state (watching, retraining, gating, shadow, canary,
                                  promoted, paused, halted), the cycle in progress, guardrails
    mlops loop history            past cycles: trigger, candidate, outcome, timings
    mlops loop history CYCLE_ID   one cycle's steps with their evidence (test, interval, n)
    mlops loop pause --reason ..  stop every automatic action (recorded; needs the token)
    mlops loop resume             carry on (also after the loop halted itself)

The autopilot's address comes from ``MLOPS_AUTOPILOT_CLIENT_URL`` (``mlops stack env`` sets
it); pause and resume send the registry token (``MLOPS_REGISTRY_CLIENT_TOKEN`` or the token
file the local stack writes).
"""

from __future__ import annotations

import getpass
import json
from datetime import datetime
from typing import Annotated, Any

import httpx
import typer
from rich import box
from rich.console import Console
from rich.table import Table

from services.shared.settings import AutopilotClientSettings, RegistryClientSettings

app = typer.Typer(
    help="See and steer the autopilot: drift -> retraining -> gate -> shadow -> canary -> "
    "production, or rollback (address: MLOPS_AUTOPILOT_CLIENT_URL).",
    no_args_is_help=True,
)
console = Console(highlight=False)


def _call(method: str, path: str, body: dict[str, str] | None = None) -> Any:
    settings = AutopilotClientSettings()
    headers = {}
    if method == "POST":
        token = RegistryClientSettings().bearer_token()
        if not token:
            console.print(
                "[bold red]✗[/] no registry token: set MLOPS_REGISTRY_CLIENT_TOKEN (or run "
                'eval "$(mlops stack env)")'
            )
            raise typer.Exit(1)
        headers["authorization"] = f"Bearer {token}"
    try:
        response = httpx.request(
            method,
            f"{settings.url.rstrip('/')}{path}",
            json=body,
            headers=headers,
            timeout=settings.timeout_s,
        )
    except httpx.HTTPError as exc:
        console.print(
            f"[bold red]✗[/] the autopilot at {settings.url} does not answer ({exc}); is it "
            "running? (mlops stack status)"
        )
        raise typer.Exit(1) from None
    if response.status_code != 200:
        try:
            detail = response.json().get("detail", response.text)
        except ValueError:
            detail = response.text
        console.print(f"[bold red]✗[/] {response.status_code}: {detail}")
        raise typer.Exit(1)
    return response.json()


def _when(text: str, *, short: bool = False) -> str:
    if not text:
        return "-"
    return datetime.fromisoformat(text).strftime("%m-%d %H:%M" if short else "%Y-%m-%d %H:%M:%S")


def _duration(start: str, end: str) -> str:
    if not start or not end:
        return "-"
    seconds = (datetime.fromisoformat(end) - datetime.fromisoformat(start)).total_seconds()
    return f"{seconds / 60:.1f} min" if seconds >= 120 else f"{seconds:.0f} s"


_STYLE = {
    "paused": "bold yellow",
    "halted": "bold red",
    "watching": "green",
    "promoted": "bold green",
}


@app.command()
def status(
    as_json: Annotated[bool, typer.Option("--json", help="The API's answer as JSON.")] = False,
) -> None:
    """The loop's state, the cycle in progress with its last step, and the guardrails."""
    body = _call("GET", "/api/v1/loop")
    if as_json:
        print(json.dumps(body, indent=2))
        return
    state = body["state"]
    table = Table(show_header=False, title=f"autopilot of {body['model_name']}")
    table.add_column("field", style="bold")
    table.add_column("value", overflow="fold")
    table.add_row("state", f"[{_STYLE.get(state, 'cyan')}]{state}[/]")
    table.add_row("production", f"v{body['production_version']}")
    cycle = body.get("cycle")
    if cycle:
        table.add_row(
            "cycle", f"{cycle['cycle_id']} ({cycle['trigger']}), since {_when(cycle['started_at'])}"
        )
        if cycle["candidate_version"]:
            table.add_row("candidate", f"v{cycle['candidate_version']} in {cycle['phase']}")
        if cycle["steps"]:
            table.add_row("last step", cycle["steps"][-1]["summary"])
    last = body.get("last_cycle")
    if last:
        table.add_row(
            "last cycle",
            f"{last['cycle_id']}: {last['outcome']} at {_when(last['ended_at'])} "
            f"(v{last['candidate_version']})",
        )
    table.add_row(
        "rollbacks in a row",
        f"{body['consecutive_rollbacks']} (halts at {body['max_consecutive_rollbacks']})",
    )
    table.add_row("cooldown left", f"{body['cooldown_left_s']:.0f} s")
    for event in body.get("events", [])[-3:]:
        table.add_row(event["kind"], f"{_when(event['at'])} by {event['actor']}: {event['reason']}")
    for trigger in body.get("recent_triggers", [])[-3:]:
        table.add_row(
            f"trigger {trigger['source']}",
            f"{_when(trigger['at'])} {trigger['outcome']}: {trigger['detail']}",
        )
    console.print(table)


@app.command()
def history(
    cycle_id: Annotated[
        str | None, typer.Argument(help="One cycle: its steps with their evidence.")
    ] = None,
    limit: Annotated[int, typer.Option("--limit", "-n", help="Cycles to show.")] = 20,
    as_json: Annotated[bool, typer.Option("--json", help="The API's answer as JSON.")] = False,
) -> None:
    """Past cycles, newest first: trigger, candidate, outcome and how long each took."""
    cycles = _call("GET", f"/api/v1/loop/history?limit={100 if cycle_id else limit}")["cycles"]
    if cycle_id:
        cycles = [c for c in cycles if c["cycle_id"] == cycle_id]
        if not cycles:
            console.print(f"[bold red]✗[/] no cycle {cycle_id} in the last 100")
            raise typer.Exit(1)
    if as_json:
        print(json.dumps(cycles, indent=2))
        return
    if cycle_id:
        _steps(cycles[0])
        return
    if not cycles:
        console.print("no cycle yet: the loop is watching")
        return
    # fits 80 columns: the short fields in a borderless table, each cycle's why below it
    table = Table(title="autopilot cycles (newest first)", box=box.SIMPLE_HEAD)
    for column in ("cycle", "trigger", "started", "took", "cand.", "outcome"):
        table.add_column(column, no_wrap=True)
    for c in cycles:
        table.add_row(
            c["cycle_id"],
            c["trigger"],
            _when(c["started_at"], short=True),
            _duration(c["started_at"], c["ended_at"]),
            f"v{c['candidate_version']}" if c["candidate_version"] else "-",
            c["outcome"],
        )
    console.print(table)
    for c in cycles:
        if c["steps"]:
            console.print(f"[bold]{c['cycle_id']}[/]: {c['steps'][-1]['summary']}")
    console.print("(`mlops loop history CYCLE` shows a cycle's steps with their evidence)")


def _steps(cycle: dict[str, Any]) -> None:
    table = Table(title=f"cycle {cycle['cycle_id']} ({cycle['trigger']}): {cycle['outcome']}")
    table.add_column("at", no_wrap=True)
    table.add_column("phase", no_wrap=True)
    table.add_column("what and why", overflow="fold")
    for step in cycle["steps"]:
        table.add_row(_when(step["at"]), step["phase"], step["summary"])
    console.print(table)


def _actor() -> str:
    return f"cli:{getpass.getuser()}"


@app.command()
def pause(
    reason: Annotated[str, typer.Option(help="Recorded with the pause.")] = "",
) -> None:
    """Stop every automatic action: no retraining, no traffic moved (recorded)."""
    body = _call("POST", "/api/v1/loop/pause", {"actor": _actor(), "reason": reason})
    console.print(f"[yellow]paused[/]: the loop holds in {body['phase']} until `mlops loop resume`")


@app.command()
def resume(
    reason: Annotated[str, typer.Option(help="Recorded with the resumption.")] = "",
) -> None:
    """Carry on; after a halt this also resets the count of rollbacks in a row (recorded)."""
    body = _call("POST", "/api/v1/loop/resume", {"actor": _actor(), "reason": reason})
    console.print(f"[green]resumed[/]: the loop is {body['state']}")
