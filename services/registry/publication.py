"""Triton's side of a registry change: what its model repository holds and what it serves.

Every file written is the version's TorchScript from MLflow, verified against the sha256 the
version was registered with; every configuration lists the versions Triton must serve, and a
load that Triton refuses restores the previous configuration (the old versions keep serving).
"""

from __future__ import annotations

import json
from collections.abc import Collection

from services.registry.mlflow_store import TAG_FEATURE_NAMES, TAG_SHA256, MlflowModelStore
from services.registry.triton_repository import TritonModelRepository, sha256_hex
from services.shared import run_contract as rc
from services.shared.errors import FailedPrecondition, IntegrityError, Unavailable
from services.shared.logging import get_logger

log = get_logger("registry")


class TritonPublication:
    """The versions of one model in Triton, written and loaded from MLflow."""

    def __init__(
        self, model_name: str, store: MlflowModelStore, triton: TritonModelRepository
    ) -> None:
        self.model_name = model_name
        self.store = store
        self.triton = triton

    def verified_artifact(self, version: int) -> bytes:
        """The version's TorchScript from MLflow, refused unless it matches its sha256."""
        view = self.store.version(self.model_name, version)
        payload = self.store.download(view.run_id, rc.MODEL_ARTIFACT)
        expected = view.tags.get(TAG_SHA256, "")
        actual = sha256_hex(payload)
        if actual != expected:
            raise IntegrityError(
                f"{self.model_name} v{version}: artifact sha256 {actual} does not match "
                f"the registered {expected}; refusing to publish"
            )
        return payload

    def n_inputs(self, versions: Collection[int]) -> int:
        """The model's input width, which every version served together must share."""
        widths = {
            len(
                json.loads(self.store.version(self.model_name, v).tags.get(TAG_FEATURE_NAMES, "[]"))
            )
            for v in versions
        }
        if len(widths) != 1 or 0 in widths:
            raise FailedPrecondition(
                f"served versions disagree on their inputs ({sorted(widths)} features)"
            )
        return widths.pop()

    def serve(self, target: Collection[int], before: Collection[int]) -> list[int]:
        """Make Triton serve exactly ``target`` (files verified, written when missing).

        ``before`` is what Triton serves now; returns the versions of ``target`` not in it.
        """
        wanted = sorted(set(target))
        if (
            set(wanted) == set(before)
            and all(self.triton.verify_version(v) for v in wanted)
            and set(wanted) <= set(self.triton.ready_versions())
        ):
            return []  # e.g. only a traffic share changed: Triton already serves these
        for version in wanted:
            if not self.triton.verify_version(version):
                payload = self.verified_artifact(version)
                self.triton.write_version(version, payload, sha256_hex(payload))
        n_inputs = self.n_inputs(wanted)
        self.triton.write_config(wanted, n_inputs)
        try:
            self.triton.load()
            ready = set(self.triton.ready_versions())
            if not set(wanted) <= ready:
                raise Unavailable(
                    f"Triton serves {sorted(ready)} after loading {wanted} of {self.model_name}"
                )
        except Unavailable:
            if before:  # Triton keeps the old versions serving; keep the files saying so
                self.triton.write_config(sorted(set(before)), n_inputs)
                try:
                    self.triton.load()
                except Unavailable as exc:
                    log.error("config_restore_failed", model=self.model_name, error=str(exc))
            raise
        log.info("triton_serving", model=self.model_name, versions=",".join(map(str, wanted)))
        return [v for v in wanted if v not in set(before)]

    def serve_only(self, keep: list[int], routed: set[int], unloading: Collection[int]) -> None:
        """Unload what is not in ``keep`` (``Unavailable`` unless every ``routed`` version
        still serves afterwards); with nothing to keep, unload everything."""
        if not keep:
            self.triton.unload()
            return
        self.triton.write_config(keep, self.n_inputs(keep))
        self.triton.load()
        ready = set(self.triton.ready_versions())
        if not routed <= ready:
            raise Unavailable(
                f"Triton serves {sorted(ready)} after unloading {sorted(unloading)} of "
                f"{self.model_name}, not all of {sorted(routed)}"
            )

    def reload_failing(self, versions: list[int]) -> list[int]:
        """Reload the model when one of ``versions`` fails a tiny inference (a dead
        Python-backend stub still reports ready); the versions that failed."""
        n_inputs = self.n_inputs(versions)
        failing = [v for v in versions if not self.triton.probe(v, n_inputs)]
        if failing:
            log.warning("triton_reloading", model=self.model_name, versions=failing)
            self.triton.unload()
            self.triton.load()
        return failing
