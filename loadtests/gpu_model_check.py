"""The Triton Python-backend model (services/registry/triton_backend/model.py) on a GPU against
the same model on the CPU: same inputs, the difference of the scores, and the throughput of
the execute path at batch sizes 1 to 1,024.

For a machine with a CUDA GPU and PyTorch but no Triton server (the check docs/scaling.md
describes). The model file runs unchanged: ``triton_python_backend_utils``, which only
Triton's Python-backend stub provides, is replaced by a small in-process stand-in with the
same calls the model makes (``Tensor.from_dlpack/to_dlpack``, ``get_input_tensor_by_name``,
``InferenceResponse``). Inputs are handed to the GPU instance as CUDA tensors through DLPack,
as Triton does with ``FORCE_CPU_ONLY_INPUT_TENSORS: no`` (the registry's config for
KIND_GPU), and the check records whether any input or output went through host memory.

    python loadtests/gpu_model_check.py                # GPU vs CPU; writes $OUT/gpu_model_check.md
    python loadtests/gpu_model_check.py --cpu-only     # the CPU path alone (machines without GPU)

Needs only torch and the standard library. tests/unit/test_gpu_model_check.py runs the CPU
path in CI.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import io
import json
import os
import statistics
import sys
import tempfile
import time
import types
from pathlib import Path
from typing import Any

import torch
from torch.utils.dlpack import from_dlpack, to_dlpack

ROOT = Path(__file__).resolve().parents[1]
BACKEND = ROOT / "services" / "registry" / "triton_backend" / "model.py"
N_INPUTS = 16  # len(MODEL_INPUTS) of the use case
BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
TOLERANCE = 1e-5  # float32 on a different device: summation order may differ


# ----------------------------------------------------------------------------- the stand-in


class _Tensor:
    """What the model uses of ``pb_utils.Tensor``; remembers the devices it saw."""

    devices_seen: list[str] = []  # shared record of the whole run

    def __init__(self, name: str, value: torch.Tensor) -> None:
        self.name = name
        self.value = value

    def to_dlpack(self) -> Any:
        _Tensor.devices_seen.append(str(self.value.device))
        return to_dlpack(self.value)

    @classmethod
    def from_dlpack(cls, name: str, capsule: Any) -> _Tensor:
        value = from_dlpack(capsule)
        cls.devices_seen.append(str(value.device))
        return cls(name, value)


class _Request:
    def __init__(self, tensors: list[_Tensor]) -> None:
        self.tensors = {t.name: t for t in tensors}


class _Response:
    def __init__(self, output_tensors: list[_Tensor]) -> None:
        self.output_tensors = output_tensors


class _ModelError(Exception):
    pass


def _stand_in() -> types.ModuleType:
    module = types.ModuleType("triton_python_backend_utils")
    module.Tensor = _Tensor  # type: ignore[attr-defined]
    module.InferenceResponse = _Response  # type: ignore[attr-defined]
    module.TritonModelException = _ModelError  # type: ignore[attr-defined]
    module.get_input_tensor_by_name = (  # type: ignore[attr-defined]
        lambda request, name: request.tensors[name]
    )
    return module


def load_backend() -> Any:
    """model.py as Triton's stub would import it (with the stand-in as pb_utils)."""
    sys.modules["triton_python_backend_utils"] = _stand_in()
    spec = importlib.util.spec_from_file_location("mlops_triton_backend_model", BACKEND)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ----------------------------------------------------------------------------- the model


def scripted_model(seed: int = 7) -> bytes:
    """A TorchScript model shaped like the use case's FraudMLP (normalise, 64-32 MLP,
    sigmoid), with random weights: the check compares devices, not model quality."""
    torch.manual_seed(seed)

    class Mlp(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("mean", torch.rand(N_INPUTS) * 10)
            self.register_buffer("std", torch.rand(N_INPUTS) + 0.5)
            self.net = torch.nn.Sequential(
                torch.nn.Linear(N_INPUTS, 64),
                torch.nn.ReLU(),
                torch.nn.Linear(64, 32),
                torch.nn.ReLU(),
                torch.nn.Linear(32, 1),
            )

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.sigmoid(self.net((x - self.mean) / self.std))

    buffer = io.BytesIO()
    torch.jit.save(torch.jit.script(Mlp().eval()), buffer)
    return buffer.getvalue()


def model_instance(backend: Any, repository: Path, kind: str, device_id: int = 0) -> Any:
    """An initialized TritonPythonModel, as Triton creates one per instance."""
    model = backend.TritonPythonModel()
    config = {"parameters": {"torch_threads": {"string_value": "1"}}}
    model.initialize(
        {
            "model_config": json.dumps(config),
            "model_instance_kind": kind,
            "model_instance_device_id": str(device_id),
            "model_repository": str(repository),
            "model_version": "1",
        }
    )
    return model


def write_version(repository: Path, payload: bytes) -> None:
    version = repository / "1"
    version.mkdir(parents=True, exist_ok=True)
    (version / "model.pt").write_bytes(payload)
    digest = hashlib.sha256(payload).hexdigest()
    (version / "model.pt.sha256").write_text(f"{digest}  model.pt\n")


def execute(model: Any, batch: torch.Tensor, requests: int = 1) -> torch.Tensor:
    """One execute call with ``batch`` split over ``requests`` requests (a dynamic batch)."""
    parts = torch.tensor_split(batch, requests)
    responses = model.execute([_Request([_Tensor("features", p)]) for p in parts if len(p)])
    return torch.cat([r.output_tensors[0].value for r in responses])


def _throughput(model: Any, batch: torch.Tensor, cuda: bool, seconds: float) -> float:
    """Rows per second of the execute path, median of 5 timed rounds."""
    for _ in range(3):
        execute(model, batch)  # warm-up (CUDA kernels, allocator)
    rates = []
    for _ in range(5):
        if cuda:
            torch.cuda.synchronize()
        calls, started = 0, time.perf_counter()
        while time.perf_counter() - started < seconds / 5:
            execute(model, batch)
            calls += 1
        if cuda:
            torch.cuda.synchronize()
        rates.append(calls * len(batch) / (time.perf_counter() - started))
    return statistics.median(rates)


def run(cpu_only: bool, seconds_per_size: float = 0.5) -> dict[str, Any]:
    backend = load_backend()
    with tempfile.TemporaryDirectory() as directory:
        repository = Path(directory)
        write_version(repository, scripted_model())
        cpu = model_instance(backend, repository, "CPU")
        use_gpu = not cpu_only
        if use_gpu and not torch.cuda.is_available():
            raise SystemExit("no CUDA device: run with --cpu-only, or on a GPU machine")
        gpu = model_instance(backend, repository, "GPU", 0) if use_gpu else None
        generator = torch.Generator().manual_seed(0)
        rows = []
        for size in BATCH_SIZES:
            batch = torch.rand(size, N_INPUTS, generator=generator) * 20
            _Tensor.devices_seen.clear()
            reference = execute(cpu, batch, requests=min(size, 4))
            row: dict[str, Any] = {
                "batch": size,
                "cpu_rows_per_s": _throughput(cpu, batch, False, seconds_per_size),
            }
            # the model against itself on the same device: execute is deterministic
            row["cpu_repeat_max_abs_diff"] = float(
                (execute(cpu, batch, requests=1) - reference).abs().max()
            )
            if gpu is not None:
                on_device = batch.to("cuda:0")
                _Tensor.devices_seen.clear()
                scores = execute(gpu, on_device, requests=min(size, 4))
                torch.cuda.synchronize()
                row["gpu_output_device"] = str(scores.device)
                row["host_copies"] = sum(d == "cpu" for d in _Tensor.devices_seen)
                row["max_abs_diff"] = float((scores.cpu() - reference).abs().max())
                row["gpu_rows_per_s"] = _throughput(gpu, on_device, True, seconds_per_size)
            rows.append(row)
    return {
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name(0) if not cpu_only else "cpu only",
        "rows": rows,
    }


def report(result: dict[str, Any]) -> str:
    gpu = "gpu_rows_per_s" in result["rows"][0]
    lines = [
        "## Triton Python-backend model: GPU vs CPU",
        "",
        f"torch {result['torch']}, device: {result['device']}; execute path of "
        "services/registry/triton_backend/model.py, inputs as CUDA tensors through DLPack; "
        f"tolerance {TOLERANCE:g} (max absolute difference of the scores).",
        "",
    ]
    if gpu:
        lines += [
            "| batch | max abs diff GPU vs CPU | host copies | CPU rows/s | GPU rows/s | GPU/CPU |",
            "|---:|---:|---:|---:|---:|---:|",
        ]
        for r in result["rows"]:
            lines.append(
                f"| {r['batch']} | {r['max_abs_diff']:.2e} | {r['host_copies']} | "
                f"{r['cpu_rows_per_s']:,.0f} | {r['gpu_rows_per_s']:,.0f} | "
                f"{r['gpu_rows_per_s'] / r['cpu_rows_per_s']:.2f} |"
            )
    else:
        lines += ["| batch | CPU rows/s |", "|---:|---:|"]
        lines += [f"| {r['batch']} | {r['cpu_rows_per_s']:,.0f} |" for r in result["rows"]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cpu-only", action="store_true", help="no GPU: the CPU path alone")
    parser.add_argument(
        "--seconds", type=float, default=0.5, help="timed seconds per batch size and device"
    )
    args = parser.parse_args(argv)
    result = run(args.cpu_only, args.seconds)
    text = report(result)
    print(text)
    out = os.environ.get("OUT")
    if out:
        Path(out, "gpu_model_check.md").write_text(text)
        Path(out, "gpu_model_check.json").write_text(json.dumps(result, indent=2))
    failures = [
        r["batch"]
        for r in result["rows"]
        if r.get("max_abs_diff", 0.0) > TOLERANCE
        or r.get("host_copies", 0) > 0
        or r["cpu_repeat_max_abs_diff"] > 0
    ]
    if failures:
        print(f"FAILED at batch sizes {failures}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
