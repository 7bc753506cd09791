"""`mlops models`: the model registry from the command line."""

from __future__ import annotations

import typer

app = typer.Typer(help="List, inspect, promote and roll back model versions.", no_args_is_help=True)
