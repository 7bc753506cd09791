"""The environment that makes a service process read given settings: what the tests that start
services as subprocesses pass them, built from the settings objects the fixtures hold, so that
no test spells out (and can misspell) a variable name."""

from __future__ import annotations

from pathlib import Path

from pydantic import SecretStr
from pydantic_settings import BaseSettings


def settings_environment(*settings: BaseSettings) -> dict[str, str]:
    """Every field of each of ``settings`` as the variable its class reads (prefix + name).

    A field that is None (an optional file not configured) is left out: unset, the process
    reads the same None."""
    env = {}
    for one in settings:
        prefix = str(one.model_config.get("env_prefix", ""))
        for name, field in type(one).model_fields.items():
            value = getattr(one, name)
            if value is None:
                if field.default is not None:
                    raise TypeError(f"{name}: None differs from its default; pass it by hand")
                continue
            env[f"{prefix}{name}".upper()] = _text(value, name)
    return env


def _text(value: object, name: str) -> str:
    if isinstance(value, SecretStr):
        return value.get_secret_value()
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str | int | float | Path):
        return str(value)
    raise TypeError(f"{name}: pass {type(value).__name__} values by hand")
