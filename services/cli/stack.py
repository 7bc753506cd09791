"""`mlops stack`: the local platform under supervisord (filled in by the foundation work)."""

from __future__ import annotations

import typer

app = typer.Typer(
    help="Run the whole platform locally as supervised processes.", no_args_is_help=True
)
