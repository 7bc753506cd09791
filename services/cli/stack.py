"""`mlops stack`: run the whole platform locally as supervised processes (`make up` calls it).

The logic (components, configurations, health probes) is in services/cli/localstack/; this
module is the terminal front end: progress while waiting, tables of states and endpoints.
"""

from __future__ import annotations

import http.client
import os
import shlex
import shutil
import time
import urllib.request
from collections.abc import Callable
from dataclasses import replace
from functools import wraps
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.table import Table

from services.cli import localinfra
from services.cli.localstack import (
    Component,
    Health,
    LocalStack,
    ProgramState,
    StackError,
    StackSettings,
    Supervisor,
    end_processes,
    listener_of,
    load_stack,
)

OVERRIDES = (
    "Ports and the var directory come from MLOPS_STACK_* variables (defaults: the contract), "
    "e.g. MLOPS_STACK_KAFKA_PORT=19092 MLOPS_STACK_VAR_DIR=/some/dir."
)

app = typer.Typer(
    help="Run the whole platform locally as supervised processes (supervisord): the Tansu "
    "Kafka broker, Redis, Triton, Prometheus, MLflow and the six services. " + OVERRIDES,
    no_args_is_help=True,
)
console = Console(highlight=False)
F = TypeVar("F", bound=Callable[..., Any])


def _reports_stack_errors(command: F) -> F:
    @wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except StackError as exc:
            console.print(f"[bold red]✗[/] {exc.message}")
            raise typer.Exit(1) from None

    return wrapper  # type: ignore[return-value]


def _rel(path: os.PathLike[str] | str) -> str:
    """A path as the operator typed it: relative to the working directory when inside it."""
    return os.path.relpath(path) if str(path).startswith(os.getcwd()) else str(path)


# ----------------------------------------------------------------------------- up


@app.command()
@_reports_stack_errors
def up(
    timeout: Annotated[
        float | None,
        typer.Option(help="Seconds to wait for every component to be healthy [default: 300]."),
    ] = None,
) -> None:
    """Start every component and wait until all are healthy, then print the endpoints.

    Order: the infrastructure, then the Feast definitions are applied (one writer), then the
    services, then Prometheus must see every scrape target up. Idempotent: on a running stack
    it starts only what is not running (and adds services that appeared since).
    """
    stack = LocalStack(StackSettings())
    supervisor = Supervisor(stack)
    deadline = time.monotonic() + (timeout or stack.settings.startup_timeout_s)
    _check_binaries()
    components = stack.components()
    console.print(f"[bold]MLOps platform[/] — local stack in {_rel(stack.var_dir)}/")
    _configure_and_start_supervisord(stack, supervisor, components)

    programs = supervisor.programs()
    already = {name for name, p in programs.items() if p.state == "RUNNING"}
    infrastructure = [c for c in components if c.role == "infrastructure"]
    services = [c for c in components if c.role == "service"]
    prometheus = next(c for c in infrastructure if c.name == "prometheus")
    # its targets include the services: first only "ready", all targets up at the end
    prometheus_ready = replace(
        prometheus,
        probe=lambda: Health(
            localinfra.http_ok(
                f"http://{stack.settings.host}:{stack.settings.prometheus_port}/-/ready"
            ),
            "ready",
        ),
    )

    console.print("[bold]Infrastructure[/]")
    _start(supervisor, infrastructure, programs)
    _wait_healthy(
        stack,
        supervisor,
        [prometheus_ready if c is prometheus else c for c in infrastructure],
        deadline,
    )

    with console.status("applying the Feast feature definitions…"):
        started = time.monotonic()
        applied = stack.apply_feature_definitions()
    console.print(
        f"[green]✓[/] Feast definitions {'applied' if applied else 'unchanged'}"
        + (f" ({time.monotonic() - started:.1f}s)" if applied else "")
    )

    console.print("[bold]Services[/]")
    _start(supervisor, services, programs)
    _wait_healthy(stack, supervisor, services, deadline)
    for missing in stack.unbuilt_services():
        console.print(
            f"  [dim]- {missing:<11} not built yet (services/{missing}/__main__.py missing)[/]"
        )

    console.print("[bold]Monitoring[/]")
    _wait_healthy(stack, supervisor, [prometheus], deadline)

    if {c.name for c in components} <= already:
        console.print("[green]✓[/] everything was already running; nothing started")
    _print_endpoints(stack, components)


def _configure_and_start_supervisord(
    stack: LocalStack, supervisor: Supervisor, components: list[Component]
) -> None:
    running = supervisor.running()
    if not running:
        # a supervisord killed with SIGKILL leaves its programs running, holding the ports
        strays = stack.processes()
        if strays:
            console.print(
                f"[yellow]![/] ending {len(strays)} process(es) a previous run left behind: "
                + ", ".join(f"{p.program} (pid {p.pid})" for p in strays)
            )
            end_processes(strays)
        if used := stack.ports_in_use(components):
            listed = "\n".join(f"  port {port} ({who})" for port, who in sorted(used.items()))
            raise StackError(
                "ports of the stack are already in use by processes it did not start:\n"
                f"{listed}\nStop them, or choose other ports: {OVERRIDES}"
            )

    old_prometheus = stack.prometheus_config.read_text() if stack.prometheus_config.exists() else ""
    stack.prepare()
    config_changed = stack.write_supervisord_config()
    console.print(f"[green]✓[/] configuration {_rel(stack.supervisord_config)}")
    if not running:
        supervisor.start()
        console.print(f"[green]✓[/] supervisord started (pid {supervisor.pid()})")
        return
    console.print(f"[green]✓[/] supervisord already running (pid {supervisor.pid()})")
    if config_changed:
        added, changed, removed = supervisor.reload()
        for verb, names in (("added", added), ("restarted", changed), ("removed", removed)):
            if names:
                console.print(f"[green]✓[/] {verb}: {', '.join(names)}")
    if stack.prometheus_config.read_text() != old_prometheus:
        _reload_prometheus(stack)


def _start(
    supervisor: Supervisor, components: list[Component], programs: dict[str, ProgramState]
) -> None:
    """Start what is not running or starting (services, and anything that gave up: FATAL)."""
    for component in components:
        program = programs.get(component.name)
        if program is None or program.state not in ("RUNNING", "STARTING", "BACKOFF"):
            supervisor.start_program(component.name)


def _check_binaries() -> None:
    missing = [b for b in ("redis-server", "prometheus") if shutil.which(b) is None]
    if missing:
        raise StackError(
            f"{' and '.join(missing)} not installed: run `make install` (Debian packages)"
        )


def _reload_prometheus(stack: LocalStack) -> None:
    url = f"http://{stack.settings.host}:{stack.settings.prometheus_port}/-/reload"
    try:
        urllib.request.urlopen(urllib.request.Request(url, method="POST"), timeout=5).close()
        console.print("[green]✓[/] Prometheus reloaded its scrape targets")
    except (OSError, http.client.HTTPException) as exc:
        console.print(f"[yellow]![/] Prometheus reload failed ({exc}); it restarts with them")


def _fail_if_fatal(
    supervisor: Supervisor, names: list[str], programs: dict[str, ProgramState]
) -> None:
    for name in names:
        state = programs[name].state if name in programs else "not loaded"
        if state in ("FATAL", "STOPPED", "not loaded"):
            tail = supervisor.stack.log_tail(name)
            raise StackError(
                f"{name} is {state} (it keeps exiting); last lines of "
                f"{_rel(supervisor.stack.log_file(name))}:\n{tail}"
            )


def _wait_healthy(
    stack: LocalStack, supervisor: Supervisor, components: list[Component], deadline: float
) -> None:
    pending = {c.name: c for c in components}
    started = time.monotonic()
    with console.status("") as status:
        while pending:
            health = stack.health(pending.values())
            for name, result in health.items():
                if result.ok:
                    console.print(
                        f"  [green]✓[/] {name:<11} {result.detail} "
                        f"({time.monotonic() - started:.1f}s)"
                    )
                    del pending[name]
            if not pending:
                break
            programs = supervisor.programs()
            _fail_if_fatal(supervisor, list(pending), programs)
            if time.monotonic() > deadline:
                lines = "\n".join(
                    f"  {n}: {programs[n].state}, {health[n].detail}; "
                    f"log: {_rel(stack.log_file(n))}"
                    for n in pending
                )
                raise StackError(f"not healthy in time:\n{lines}")
            waiting = ", ".join(
                f"{n} ({programs[n].state.lower()}: {health[n].detail})" for n in pending
            )
            status.update(f"waiting for {waiting} … {time.monotonic() - started:.0f}s")
            time.sleep(0.5)


def _print_endpoints(stack: LocalStack, components: list[Component]) -> None:
    table = Table(title="Endpoints", title_justify="left")
    table.add_column("component")
    table.add_column("address")
    for component in components:
        for endpoint in component.endpoints:
            table.add_row(endpoint.what, endpoint.address)
    console.print(table)
    console.print(
        f"Logs: {_rel(stack.log_dir)}/<name>.log (`make logs`); registry token: "
        f"{_rel(stack.token_file)}; stop with `make down`."
    )


# ----------------------------------------------------------------------------- down


@app.command()
@_reports_stack_errors
def down() -> None:
    """Stop every component and verify that no process and no port of the stack is left."""
    stack = load_stack()
    supervisor = Supervisor(stack)
    if supervisor.running():
        count = len(supervisor.programs())
        with console.status(f"stopping {count} programs (services first)…"):
            started = time.monotonic()
            supervisor.shutdown()
        console.print(
            f"[green]✓[/] stopped {count} programs and supervisord "
            f"({time.monotonic() - started:.1f}s)"
        )
    else:
        console.print("the local stack is not running")

    leftovers = stack.processes()
    if leftovers:
        console.print(
            "[yellow]![/] still running after the shutdown, ending them: "
            + ", ".join(f"{p.program} (pid {p.pid}: {p.command[:50]})" for p in leftovers)
        )
        end_processes(leftovers)
        if survivors := stack.processes():
            raise StackError(f"could not end: {survivors}")

    ports = sorted({port for c in stack.components() for port in c.ports})
    host = stack.settings.host
    deadline = time.monotonic() + 10
    while (busy := [p for p in ports if localinfra.port_open(host, p, 0.2)]) and (
        time.monotonic() < deadline
    ):
        time.sleep(0.2)
    if busy:
        listed = ", ".join(f"{p} ({listener_of(p) or 'unknown'})" for p in busy)
        raise StackError(f"no process of the stack is left, but ports are still taken: {listed}")
    console.print(
        f"[green]✓[/] no process of the stack left; ports {', '.join(map(str, ports))} are free"
    )


# ----------------------------------------------------------------------------- status


@app.command()
@_reports_stack_errors
def status() -> None:
    """Show each program's supervisor state and its health probe.

    Exit code: 0 all healthy, 1 something is not, 3 the stack is not running.
    """
    stack = load_stack()
    supervisor = Supervisor(stack)
    if not supervisor.running():
        strays = stack.processes()
        console.print("the local stack is not running (`make up` starts it)")
        if strays:
            console.print(
                f"[yellow]![/] but {len(strays)} of its processes are: "
                + ", ".join(f"{p.program} (pid {p.pid})" for p in strays)
                + "; `make down` ends them"
            )
        raise typer.Exit(3)

    components = stack.components()
    programs = supervisor.programs()
    health = stack.health(components)
    table = Table(title=f"Local stack ({_rel(stack.var_dir)}/)", title_justify="left")
    for column in ("program", "state", "pid", "uptime", "health", "probe"):
        table.add_column(column)
    all_ok = True
    for c in components:
        program = programs.get(c.name)
        state = program.state if program else "not loaded"
        ok = state == "RUNNING" and health[c.name].ok
        all_ok = all_ok and ok
        colour = "green" if state == "RUNNING" else "red"
        table.add_row(
            c.name,
            f"[{colour}]{state}[/]",
            str(program.pid) if program and program.pid else "",
            program.description.rpartition("uptime ")[2] if program else "",
            "[green]healthy[/]" if ok else "[red]unhealthy[/]",
            health[c.name].detail,
        )
    for missing in stack.unbuilt_services():
        table.add_row(missing, "[dim]not built[/]", "", "", "", f"services/{missing}/__main__.py")
    console.print(table)
    if not all_ok:
        raise typer.Exit(1)


# ----------------------------------------------------------------------------- env


@app.command()
@_reports_stack_errors
def env() -> None:
    """Print the stack's addresses as shell exports, for clients of a stack on other ports.

    Example: eval "$(mlops stack env)" && mlops simulate --rate 50 --duration 60
    """
    for name, value in load_stack().client_environment().items():
        print(f"export {name}={shlex.quote(value)}")


# ----------------------------------------------------------------------------- logs


@app.command()
@_reports_stack_errors
def logs(
    name: Annotated[
        str | None, typer.Argument(help="A program (kafka, serving, ...); default: all.")
    ] = None,
    follow: Annotated[
        bool, typer.Option("--follow", "-f", help="Keep printing new lines.")
    ] = False,
    lines: Annotated[int, typer.Option("--lines", "-n", help="Lines to show per log.")] = 50,
) -> None:
    """Show the logs of the stack's programs (var/log/<name>.log)."""
    stack = load_stack()
    available = sorted(p.stem for p in stack.log_dir.glob("*.log"))
    if name is not None and name not in available:
        known = ", ".join(available) or "none"
        raise StackError(f"no log for {name!r} in {_rel(stack.log_dir)}; there are: {known}")
    files = [str(stack.log_file(n)) for n in ([name] if name else available)]
    if not files:
        raise StackError(f"no logs yet in {_rel(stack.log_dir)} (start the stack: `make up`)")
    tail = shutil.which("tail") or "tail"
    os.execv(tail, [tail, "-n", str(lines), *(["-F"] if follow else []), *files])
