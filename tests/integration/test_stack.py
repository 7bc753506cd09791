"""The whole local stack as an operator runs it: `mlops stack up` on free ports with a var
directory of its own, every component healthy, Prometheus scraping every target, a crashed
MLflow restarted without the port left blocked, and `down` leaving nothing behind."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from services.cli.localinfra import port_open, wait_until
from services.cli.localstack import (
    LocalStack,
    StackSettings,
    Supervisor,
    end_processes,
    listener_of,
    load_stack,
    stack_processes,
)
from services.shared.settings import PROJECT_ROOT


def _mlops(
    env: dict[str, str], *args: str, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "services.cli.main", *args],
        env=env,
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


@pytest.fixture
def stack_env(tmp_path: Path) -> Iterator[dict[str, str]]:
    names = [name for name in StackSettings.model_fields if name.endswith("_port")]
    # held open together, so that no two components get the same port
    with contextlib.ExitStack() as held:
        sockets = [held.enter_context(socket.create_server(("127.0.0.1", 0))) for _ in names]
        ports = {
            f"MLOPS_STACK_{name.upper()}": str(sock.getsockname()[1])
            for name, sock in zip(names, sockets, strict=True)
        }
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("MLOPS_")},
        **ports,
        "MLOPS_STACK_VAR_DIR": str(tmp_path / "var"),
        "COLUMNS": "160",
    }
    yield env
    # whatever happened in the test, nothing of this stack survives it
    _mlops(env, "stack", "down", timeout=120)
    end_processes(stack_processes((tmp_path / "var").resolve()))


def _targets(stack: LocalStack) -> dict[str, str]:
    url = f"http://127.0.0.1:{stack.settings.prometheus_port}/api/v1/targets"
    with urllib.request.urlopen(url, timeout=5) as response:
        active = json.load(response)["data"]["activeTargets"]
    return {t["labels"]["job"]: t["health"] for t in active}


@pytest.mark.timeout(600)
def test_up_status_crash_and_down(stack_env: dict[str, str]) -> None:
    up = _mlops(stack_env, "stack", "up", "--timeout", "300")
    assert up.returncode == 0, up.stdout + up.stderr
    # the settings the stack was started with (its ports are not in this process's environment)
    stack = load_stack(StackSettings(var_dir=Path(stack_env["MLOPS_STACK_VAR_DIR"])))
    assert stack.settings.kafka_port == int(stack_env["MLOPS_STACK_KAFKA_PORT"])
    supervisor = Supervisor(stack)
    components = stack.components()
    services = stack.built_services()
    assert services, "no service package can run yet"
    assert f"{len(services) + 2}/{len(services) + 2} targets up" in up.stdout

    # every program runs, every probe is healthy, Prometheus scrapes every target
    programs = supervisor.programs()
    assert {c.name for c in components} == set(programs)
    assert {p.state for p in programs.values()} == {"RUNNING"}
    assert all(h.ok for h in stack.health(components).values())
    assert _targets(stack) == dict.fromkeys(["prometheus", "triton", *services], "up")
    status = _mlops(stack_env, "stack", "status")
    assert status.returncode == 0, status.stdout
    assert (stack.var_dir / "log" / "kafka.log").exists()
    assert oct(stack.token_file.stat().st_mode & 0o777) == "0o600"
    # every program carries the stack's marker, so `down` can prove none is left
    marked = {p.pid: p.program for p in stack_processes(stack.var_dir)}
    assert {name: marked.get(p.pid) for name, p in programs.items()} == {n: n for n in programs}

    # who holds a port (named in `up`'s "port taken" errors)
    redis = programs["redis"].pid
    assert listener_of(stack.settings.redis_port) == f"redis-server (pid {redis})"

    # a second `up` starts nothing
    again = _mlops(stack_env, "stack", "up", "--timeout", "60")
    assert again.returncode == 0, again.stdout + again.stderr
    assert "nothing started" in again.stdout
    assert {n: p.pid for n, p in supervisor.programs().items()} == {
        n: p.pid for n, p in programs.items()
    }

    # MLflow killed with SIGKILL: its uvicorn child would keep the port; the restart ends it
    mlflow_before = stack_processes(stack.var_dir, program="mlflow")
    server = programs["mlflow"].pid
    assert any(p.pid != server for p in mlflow_before), "expected MLflow's uvicorn child"
    os.kill(server, signal.SIGKILL)
    wait_until(
        lambda: (p := supervisor.programs()["mlflow"]).state == "RUNNING" and p.pid != server,
        60,
        "mlflow restarted",
        interval_s=0.2,
    )
    mlflow = next(c for c in components if c.name == "mlflow")
    wait_until(lambda: mlflow.probe().ok, 120, "mlflow healthy again", interval_s=0.5)
    # ended by the restart's wrapper; on a loaded machine the kernel may take a moment to reap
    before = {p.pid for p in mlflow_before}
    wait_until(
        lambda: not before & {p.pid for p in stack_processes(stack.var_dir, program="mlflow")},
        30,
        "the old MLflow processes ended",
        interval_s=0.5,
    )

    # down: no process carrying the stack's marker, no port taken
    down = _mlops(stack_env, "stack", "down", timeout=180)
    assert down.returncode == 0, down.stdout + down.stderr
    assert stack_processes(stack.var_dir) == []
    assert not supervisor.running()
    taken = [p for c in components for p in c.ports if port_open("127.0.0.1", p, 0.2)]
    assert taken == []
    stopped = _mlops(stack_env, "stack", "status")
    assert stopped.returncode == 3
