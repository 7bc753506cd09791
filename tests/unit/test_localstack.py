"""The local stack's rendered configurations (no process is started here)."""

from __future__ import annotations

import configparser
import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from services.cli import localinfra
from services.cli.localstack import (
    PROGRAM_MARKER,
    SERVICES,
    STACK_MARKER,
    LocalStack,
    ServiceSpec,
    StackSettings,
    end_processes,
    stack_processes,
)
from services.cli.localstack.components import BACKGROUND_NICE, SERVICE_SPECS


@pytest.fixture
def stack(tmp_path: Path) -> LocalStack:
    settings = StackSettings(
        var_dir=tmp_path / "var",
        kafka_port=19092,
        redis_port=16379,
        prometheus_port=19090,
        serving_grpc_port=15051,
        monitoring_metrics_port=19106,
    )
    return LocalStack(settings, python=Path(sys.executable))


def _supervisord(stack: LocalStack) -> configparser.RawConfigParser:
    parser = configparser.RawConfigParser()
    parser.read_string(stack.render_supervisord_config())
    return parser


def _env(section: configparser.SectionProxy) -> dict[str, str]:
    pairs = [p.split("=", 1) for p in section["environment"].split('",')]
    return {k: v.strip('"').replace("%%", "%") for k, v in pairs}


def test_every_program_is_supervised_the_same_way(stack: LocalStack) -> None:
    config = _supervisord(stack)
    programs = [s.removeprefix("program:") for s in config.sections() if s.startswith("program:")]
    assert {"kafka", "redis", "triton", "prometheus", "mlflow"} <= set(programs)
    assert set(programs) - {"kafka", "redis", "triton", "prometheus", "mlflow"} == set(
        stack.built_services()
    )
    for name in programs:
        section = config[f"program:{name}"]
        assert section["autorestart"] == "true"
        assert section["stopasgroup"] == section["killasgroup"] == "true"
        assert section["stdout_logfile"] == str(stack.var_dir / "log" / f"{name}.log")
        env = _env(section)
        assert env["MLOPS_LOCAL_STACK"] == str(stack.var_dir)
        assert env["MLOPS_LOCAL_STACK_PROGRAM"] == name
    # services wait for the infrastructure (`up` starts them) and stop first (`down`)
    for service in stack.built_services():
        assert config[f"program:{service}"]["autostart"] == "false"
        assert int(config[f"program:{service}"]["priority"]) > int(
            config["program:kafka"]["priority"]
        )


def test_services_run_from_this_interpreter_with_the_stacks_addresses(stack: LocalStack) -> None:
    config = _supervisord(stack)
    for service in stack.built_services():
        section = config[f"program:{service}"]
        command = f"{sys.executable} -m services.{service}"
        if SERVICE_SPECS[service].background:  # behind the request path: a lower CPU priority
            command = f"nice -n {BACKGROUND_NICE} {command}"
        assert section["command"] == command
        env = _env(section)
        assert env["MLOPS_KAFKA_BOOTSTRAP"] == "127.0.0.1:19092"
        assert env["MLOPS_KAFKA_BROKER_FLAVOR"] == "tansu"
        assert env["MLOPS_REDIS_PORT"] == "16379"
        assert env["MLOPS_STORAGE_DATA_DIR"] == str(stack.var_dir / "data")
        assert env["MLOPS_TRITON_MODEL_REPOSITORY"] == str(stack.var_dir / "data/triton_models")
        assert env[f"MLOPS_{service.upper()}_METRICS_PORT"] == str(
            stack.settings.metrics_port(service)
        )
    assert "--listener-url tcp://127.0.0.1:19092" in config["program:kafka"]["command"]
    assert "--dir " + str(stack.var_dir / "data/redis") in config["program:redis"]["command"]
    assert "services.cli.replace_previous" in config["program:mlflow"]["command"]


def test_serving_and_the_event_path_keep_the_cpu_priority_of_the_infrastructure() -> None:
    background = {name for name, spec in SERVICE_SPECS.items() if spec.background}
    assert {"serving", "ingestion", "features", "registry"}.isdisjoint(background)
    assert {"monitoring", "training"} <= background


def test_service_environment_covers_every_service(stack: LocalStack) -> None:
    serving = stack.service_environment("serving")
    assert serving["MLOPS_SERVING_PORT"] == "15051"
    assert "MLOPS_REGISTRY_TOKEN" not in serving  # only the registry holds the token
    for service in SERVICES:
        assert stack.service_environment(service)["MLOPS_KAFKA_BROKER_FLAVOR"] == "tansu"


def test_the_registry_token_is_generated_once_and_private(stack: LocalStack) -> None:
    token = stack.registry_token()
    assert len(token) >= 32
    assert stack.registry_token() == token
    assert stat.S_IMODE(stack.token_file.stat().st_mode) == 0o600
    assert stack.service_environment("registry")["MLOPS_REGISTRY_TOKEN"] == token
    assert stack.service_environment("training")["MLOPS_REGISTRY_CLIENT_TOKEN_FILE"] == str(
        stack.token_file
    )


def test_the_supervisord_config_is_private_and_rewritten_only_on_change(
    stack: LocalStack,
) -> None:
    stack.prepare()
    assert stack.write_supervisord_config() is True
    assert stat.S_IMODE(stack.supervisord_config.stat().st_mode) == 0o600  # holds the token
    assert stack.write_supervisord_config() is False


def test_prometheus_scrapes_what_runs_on_the_ports_in_use(stack: LocalStack) -> None:
    config = yaml.safe_load(stack.render_prometheus_config())
    targets = {
        job["job_name"]: job["static_configs"][0]["targets"] for job in config["scrape_configs"]
    }
    expected = {"prometheus", "triton", *stack.built_services()}
    assert set(targets) == expected
    assert targets["prometheus"] == ["127.0.0.1:19090"]
    assert targets["triton"] == ["127.0.0.1:8002"]
    if "monitoring" in stack.built_services():
        assert targets["monitoring"] == ["127.0.0.1:19106"]
    assert config["global"]["scrape_interval"] == "5s"


def test_the_prometheus_template_has_the_contract_targets() -> None:
    template = Path(__file__).resolve().parents[2] / "deploy" / "local" / "prometheus.yml"
    config = yaml.safe_load(template.read_text())
    targets = {j["job_name"]: j["static_configs"][0]["targets"] for j in config["scrape_configs"]}
    assert targets["prometheus"] == ["127.0.0.1:9090"]
    assert targets["triton"] == ["127.0.0.1:8002"]
    for service in SERVICES:
        assert targets[service] == [f"127.0.0.1:{StackSettings().metrics_port(service)}"]


def test_no_process_carries_the_marker_of_a_stack_that_never_ran(stack: LocalStack) -> None:
    assert stack_processes(stack.var_dir) == []


def test_a_service_with_an_http_api_is_one_entry_of_the_table(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from services.cli.localstack import components

    # ports nobody listens on (a developer's own stack may hold the defaults 8080/9108)
    http, metrics = localinfra.free_port(), localinfra.free_port()

    class WithDashboard(StackSettings):
        dashboard_port: int = http
        dashboard_metrics_port: int = metrics

    spec = ServiceSpec("dashboard", http_api="operator dashboard", http_health_path="/healthz")
    monkeypatch.setitem(components.SERVICE_SPECS, "dashboard", spec)
    stack = LocalStack(WithDashboard(var_dir=tmp_path / "var"), python=Path(sys.executable))

    component = components.service_component(stack, spec)
    assert component.command == (sys.executable, "-m", "services.dashboard")
    assert component.ports == (metrics, http)
    assert component.scrape_port == metrics
    assert [e.address for e in component.endpoints] == [
        f"http://127.0.0.1:{http}",
        f"http://127.0.0.1:{metrics}/metrics",
    ]
    assert component.env["MLOPS_DASHBOARD_PORT"] == str(http)
    assert component.env["MLOPS_DASHBOARD_METRICS_PORT"] == str(metrics)
    assert component.env["MLOPS_KAFKA_BOOTSTRAP"] == "127.0.0.1:9092"
    assert not component.probe().ok  # nothing listens: both probes say so
    assert "HTTP no answer" in component.probe().detail


def test_the_stacks_processes_are_found_by_their_markers_and_ended(stack: LocalStack) -> None:
    env = {**os.environ, STACK_MARKER: str(stack.var_dir), PROGRAM_MARKER: "sleeper"}
    child = subprocess.Popen(["sleep", "60"], env=env)
    try:
        found = stack_processes(stack.var_dir)
        assert [(p.pid, p.program, p.command) for p in found] == [
            (child.pid, "sleeper", "sleep 60")
        ]
        assert stack_processes(stack.var_dir, program="other") == []
        end_processes(found, timeout_s=5)
        assert child.wait(timeout=5) == -signal.SIGTERM
    finally:
        child.kill()
        child.wait()
