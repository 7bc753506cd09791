"""Triton's model repository: the registry's publishing target.

Layout (the same here and in NVIDIA's Triton container on a GPU)::

    <repository>/<model>/config.pbtxt          python backend, dynamic batching, the versions served
    <repository>/<model>/<version>/model.py     the backend (services/registry/triton_backend)
    <repository>/<model>/<version>/model.pt     TorchScript
    <repository>/<model>/<version>/model.pt.sha256

Versions are written atomically (a temporary directory renamed into place) after their
checksum is verified; ``config.pbtxt``'s ``version_policy`` lists exactly the versions Triton
must serve (production, canary, shadow, and versions in the grace period after a switch), and
``load`` asks Triton (explicit model control) to apply it. Triton keeps serving the old versions
until the new set is ready.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from services.shared.errors import IntegrityError, Unavailable
from services.shared.logging import get_logger
from services.shared.settings import TritonSettings
from services.shared.usecase.features import TRITON_INPUT, TRITON_OUTPUT

log = get_logger("registry.triton")

BACKEND_SOURCE = Path(__file__).with_name("triton_backend") / "model.py"
MODEL_FILE = "model.pt"


def sha256_hex(payload: bytes) -> str:
    return hashlib.sha256(payload).hexdigest()


def render_config(
    model_name: str,
    n_inputs: int,
    versions: list[int],
    *,
    instance_kind: str,
    max_batch_size: int = 1024,
    max_queue_delay_us: int = 500,
    instance_count: int = 1,
    torch_threads: int = 1,
) -> str:
    served = ", ".join(str(v) for v in sorted(set(versions)))
    # on a GPU instance Triton may hand inputs over in GPU memory (the model takes them by
    # DLPack, no copy through the host); by default the Python backend copies them to the CPU
    gpu_inputs = (
        """
parameters: {
  key: "FORCE_CPU_ONLY_INPUT_TENSORS"
  value: { string_value: "no" }
}"""
        if instance_kind == "KIND_GPU"
        else ""
    )
    return f"""name: "{model_name}"
backend: "python"
max_batch_size: {max_batch_size}
input [
  {{
    name: "{TRITON_INPUT}"
    data_type: TYPE_FP32
    dims: [ {n_inputs} ]
  }}
]
output [
  {{
    name: "{TRITON_OUTPUT}"
    data_type: TYPE_FP32
    dims: [ 1 ]
  }}
]
dynamic_batching {{
  max_queue_delay_microseconds: {max_queue_delay_us}
}}
instance_group [
  {{
    count: {instance_count}
    kind: {instance_kind}
  }}
]
version_policy: {{ specific: {{ versions: [ {served} ] }} }}
parameters: {{
  key: "torch_threads"
  value: {{ string_value: "{torch_threads}" }}
}}{gpu_inputs}
"""


class TritonModelRepository:
    """One model's directory in Triton's repository, and Triton's model control for it."""

    def __init__(self, settings: TritonSettings, model_name: str) -> None:
        self.settings = settings
        self.model_name = model_name
        self.model_dir = settings.model_repository / model_name

    def version_dir(self, version: int) -> Path:
        return self.model_dir / str(version)

    def has_version(self, version: int) -> bool:
        return (self.version_dir(version) / MODEL_FILE).exists()

    def write_version(self, version: int, torchscript: bytes, sha256: str) -> Path:
        """Write a version's files after checking ``sha256``; refuses a mismatch."""
        actual = sha256_hex(torchscript)
        if actual != sha256:
            raise IntegrityError(
                f"model {self.model_name} v{version}: artifact sha256 {actual} does not match "
                f"the registered {sha256}; refusing to publish"
            )
        target = self.version_dir(version)
        if target.exists() and self.verify_version(version):
            return target
        self.model_dir.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{version}-", dir=self.model_dir))
        (staging / MODEL_FILE).write_bytes(torchscript)
        (staging / f"{MODEL_FILE}.sha256").write_text(f"{sha256}  {MODEL_FILE}\n")
        shutil.copyfile(BACKEND_SOURCE, staging / "model.py")
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
        log.info("version_written", model=self.model_name, version=version, sha256=sha256)
        return target

    def verify_version(self, version: int) -> bool:
        directory = self.version_dir(version)
        try:
            recorded = (directory / f"{MODEL_FILE}.sha256").read_text().split()[0]
            return sha256_hex((directory / MODEL_FILE).read_bytes()) == recorded
        except (OSError, IndexError):
            return False

    def write_config(self, versions: list[int], n_inputs: int) -> None:
        if not versions:
            raise ValueError("Triton must serve at least one version")
        text = render_config(
            self.model_name, n_inputs, versions, instance_kind=self.settings.instance_kind
        )
        self.model_dir.mkdir(parents=True, exist_ok=True)
        staging = self.model_dir / ".config.pbtxt.tmp"
        staging.write_text(text)
        os.replace(staging, self.model_dir / "config.pbtxt")

    def load(self) -> None:
        """Ask Triton to (re)load the model with the versions in config.pbtxt."""
        import tritonclient.grpc as grpcclient
        from tritonclient.utils import InferenceServerException

        client = grpcclient.InferenceServerClient(self.settings.grpc_url)
        try:
            client.load_model(self.model_name)
        except InferenceServerException as exc:
            raise Unavailable(f"Triton could not load {self.model_name}: {exc}") from exc
        finally:
            client.close()
        log.info("model_loaded", model=self.model_name)

    def ready_versions(self) -> list[int]:
        import tritonclient.grpc as grpcclient
        from tritonclient.utils import InferenceServerException

        client = grpcclient.InferenceServerClient(self.settings.grpc_url)
        try:
            index = client.get_model_repository_index(as_json=True)
        except InferenceServerException as exc:
            raise Unavailable(f"Triton unreachable: {exc}") from exc
        finally:
            client.close()
        return sorted(
            int(m["version"])
            for m in index.get("models", [])
            if m.get("name") == self.model_name and m.get("state") == "READY" and m.get("version")
        )

    def unload(self) -> None:
        import tritonclient.grpc as grpcclient
        from tritonclient.utils import InferenceServerException

        client = grpcclient.InferenceServerClient(self.settings.grpc_url)
        try:
            client.unload_model(self.model_name)
        except InferenceServerException as exc:
            raise Unavailable(f"Triton could not unload {self.model_name}: {exc}") from exc
        finally:
            client.close()
        log.info("model_unloaded", model=self.model_name)

    def infer(self, version: int, features: np.ndarray, timeout_s: float = 10.0) -> np.ndarray:
        """Fraud probabilities from one served version (probes and checks use it)."""
        import tritonclient.grpc as grpcclient
        from tritonclient.utils import InferenceServerException

        batch = np.ascontiguousarray(features, dtype=np.float32)
        tensor = grpcclient.InferInput(TRITON_INPUT, list(batch.shape), "FP32")
        tensor.set_data_from_numpy(batch)
        client = grpcclient.InferenceServerClient(self.settings.grpc_url)
        try:
            result = client.infer(
                self.model_name,
                [tensor],
                model_version=str(version),
                outputs=[grpcclient.InferRequestedOutput(TRITON_OUTPUT)],
                client_timeout=timeout_s,
            )
        except InferenceServerException as exc:
            raise Unavailable(f"Triton {self.model_name} v{version} failed: {exc}") from exc
        finally:
            client.close()
        output = result.as_numpy(TRITON_OUTPUT)
        if output is None:
            raise Unavailable(f"Triton {self.model_name} v{version} returned no output")
        return np.asarray(output).reshape(-1)

    def probe(self, version: int, n_inputs: int) -> bool:
        """A tiny inference: a dead Python-backend stub still reports ready, this does not."""
        try:
            output = self.infer(version, np.zeros((1, n_inputs), dtype=np.float32))
        except Unavailable as exc:
            log.warning("probe_failed", model=self.model_name, version=version, error=str(exc))
            return False
        return bool(output.shape == (1,) and np.isfinite(output).all())
