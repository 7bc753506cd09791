"""The GPU check's harness (loadtests/gpu_model_check.py) on the CPU: the Triton model file
runs unchanged through it, gives the TorchScript model's own scores for one request or a
dynamic batch of several, refuses a tampered file, and the registry's config lets a GPU
instance receive inputs in GPU memory. The GPU half runs where a GPU is (docs/scaling.md)."""

from __future__ import annotations

import importlib.util
import io
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from services.registry.triton_repository import render_config
from services.shared.settings import PROJECT_ROOT


def _check_module() -> Any:
    path = PROJECT_ROOT / "loadtests" / "gpu_model_check.py"
    spec = importlib.util.spec_from_file_location("gpu_model_check", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_model_check"] = module
    spec.loader.exec_module(module)
    return module


check = _check_module()


def test_the_model_file_gives_the_torchscript_scores_on_the_cpu(tmp_path: Path) -> None:
    payload = check.scripted_model(seed=3)
    check.write_version(tmp_path, payload)
    backend = check.load_backend()
    model = check.model_instance(backend, tmp_path, "CPU")
    assert model.device == torch.device("cpu")
    batch = torch.rand(37, check.N_INPUTS) * 20
    direct = torch.jit.load(io.BytesIO(payload))(batch).reshape(-1, 1)
    for requests in (1, 5):  # one request, or a dynamic batch of five
        scores = check.execute(model, batch, requests=requests)
        assert scores.shape == (37, 1) and scores.dtype == torch.float32
        assert torch.equal(scores, direct)


def test_a_tampered_model_file_is_refused(tmp_path: Path) -> None:
    check.write_version(tmp_path, check.scripted_model())
    (tmp_path / "1" / "model.pt").write_bytes(check.scripted_model(seed=99))
    backend = check.load_backend()
    with pytest.raises(check._ModelError, match="does not match"):
        check.model_instance(backend, tmp_path, "CPU")


def test_cpu_only_run_reports_every_batch_size() -> None:
    result = check.run(cpu_only=True, seconds_per_size=0.02)
    assert [r["batch"] for r in result["rows"]] == list(check.BATCH_SIZES)
    assert all(r["cpu_repeat_max_abs_diff"] == 0.0 for r in result["rows"])
    assert all(r["cpu_rows_per_s"] > 0 for r in result["rows"])
    assert "| 1024 |" in check.report(result)


def test_gpu_instances_take_inputs_in_gpu_memory() -> None:
    gpu = render_config("m", 16, [1], instance_kind="KIND_GPU")
    cpu = render_config("m", 16, [1], instance_kind="KIND_CPU")
    assert 'key: "FORCE_CPU_ONLY_INPUT_TENSORS"' in gpu and 'string_value: "no"' in gpu
    assert "FORCE_CPU_ONLY_INPUT_TENSORS" not in cpu
