"""Where monitoring finds a production version's drift reference: the version's training run.

The registry keeps versions in MLflow's model registry, each pointing at its training run;
training stored the reference in that run (``services/shared/drift_reference.py``) with its
sha256 in a run tag. ``MlflowReferences.load`` follows version -> run -> artifact, checks the
checksum and returns the reference, or None when the version has none (trained before drift
references existed) or MLflow cannot be reached: monitoring then takes the version's first
live events as its reference, and says so (``reference=warmup`` in /api/v1/drift).
Blocking HTTP: the service calls it off the event loop.
"""

from __future__ import annotations

import urllib.request

from services.shared.drift_reference import (
    REFERENCE_ARTIFACT,
    TAG_REFERENCE_SHA256,
    DriftReference,
)
from services.shared.errors import PlatformError
from services.shared.logging import get_logger
from services.shared.mlflow_client import MlflowConnection
from services.shared.settings import MlflowSettings
from services.shared.usecase.features import MODEL_INPUTS

log = get_logger("monitoring.references")


class MlflowReferences:
    def __init__(self, settings: MlflowSettings) -> None:
        self.settings = settings
        self.mlflow = MlflowConnection(settings)

    def reachable(self) -> bool:
        """MLflow answers /health within 2 s (its client would retry for minutes otherwise)."""
        try:
            with urllib.request.urlopen(f"{self.settings.tracking_uri}/health", timeout=2) as r:
                return bool(r.status == 200)
        except (OSError, ValueError):
            return False

    def load(self, model_name: str, version: int) -> DriftReference | None:
        if not self.reachable():
            error = f"MLflow at {self.settings.tracking_uri} does not answer"
            log.warning(
                "drift_reference_unavailable", model=model_name, version=version, error=error
            )
            return None
        try:
            found = self.mlflow.call(
                f"get version {version} of {model_name}",
                self.mlflow.client.get_model_version,
                model_name,
                str(version),
            )
            run_id = found.run_id or ""
            tags = self.mlflow.run(run_id).tags
            sha256 = tags.get(TAG_REFERENCE_SHA256)
            if not sha256:
                log.warning("drift_reference_missing", model=model_name, version=version,
                            run_id=run_id)  # fmt: skip
                return None
            payload = self.mlflow.download(run_id, REFERENCE_ARTIFACT)
            reference = DriftReference.from_parquet(payload, MODEL_INPUTS, sha256=sha256)
        except PlatformError as exc:  # MLflow's failures, a reference that does not verify
            log.warning("drift_reference_unavailable", model=model_name, version=version,
                        error=str(exc)[:300])  # fmt: skip
            return None
        log.info("drift_reference_loaded", model=model_name, version=version,
                 rows=reference.rows)  # fmt: skip
        return reference
