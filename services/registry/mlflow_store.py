"""The registry's only metadata store: MLflow's model registry (and the runs it points at).

Per version: MLflow model version (source = the run's ``model`` artifact directory) with tags
for the artifact's sha256, stage, gate result (JSON), threshold, feature names and canary/
shadow traffic share. Aliases ``production`` / ``canary`` / ``shadow`` are MLflow aliases. The
production history (for rollback) is a registered-model tag: a JSON list of versions, latest
last. Nothing else is stored anywhere.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from services.registry.run_contract import MODEL_ARTIFACT
from services.shared.errors import NotFound, Unavailable
from services.shared.settings import MlflowSettings

if TYPE_CHECKING:
    from mlflow import MlflowClient

TAG_SHA256 = "sha256"
TAG_STAGE = "stage"
TAG_GATE = "gate"
TAG_THRESHOLD = "threshold"
TAG_FEATURE_NAMES = "feature_names"
TAG_TRAFFIC = "traffic_percent"
TAG_STAGE_REASON = "stage_reason"
MODEL_TAG_PRODUCTION_HISTORY = "production_history"


@dataclass(frozen=True)
class RunView:
    run_id: str
    experiment_id: str
    status: str
    artifact_uri: str
    tags: Mapping[str, str]
    params: Mapping[str, str]
    metrics: Mapping[str, float]


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
    """Thin, typed access to the MLflow calls the registry makes (blocking HTTP)."""

    def __init__(self, settings: MlflowSettings) -> None:
        self.settings = settings
        self._client: MlflowClient | None = None

    @property
    def client(self) -> MlflowClient:
        if self._client is None:
            from mlflow import MlflowClient

            self._client = MlflowClient(
                tracking_uri=self.settings.tracking_uri, registry_uri=self.settings.tracking_uri
            )
        return self._client

    def _call(self, what: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        from mlflow.exceptions import MlflowException, RestException

        try:
            return fn(*args, **kwargs)
        except RestException as exc:
            if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "NOT_FOUND"):
                raise NotFound(f"{what}: {exc.message}") from exc
            if exc.error_code == "INVALID_PARAMETER_VALUE" and "not found" in exc.message.lower():
                raise NotFound(f"{what}: {exc.message}") from exc
            raise Unavailable(f"MLflow failed to {what}: {exc.message}") from exc
        except MlflowException as exc:
            raise Unavailable(f"MLflow failed to {what}: {exc.message}") from exc

    # ---------------------------------------------------------------- runs and artifacts

    def run(self, run_id: str) -> RunView:
        run = self._call(f"get run {run_id}", self.client.get_run, run_id)
        return RunView(
            run_id=run.info.run_id,
            experiment_id=run.info.experiment_id,
            status=run.info.status,
            artifact_uri=run.info.artifact_uri,
            tags=dict(run.data.tags),
            params=dict(run.data.params),
            metrics=dict(run.data.metrics),
        )

    def download(self, run_id: str, artifact_path: str) -> bytes:
        """An artifact's bytes (downloaded to a temporary directory, read, deleted)."""
        with tempfile.TemporaryDirectory(prefix="mlops-registry-") as tmp:
            local = self._call(
                f"download {artifact_path} of run {run_id}",
                self.client.download_artifacts,
                run_id,
                artifact_path,
                tmp,
            )
            return Path(local).read_bytes()

    # ---------------------------------------------------------------- registered model

    def ensure_model(self, name: str) -> None:
        from mlflow.exceptions import MlflowException

        try:
            self.client.get_registered_model(name)
        except MlflowException:
            try:
                self.client.create_registered_model(
                    name, description="Managed by the platform's model registry service."
                )
            except MlflowException as exc:
                if "already exists" not in exc.message.lower():
                    raise Unavailable(f"MLflow failed to create model {name}: {exc}") from exc

    def aliases(self, name: str) -> dict[str, int]:
        model = self._call(f"get model {name}", self.client.get_registered_model, name)
        return {alias: int(version) for alias, version in (model.aliases or {}).items()}

    def production_history(self, name: str) -> list[int]:
        model = self._call(f"get model {name}", self.client.get_registered_model, name)
        raw = (model.tags or {}).get(MODEL_TAG_PRODUCTION_HISTORY, "[]")
        return [int(v) for v in json.loads(raw)]

    def set_production_history(self, name: str, history: list[int]) -> None:
        self._call(
            "record the production history",
            self.client.set_registered_model_tag,
            name,
            MODEL_TAG_PRODUCTION_HISTORY,
            json.dumps(history),
        )

    def set_alias(self, name: str, alias: str, version: int) -> None:
        self._call(
            f"set alias {alias}", self.client.set_registered_model_alias, name, alias, version
        )

    def delete_alias(self, name: str, alias: str) -> None:
        self._call(f"delete alias {alias}", self.client.delete_registered_model_alias, name, alias)

    # ---------------------------------------------------------------- versions

    def create_version(
        self, name: str, run: RunView, tags: Mapping[str, str], description: str
    ) -> VersionView:
        source = f"{run.artifact_uri}/{MODEL_ARTIFACT.rsplit('/', 1)[0]}"
        mv = self._call(
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
        mv = self._call(
            f"get version {version} of {name}", self.client.get_model_version, name, str(version)
        )
        return _version_view(mv)

    def version_by_alias(self, name: str, alias: str) -> VersionView:
        mv = self._call(
            f"find alias {alias!r} of {name}", self.client.get_model_version_by_alias, name, alias
        )
        return _version_view(mv)

    def versions(self, name: str) -> list[VersionView]:
        # search results carry no aliases (LOCAL_INFRA.md): attach them from the model
        found = self._call(
            f"list versions of {name}",
            self.client.search_model_versions,
            f"name = '{name}'",
            max_results=10_000,
        )
        by_version: dict[int, list[str]] = {}
        for alias, version in self.aliases(name).items():
            by_version.setdefault(version, []).append(alias)
        views = []
        for mv in found:
            view = _version_view(mv)
            views.append(
                VersionView(
                    view.version,
                    view.run_id,
                    view.source,
                    view.tags,
                    tuple(sorted(by_version.get(view.version, []))),
                    view.created_at,
                    view.description,
                )
            )
        return sorted(views, key=lambda v: v.version)

    def set_version_tags(self, name: str, version: int, tags: Mapping[str, str]) -> None:
        for key, value in tags.items():
            self._call(
                f"tag version {version}",
                self.client.set_model_version_tag,
                name,
                str(version),
                key,
                value,
            )
