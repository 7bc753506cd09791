"""Where a run's code and environment come from: git commit (+ dirty flag) and versions."""

from __future__ import annotations

import platform
import subprocess
from dataclasses import dataclass
from importlib import metadata

from services.shared.settings import PROJECT_ROOT

_PACKAGES = ("torch", "numpy", "pandas", "scikit-learn", "feast", "mlflow", "pyarrow")


@dataclass(frozen=True)
class CodeVersion:
    commit: str
    dirty: bool

    def __str__(self) -> str:
        return f"{self.commit}{'-dirty' if self.dirty else ''}"


def _git(*args: str) -> str:
    result = subprocess.run(
        ["git", *args], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=10, check=True
    )
    return result.stdout.strip()


def code_version(configured: str = "") -> CodeVersion:
    """The configured version (containers have no checkout), else the checkout's HEAD.

    Dirty means tracked files under services/ or feature_repo/ differ from the commit: the
    code that trained differs from what the commit names.
    """
    if configured:
        return CodeVersion(configured, False)
    try:
        commit = _git("rev-parse", "HEAD")
        changes = _git(
            "status", "--porcelain", "--untracked-files=no", "--", "services", "feature_repo"
        )
    except (OSError, subprocess.SubprocessError):
        return CodeVersion("unknown", True)
    return CodeVersion(commit, bool(changes))


def environment_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for package in _PACKAGES:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "absent"
    return versions
