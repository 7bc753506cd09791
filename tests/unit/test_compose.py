"""compose.yaml (not runnable here: no Docker engine) checked as data: healthchecks, start-up
order, ports against the contract, and the addresses in .env against the settings."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from settings_env import known_env_names

from services.cli.localstack.components import SERVICE_SPECS
from services.shared.settings import PROJECT_ROOT
from services.shared.topics import Topics

SERVICES = (
    "ingestion",
    "features",
    "training",
    "registry",
    "serving",
    "monitoring",
    "autopilot",
)
# the contract (docs/architecture.md): compose service -> {container port: host port}
CONTRACT_PORTS = {
    "kafka": {9092: 9092},
    "redis": {6379: 6379},
    "triton": {8000: 8000, 8001: 8001, 8002: 8002},
    "prometheus": {9090: 9090},
    "mlflow": {5000: 5000},
    "serving": {50051: 50051, 9105: 9105},
    "registry": {50052: 50052, 9104: 9104},
    "ingestion": {9101: 9101},
    "features": {9102: 9102},
    "training": {9103: 9103},
    "monitoring": {9106: 9106},
    "autopilot": {9107: 9107},
    "dashboard": {8080: 8080},
}
METRICS_PORTS = {
    "ingestion": 9101,
    "features": 9102,
    "training": 9103,
    "registry": 9104,
    "serving": 9105,
    "monitoring": 9106,
    "autopilot": 9107,
}
_VARIABLE = re.compile(r"\$\{(\w+)(?::?([-?])([^}]*))?\}")


def _dotenv() -> dict[str, str]:
    values = {}
    for raw in (PROJECT_ROOT / ".env").read_text().splitlines():
        line = raw.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            values[key] = value
    return values


def _interpolate(text: str, env: dict[str, str]) -> str:
    def replace(match: re.Match[str]) -> str:
        name, kind, default = match.groups()
        if name in env:
            return env[name]
        if kind == "-":
            return default
        raise AssertionError(f"${{{name}}} is used but not defined in .env")

    return _VARIABLE.sub(replace, text.replace("$$", "\0")).replace("\0", "$")


@pytest.fixture(scope="module")
def env() -> dict[str, str]:
    return _dotenv()


@pytest.fixture(scope="module")
def compose(env: dict[str, str]) -> dict[str, Any]:
    # the registry token is the one value deliberately not in .env (a secret)
    secret = {"MLOPS_REGISTRY_TOKEN": "token-from-the-shell"}
    text = (PROJECT_ROOT / "compose.yaml").read_text()
    loaded: dict[str, Any] = yaml.safe_load(_interpolate(text, {**env, **secret}))
    return loaded


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    found: dict[str, dict[str, Any]] = compose["services"]
    return found


def _jobs(services: dict[str, dict[str, Any]]) -> set[str]:
    return {name for name, s in services.items() if s.get("restart") == "no"}


def test_every_component_of_the_platform_is_there(services: dict[str, dict[str, Any]]) -> None:
    infrastructure = {"kafka", "redis", "triton", "prometheus", "grafana", "mlflow"}
    assert infrastructure | set(SERVICES) <= set(services)
    for service in SERVICES:
        assert services[service]["command"] == ["python", "-m", f"services.{service}"]
        assert services[service]["build"]["dockerfile"] == "deploy/docker/Dockerfile"
    assert "apache/kafka" in services["kafka"]["image"]
    assert (
        "nvcr.io/nvidia/tritonserver"
        in (PROJECT_ROOT / services["triton"]["build"]["context"] / "triton.Dockerfile").read_text()
    )


def test_the_services_behind_the_request_path_get_fewer_cpu_shares(
    services: dict[str, dict[str, Any]],
) -> None:
    # the local stack runs them at a lower nice value; compose says the same with cpu_shares
    for name, spec in SERVICE_SPECS.items():
        shares = services[name].get("cpu_shares", 1024)
        assert (shares < 1024) == spec.background, name


def test_every_long_running_service_has_a_healthcheck(
    services: dict[str, dict[str, Any]],
) -> None:
    assert _jobs(services) == {"kafka-init", "feast-apply"}
    for name, service in services.items():
        if name in _jobs(services):
            continue  # one-shot jobs: waited for by their exit code (next test)
        check = service.get("healthcheck")
        assert check and check.get("test") and not check.get("disable"), f"{name}: no healthcheck"
        assert service.get("restart") == "unless-stopped", name


def test_dependencies_wait_for_health_or_completion(services: dict[str, dict[str, Any]]) -> None:
    jobs = _jobs(services)
    for name, service in services.items():
        depends_on = service.get("depends_on", {})
        assert isinstance(depends_on, dict), f"{name}: depends_on must name conditions"
        for dependency, spec in depends_on.items():
            expected = "service_completed_successfully" if dependency in jobs else "service_healthy"
            assert spec == {"condition": expected}, f"{name} -> {dependency}"
    for service in SERVICES:  # topics exist before any service starts
        assert "kafka-init" in services[service]["depends_on"], service
    for consumer_of_feast in ("features", "training", "serving"):
        assert "feast-apply" in services[consumer_of_feast]["depends_on"]


def _published(service: dict[str, Any]) -> dict[int, int]:
    ports = {}
    for entry in service.get("ports", []):
        *host_part, container = str(entry).split(":")
        assert host_part and host_part[0] == "127.0.0.1", f"{entry}: publish on 127.0.0.1 only"
        ports[int(container)] = int(host_part[-1])
    return ports


def test_published_ports_are_the_contract(services: dict[str, dict[str, Any]]) -> None:
    published = {name: _published(s) for name, s in services.items() if s.get("ports")}
    published.pop("grafana")  # not part of the contract
    assert published == CONTRACT_PORTS


def test_triton_reserves_a_gpu_and_shares_the_model_repository_with_the_registry(
    services: dict[str, dict[str, Any]], env: dict[str, str]
) -> None:
    devices = services["triton"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    assert "--model-control-mode=explicit" in services["triton"]["command"]
    assert "triton-models:/models" in services["triton"]["volumes"]
    assert "triton-models:/models" in services["registry"]["volumes"]
    assert env["MLOPS_TRITON_MODEL_REPOSITORY"] == "/models"
    assert env["MLOPS_TRITON_INSTANCE_KIND"] == "KIND_GPU"


def test_env_uses_apache_kafka_and_creates_every_topic(env: dict[str, str]) -> None:
    assert env["MLOPS_KAFKA_BROKER_FLAVOR"] == "kafka"
    assert env["KAFKA_TOPICS"].split(",") == Topics().all()


def test_env_names_are_settings_the_services_read(env: dict[str, str]) -> None:
    names = known_env_names()
    unknown = [k for k in env if k.startswith("MLOPS_") and k not in names]
    assert not unknown, f".env sets variables no settings class reads: {unknown}"


def test_env_holds_no_secret(env: dict[str, str]) -> None:
    assert not [k for k in env if re.search("TOKEN|PASSWORD|SECRET", k)]
    compose_text = (PROJECT_ROOT / "compose.yaml").read_text()
    assert "${MLOPS_REGISTRY_TOKEN:?" in compose_text  # required from the shell, no default


def test_prometheus_scrapes_every_service(services: dict[str, dict[str, Any]]) -> None:
    mount = next(v for v in services["prometheus"]["volumes"] if "prometheus.yml" in v)
    config = yaml.safe_load((PROJECT_ROOT / Path(mount.split(":")[0])).read_text())
    targets = {
        job["job_name"]: target
        for job in config["scrape_configs"]
        for static in job["static_configs"]
        for target in static["targets"]
    }
    for service, port in METRICS_PORTS.items():
        assert targets[service] == f"{service}:{port}"
    assert targets["triton"] == "triton:8002"


def test_compose_file_validates_against_the_compose_specification(
    compose: dict[str, Any],
) -> None:
    """The Compose specification's own JSON schema (as vendored by check-jsonschema), not only
    our expectations: what `docker compose config` would reject fails here."""
    import importlib.util
    import json

    import jsonschema

    # the file only: importing check_jsonschema loads its CLI, which needs a newer click
    spec = importlib.util.find_spec("check_jsonschema")
    assert spec is not None and spec.submodule_search_locations
    package = Path(next(iter(spec.submodule_search_locations)))
    schema = json.loads((package / "builtin_schemas" / "vendor" / "compose-spec.json").read_text())
    validator = jsonschema.validators.validator_for(schema)(schema)  # 2020-12
    errors = [f"{'/'.join(map(str, e.path))}: {e.message}" for e in validator.iter_errors(compose)]
    assert not errors, "\n".join(errors)
    broken = {**compose, "services": {**compose["services"], "kafka": {"imagee": "typo"}}}
    assert not validator.is_valid(broken)  # the schema rejects unknown keys
