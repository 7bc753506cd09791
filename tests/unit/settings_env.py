"""The environment variable names the platform's settings classes read (for contract tests)."""

from __future__ import annotations

import importlib
import inspect

from pydantic_settings import BaseSettings

from services.shared.settings import PROJECT_ROOT

SERVICES = (
    "ingestion",
    "features",
    "training",
    "registry",
    "serving",
    "monitoring",
    "autopilot",
    "dashboard",
)


def settings_modules() -> list[str]:
    """The shared settings, the local stack's, and each service's that exists so far."""
    modules = ["services.shared.settings", "services.cli.localstack.settings"]
    modules += [
        f"services.{s}.settings"
        for s in SERVICES
        if (PROJECT_ROOT / "services" / s / "settings.py").exists()
    ]
    return modules


def known_env_names() -> set[str]:
    names = set()
    for module_name in settings_modules():
        module = importlib.import_module(module_name)
        for _, cls in inspect.getmembers(module, inspect.isclass):
            if issubclass(cls, BaseSettings) and cls is not BaseSettings:
                prefix = str(cls.model_config.get("env_prefix", ""))
                names |= {f"{prefix}{field}".upper() for field in cls.model_fields}
    return names
