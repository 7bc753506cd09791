"""``mlops``: the operator's command line.

mlops stack up|down|status|logs|env  run the platform locally (what `make up` calls)
mlops simulate ...                 publish realistic traffic, as product services would
mlops train ...                    ask for (or run) a training
mlops models list|show|promote|rollback|lineage|reproduce
mlops loop status|history|pause|resume   the autopilot (the closed loop)
mlops bootstrap                    first production model: simulated history, train, register
mlops data snapshot|snapshots|show|dlq  dataset snapshots of the offline store, the DLQ
mlops trace TRANSACTION_ID         one prediction end to end, with its training-serving skew
"""

from __future__ import annotations

import typer

from services.cli import bootstrap, data, loop, models, simulate, stack, trace, train

app = typer.Typer(
    name="mlops",
    help="Operate the MLOps platform: run it locally, simulate traffic, train and manage models.",
    no_args_is_help=True,
    add_completion=False,
)
app.add_typer(stack.app, name="stack")
app.add_typer(models.app, name="models")
app.add_typer(loop.app, name="loop")
app.add_typer(data.app, name="data")
app.command(name="simulate")(simulate.simulate)
app.command(name="train")(train.train)
app.command(name="bootstrap")(bootstrap.bootstrap)
app.command(name="trace")(trace.trace)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
