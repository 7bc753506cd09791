"""What a training run must be to become a version: the checks ``register`` makes before
anything is written (the declared checksum, a finished run whose artifact matches it, the run
contract's feature names and threshold)."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from services.registry.mlflow_store import MlflowModelStore
from services.registry.triton_repository import sha256_hex
from services.shared import run_contract as rc
from services.shared.errors import FailedPrecondition, IntegrityError, InvalidArgument
from services.shared.mlflow_client import RunView

_SHA256 = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class Candidate:
    """A finished training run whose artifact matched its declared sha256."""

    run: RunView
    model: bytes  # the TorchScript file
    sha256: str
    feature_names: list[str]
    threshold: float


def checked_registration(run_id: str, artifact_sha256: str, canary_traffic_percent: int) -> str:
    """The declared sha256, normalised; ``InvalidArgument`` naming what is wrong."""
    if not run_id:
        raise InvalidArgument("run_id", "is required")
    sha = artifact_sha256.strip().lower()
    if not _SHA256.match(sha):
        raise InvalidArgument("artifact_sha256", "must be 64 hexadecimal characters")
    if not 0 <= canary_traffic_percent <= 100:
        raise InvalidArgument("canary_traffic_percent", "must be between 0 and 100")
    return sha


def candidate_of(run: RunView, model: bytes, sha: str) -> Candidate:
    """The run as a candidate: its feature names and threshold come from the run contract."""
    try:
        feature_names = json.loads(run.tags[rc.TAG_FEATURE_NAMES])
        threshold = float(run.tags[rc.TAG_THRESHOLD])
    except (KeyError, ValueError) as exc:
        raise InvalidArgument(
            "run_id", f"run {run.run_id} lacks the model's feature names or threshold tags"
        ) from exc
    return Candidate(run, model, sha, feature_names, threshold)


def verified_run(store: MlflowModelStore, run_id: str, sha: str) -> tuple[bytes, RunView]:
    """The run's model file, refused unless the run finished and the file is ``sha``."""
    run = store.run(run_id)
    if run.status != "FINISHED":
        raise FailedPrecondition(f"run {run_id} is {run.status}, not FINISHED")
    payload = store.download(run_id, rc.MODEL_ARTIFACT)
    actual = sha256_hex(payload)
    recorded = run.tags.get(rc.TAG_MODEL_SHA256, sha)
    if actual != sha or recorded != sha:
        raise IntegrityError(
            f"run {run_id}: model artifact sha256 {actual} does not match the declared "
            f"{sha} (run records {recorded}); refused, nothing registered"
        )
    return payload, run
