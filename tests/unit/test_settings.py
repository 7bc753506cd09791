"""Settings defaults are the contract (docs/architecture.md), everywhere they are written down:
the shared settings, each service's settings, the local stack, and
feature_repo/feature_store.yaml."""

from __future__ import annotations

import importlib
import inspect
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic_settings import BaseSettings
from settings_env import SERVICES, known_env_names, settings_modules

from services.cli.localstack import LocalStack, StackSettings
from services.shared.featurestore import repo_config_dict
from services.shared.settings import (
    PROJECT_ROOT,
    FeastSettings,
    KafkaSettings,
    MlflowSettings,
    RedisSettings,
    RegistryClientSettings,
    ServiceSettings,
    StorageSettings,
    TritonSettings,
)

METRICS_PORTS = {
    "ingestion": 9101,
    "features": 9102,
    "training": 9103,
    "registry": 9104,
    "serving": 9105,
    "monitoring": 9106,
    "autopilot": 9107,
    "dashboard": 9108,
}
GRPC_PORTS = {"serving": 50051, "registry": 50052}
HTTP_PORTS = {"dashboard": 8080}


def _default(cls: type[BaseSettings], field: str) -> Any:
    """A field's declared default (not what this shell's environment makes of it)."""
    return cls.model_fields[field].get_default(call_default_factory=True)


def test_shared_settings_defaults_are_the_contract() -> None:
    assert _default(KafkaSettings, "bootstrap") == "127.0.0.1:9092"
    assert _default(RedisSettings, "port") == 6379
    assert [_default(TritonSettings, f"{p}_port") for p in ("http", "grpc", "metrics")] == [
        8000,
        8001,
        8002,
    ]
    assert _default(MlflowSettings, "tracking_uri") == "http://127.0.0.1:5000"
    assert _default(RegistryClientSettings, "address") == "127.0.0.1:50052"


def test_the_local_stack_defaults_are_the_contract() -> None:
    assert _default(StackSettings, "kafka_port") == 9092
    assert _default(StackSettings, "redis_port") == 6379
    assert _default(StackSettings, "triton_http_port") == 8000
    assert _default(StackSettings, "triton_grpc_port") == 8001
    assert _default(StackSettings, "triton_metrics_port") == 8002
    assert _default(StackSettings, "prometheus_port") == 9090
    assert _default(StackSettings, "mlflow_port") == 5000
    for service, port in METRICS_PORTS.items():
        assert _default(StackSettings, f"{service}_metrics_port") == port
    for service, port in GRPC_PORTS.items():
        assert _default(StackSettings, f"{service}_grpc_port") == port
    for service, port in HTTP_PORTS.items():
        assert _default(StackSettings, f"{service}_port") == port


def _service_settings_class(service: str) -> type[ServiceSettings]:
    module = importlib.import_module(f"services.{service}.settings")
    classes = [
        cls
        for _, cls in inspect.getmembers(module, inspect.isclass)
        if issubclass(cls, ServiceSettings) and cls is not ServiceSettings
    ]
    assert len(classes) == 1, f"services/{service}/settings.py: one ServiceSettings subclass"
    return classes[0]


@pytest.mark.parametrize(
    "service",
    [s for s in SERVICES if f"services.{s}.settings" in settings_modules()],
)
def test_each_service_settings_defaults_are_the_contract(service: str) -> None:
    cls = _service_settings_class(service)
    assert cls.model_config.get("env_prefix") == f"MLOPS_{service.upper()}_"
    assert _default(cls, "metrics_port") == METRICS_PORTS[service]
    if service in GRPC_PORTS:
        assert _default(cls, "port") == GRPC_PORTS[service]
    if service in HTTP_PORTS:
        assert _default(cls, "port") == HTTP_PORTS[service]


def test_every_service_has_its_settings_module() -> None:
    # the six packages of the contract each configure themselves the one way
    assert [f"services.{s}.settings" for s in SERVICES] == settings_modules()[2:]


def test_the_local_stack_gives_services_only_variables_they_read(tmp_path: Path) -> None:
    """The stack's environment and the services' settings are written in different files;
    a renamed field on either side would silently fall back to a default."""
    names = known_env_names()
    stack = LocalStack(StackSettings(var_dir=tmp_path / "var"))
    for service in SERVICES:
        env = stack.service_environment(service)
        unknown = [k for k in env if k.startswith("MLOPS_") and k not in names]
        assert not unknown, f"{service}: no settings field reads {unknown}"


def test_feature_store_yaml_agrees_with_the_settings_defaults() -> None:
    repo = PROJECT_ROOT / "feature_repo"
    on_disk = yaml.safe_load((repo / "feature_store.yaml").read_text())
    feast = FeastSettings(
        repo_path=_default(FeastSettings, "repo_path"), project=_default(FeastSettings, "project")
    )
    redis = RedisSettings(
        host=_default(RedisSettings, "host"), port=_default(RedisSettings, "port")
    )
    default_storage = StorageSettings(data_dir=_default(StorageSettings, "data_dir"))
    built = repo_config_dict(feast, redis, default_storage.feast_registry_path)

    assert on_disk["project"] == built["project"] == "mlops"
    assert on_disk["provider"] == built["provider"]
    # feast resolves a relative registry path against the repository directory
    assert (repo / on_disk["registry"]).resolve() == default_storage.feast_registry_path
    assert Path(str(built["registry"])) == default_storage.feast_registry_path
    assert on_disk["online_store"] == built["online_store"]
    assert on_disk["offline_store"] == built["offline_store"] == {"type": "duckdb"}
    assert (
        on_disk["entity_key_serialization_version"]
        == built["entity_key_serialization_version"]
        == 3
    )
