"""Triton Python-backend model: a TorchScript fraud model, on CPU or GPU.

Copied by the registry into each version directory of the model repository, beside
``model.pt`` and ``model.pt.sha256``. It runs inside Triton's Python-backend stub (here and in
NVIDIA's container alike) and imports nothing from the platform.

- The device comes from the instance kind Triton assigns (``KIND_GPU`` -> that GPU), so one
  repository serves CPU here and GPU in production.
- The checksum is verified before loading: a tampered file fails the load, and Triton keeps
  serving the versions it already had.
- Tensors move through DLPack: no numpy round trip, zero-copy on GPU.
- All requests of a dynamic batch run as one forward pass.
"""

import hashlib
import json
from pathlib import Path

import torch
import triton_python_backend_utils as pb_utils
from torch.utils.dlpack import from_dlpack, to_dlpack

INPUT = "features"
OUTPUT = "fraud_probability"


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        parameters = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        threads = int(parameters.get("torch_threads", "1"))
        if threads > 0:
            torch.set_num_threads(threads)
        if args["model_instance_kind"] == "GPU":
            self.device = torch.device(f"cuda:{args['model_instance_device_id']}")
        else:
            self.device = torch.device("cpu")
        version_dir = Path(args["model_repository"]) / args["model_version"]
        model_path = version_dir / "model.pt"
        expected = (version_dir / "model.pt.sha256").read_text().split()[0].strip()
        payload = model_path.read_bytes()
        actual = hashlib.sha256(payload).hexdigest()
        if actual != expected:
            raise pb_utils.TritonModelException(
                f"{model_path} sha256 {actual} does not match the recorded {expected}; "
                "refusing to load"
            )
        self.model = torch.jit.load(str(model_path), map_location=self.device).eval()

    def execute(self, requests):
        inputs = [
            from_dlpack(pb_utils.get_input_tensor_by_name(request, INPUT).to_dlpack())
            for request in requests
        ]
        sizes = [t.shape[0] for t in inputs]
        batch = torch.cat(inputs).to(self.device, dtype=torch.float32)
        with torch.inference_mode():
            scores = self.model(batch).reshape(-1, 1).to(torch.float32)
        responses = []
        for part in torch.split(scores, sizes):
            tensor = pb_utils.Tensor.from_dlpack(OUTPUT, to_dlpack(part.contiguous()))
            responses.append(pb_utils.InferenceResponse(output_tensors=[tensor]))
        return responses
