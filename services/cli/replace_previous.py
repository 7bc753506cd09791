"""Start a supervised program after ending whatever its previous run left behind.

    python -m services.cli.replace_previous --stack VAR_DIR --program mlflow -- mlflow server ...

Why: MLflow's server runs its app in a uvicorn child. When the parent is killed with SIGKILL
the child keeps the port, and every restart by the supervisor fails on "address in use".
Each program of the local stack carries two environment markers (its stack and its name,
set in the rendered supervisord configuration and inherited by its children); this wrapper
finds the processes that carry this program's markers, ends them, then becomes the program
(``exec``), so there is never more than one instance.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from services.cli.localstack.processes import end_processes, stack_processes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stack", required=True, type=Path, help="the stack's var directory")
    parser.add_argument("--program", required=True, help="the supervised program's name")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- command and arguments")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("no command given after --")

    previous = [
        p for p in stack_processes(args.stack, program=args.program) if p.pid != os.getpid()
    ]
    if previous:
        listed = ", ".join(f"{p.pid} ({p.command[:60]})" for p in previous)
        print(f"replace_previous: ending the previous {args.program}: {listed}", flush=True)
        end_processes(previous)
    os.execvp(command[0], command)
    return 127  # not reached: exec replaces this process


if __name__ == "__main__":
    sys.exit(main())
