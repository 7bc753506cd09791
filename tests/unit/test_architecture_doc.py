"""docs/architecture.md stays true where it names things that exist in code: the topics, the
ports and the settings that set them, every settings variable it mentions, the gRPC methods
and the messages on the topics."""

from __future__ import annotations

import importlib
import inspect
import re
from typing import Any

import pytest
from pydantic_settings import BaseSettings
from settings_env import settings_modules

from services.shared.proto.mlops.v1 import (
    events_pb2,
    models_pb2,
    monitoring_pb2,
    predictor_pb2,
    registry_pb2,
)
from services.shared.settings import PROJECT_ROOT, ServiceSettings
from services.shared.topics import Topics

DOC = (PROJECT_ROOT / "docs" / "architecture.md").read_text()
PROTO_MODULES = (events_pb2, models_pb2, monitoring_pb2, predictor_pb2, registry_pb2)


def _table(heading: str) -> list[list[str]]:
    """The rows (cells, stripped) of the first table under ``heading``, header excluded."""
    section = DOC.split(heading, 1)[1]
    lines = [line for line in section.splitlines() if line.startswith("|")]
    start = section.splitlines().index(lines[0])
    rows = []
    for line in section.splitlines()[start:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split("|")])
    assert rows[1][0].startswith("---"), f"{heading}: not a table"
    return rows[2:]


def _ticked(cell: str) -> list[str]:
    return re.findall(r"`([^`]+)`", cell)


def _settings_defaults() -> dict[str, Any]:
    """Every environment variable a settings class reads -> its declared default."""
    defaults = {}
    for module_name in settings_modules():
        module = importlib.import_module(module_name)
        for _, cls in inspect.getmembers(module, inspect.isclass):
            if issubclass(cls, BaseSettings) and cls is not BaseSettings:
                prefix = str(cls.model_config.get("env_prefix", ""))
                for name, field in cls.model_fields.items():
                    default = field.get_default(call_default_factory=True)
                    defaults[f"{prefix}{name}".upper()] = default
    return defaults


def test_every_topic_is_in_the_topic_table_and_every_topic_named_exists() -> None:
    rows = _table("### Topics and their messages")
    in_table = [_ticked(row[0])[0] for row in rows]
    assert sorted(in_table) == sorted(Topics().all()), (
        "the Topics table of docs/architecture.md and services/shared/topics.py differ"
    )
    # anywhere in the page: a name that looks like a topic must be one
    families = {topic.split(".")[0] for topic in Topics().all()}
    pattern = r"\b((?:" + "|".join(sorted(families)) + r")\.[a-z][a-z.]*[a-z])\b"
    named = {m for m in re.findall(pattern, DOC) if not m.endswith((".py", ".md", ".proto"))}
    assert named <= set(Topics().all()), named - set(Topics().all())


def test_the_messages_on_the_topics_exist() -> None:
    for row in _table("### Topics and their messages"):
        (message,) = _ticked(row[2])
        assert any(hasattr(module, message) for module in PROTO_MODULES), message


def test_ports_are_the_defaults_of_the_settings_named_beside_them() -> None:
    defaults = _settings_defaults()
    rows = _table("### Ports")
    assert len(rows) >= 15
    for row in rows:
        port = int(row[1])
        names = _ticked(row[2])
        assert names, f"{row[0]}: no setting named"
        for name in names:
            assert name in defaults, f"{row[0]}: no settings class reads {name}"
            default = defaults[name]
            if isinstance(default, int):
                assert default == port, f"{name} defaults to {default}, the doc says {port}"
            else:  # an address: host:port or a URL
                assert str(default).endswith(f":{port}"), f"{name}={default}, doc: {port}"


def test_every_stack_port_setting_is_in_the_port_table() -> None:
    named = {name for row in _table("### Ports") for name in _ticked(row[2])}
    stack_ports = {n for n in _settings_defaults() if re.fullmatch(r"MLOPS_STACK_\w+_PORT", n)}
    missing = sorted(stack_ports - named)
    assert not missing, f"add rows for {missing} to the Ports table of docs/architecture.md"


def test_every_settings_variable_named_exists() -> None:
    known = set(_settings_defaults())
    for name in set(re.findall(r"\bMLOPS_[A-Z0-9_]+", DOC)):
        if name.endswith("_"):  # a prefix (or a placeholder such as MLOPS_STACK_*)
            assert any(k.startswith(name) for k in known), name
        else:
            assert name in known, f"no settings class reads {name}"


def test_the_settings_table_names_each_class_with_its_prefix() -> None:
    classes = {}
    for module_name in settings_modules():
        module = importlib.import_module(module_name)
        for name, cls in inspect.getmembers(module, inspect.isclass):
            # ServiceSettings: the base each service's class extends, never read on its own
            if (
                issubclass(cls, BaseSettings)
                and cls.__module__ == module_name
                and cls is not ServiceSettings
            ):
                classes[name] = (cls.model_config.get("env_prefix"), module_name)
    documented = {}
    for row in _table("### Settings"):
        names, prefixes, (path,) = _ticked(row[0]), _ticked(row[1]), _ticked(row[2])
        for name, prefix in zip(names, prefixes, strict=True):
            documented[name] = (prefix, path.removesuffix(".py").replace("/", "."))
    assert set(documented) == set(classes), (
        "the Settings table of docs/architecture.md and the settings classes differ"
    )
    for name, (prefix, module) in documented.items():
        assert classes[name] == (prefix, module), name


@pytest.mark.parametrize(
    ("service", "module"), [("Predictor", predictor_pb2), ("ModelRegistry", registry_pb2)]
)
def test_the_grpc_table_lists_exactly_each_services_methods(service: str, module: Any) -> None:
    rows = [row for row in _table("### gRPC services") if _ticked(row[0]) == [service]]
    documented = [_ticked(row[1])[0] for row in rows]
    actual = [m.name for m in module.DESCRIPTOR.services_by_name[service].methods]
    assert sorted(documented) == sorted(actual)


def test_the_code_paths_named_exist() -> None:
    for path in set(re.findall(r"`((?:services|tests|protos|deploy)/[\w/.]+)`", DOC)):
        assert (PROJECT_ROOT / path).exists(), path
