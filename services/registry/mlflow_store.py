"""The registry's only metadata store: MLflow's model registry (and the runs it points at).

Per version: MLflow model version (source = the run's ``model`` artifact directory) with tags
for the artifact's sha256, stage, gate result (JSON), threshold, feature names and canary/
shadow traffic share. Aliases ``production`` / ``canary`` / ``shadow`` are MLflow aliases. The
production history (for rollback) is a registered-model tag: a JSON list of versions, latest
last. Nothing else is stored anywhere.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any

from services.shared.errors import AlreadyExists
from services.shared.mlflow_client import MlflowConnection, RunView
from services.shared.run_contract import MODEL_ARTIFACT
from services.shared.settings import MlflowSettings

TAG_SHA256 = "sha256"
TAG_STAGE = "stage"
TAG_GATE = "gate"
TAG_THRESHOLD = "threshold"
TAG_FEATURE_NAMES = "feature_names"
TAG_TRAFFIC = "traffic_percent"
TAG_STAGE_REASON = "stage_reason"
MODEL_TAG_PRODUCTION_HISTORY = "production_history"


@dataclass(frozen=True)
class VersionView:
    version: int
    run_id: str
    source: str
    tags: Mapping[str, str]
    aliases: tuple[str, ...]
    created_at: datetime
    description: str


def _version_view(mv: Any) -> VersionView:
    return VersionView(
        version=int(mv.version),
        run_id=mv.run_id or "",
        source=mv.source or "",
        tags=dict(mv.tags or {}),
        aliases=tuple(sorted(mv.aliases or ())),
        created_at=datetime.fromtimestamp((mv.creation_timestamp or 0) / 1000, UTC),
        description=mv.description or "",
    )


class MlflowModelStore:
    """Typed access to the MLflow calls the registry makes (blocking HTTP, through the
    platform's one MLflow adapter)."""

    def __init__(self, settings: MlflowSettings) -> None:
        self.mlflow = MlflowConnection(settings)

    @property
    def client(self) -> Any:
        return self.mlflow.client

    # ---------------------------------------------------------------- runs and artifacts

    def run(self, run_id: str) -> RunView:
        return self.mlflow.run(run_id)

    def download(self, run_id: str, artifact_path: str) -> bytes:
        """An artifact's bytes (downloaded to a temporary directory, read, deleted)."""
        return self.mlflow.download(run_id, artifact_path)

    # ---------------------------------------------------------------- registered model

    def ensure_model(self, name: str) -> None:
        with contextlib.suppress(AlreadyExists):  # it exists: nothing to do
            self.mlflow.call_once(
                f"create model {name}",
                self.client.create_registered_model,
                name,
                description="Managed by the platform's model registry service.",
            )

    def aliases(self, name: str) -> dict[str, int]:
        model = self.mlflow.call(f"get model {name}", self.client.get_registered_model, name)
        return {alias: int(version) for alias, version in (model.aliases or {}).items()}

    def production_history(self, name: str) -> list[int]:
        model = self.mlflow.call(f"get model {name}", self.client.get_registered_model, name)
        raw = (model.tags or {}).get(MODEL_TAG_PRODUCTION_HISTORY, "[]")
        return [int(v) for v in json.loads(raw)]

    def set_production_history(self, name: str, history: list[int]) -> None:
        self.mlflow.call(
            "record the production history",
            self.client.set_registered_model_tag,
            name,
            MODEL_TAG_PRODUCTION_HISTORY,
            json.dumps(history),
        )

    def set_alias(self, name: str, alias: str, version: int) -> None:
        self.mlflow.call(
            f"set alias {alias}", self.client.set_registered_model_alias, name, alias, version
        )

    def delete_alias(self, name: str, alias: str) -> None:
        self.mlflow.call(
            f"delete alias {alias}", self.client.delete_registered_model_alias, name, alias
        )

    # ---------------------------------------------------------------- versions

    def create_version(
        self, name: str, run: RunView, tags: Mapping[str, str], description: str
    ) -> VersionView:
        source = f"{run.artifact_uri}/{MODEL_ARTIFACT.rsplit('/', 1)[0]}"
        mv = self.mlflow.call_once(
            f"create a version of {name}",
            self.client.create_model_version,
            name,
            source,
            run_id=run.run_id,
            tags=dict(tags),
            description=description or None,
        )
        return _version_view(mv)

    def version(self, name: str, version: int) -> VersionView:
        mv = self.mlflow.call(
            f"get version {version} of {name}", self.client.get_model_version, name, str(version)
        )
        return _version_view(mv)

    def version_by_alias(self, name: str, alias: str) -> VersionView:
        mv = self.mlflow.call(
            f"find alias {alias!r} of {name}", self.client.get_model_version_by_alias, name, alias
        )
        return _version_view(mv)

    def versions(self, name: str) -> list[VersionView]:
        # search results carry no aliases: attach them from the registered model
        found = self.mlflow.call(
            f"list versions of {name}",
            self.client.search_model_versions,
            f"name = '{name}'",
            max_results=10_000,
        )
        by_version: dict[int, list[str]] = {}
        for alias, version in self.aliases(name).items():
            by_version.setdefault(version, []).append(alias)
        views = [_version_view(mv) for mv in found]
        views = [replace(v, aliases=tuple(sorted(by_version.get(v.version, [])))) for v in views]
        return sorted(views, key=lambda v: v.version)

    def set_version_tags(self, name: str, version: int, tags: Mapping[str, str]) -> None:
        for key, value in tags.items():
            self.mlflow.call(
                f"tag version {version}",
                self.client.set_model_version_tag,
                name,
                str(version),
                key,
                value,
            )
