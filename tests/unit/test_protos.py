"""The generated protobuf code is what protos/ generates (`make protos`), and the check that
says so really fails on stale or edited code."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

from services.shared.settings import PROJECT_ROOT

GENERATE = PROJECT_ROOT / "protos" / "generate.py"


@pytest.fixture(scope="module")
def generate() -> ModuleType:
    spec = importlib.util.spec_from_file_location("protos_generate", GENERATE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def fresh(generate: ModuleType, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("fresh") / "proto"
    generate.generate(out)
    return out


def test_committed_generated_code_is_up_to_date() -> None:
    result = subprocess.run(
        [sys.executable, str(GENERATE), "--check"],
        capture_output=True,
        text=True,
        check=False,
        cwd=PROJECT_ROOT,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "up to date" in result.stdout


def test_every_message_of_the_contract_is_generated(fresh: Path) -> None:
    events = (fresh / "mlops" / "v1" / "events_pb2.pyi").read_text()
    monitoring = (fresh / "mlops" / "v1" / "monitoring_pb2.pyi").read_text()
    models = (fresh / "mlops" / "v1" / "models_pb2.pyi").read_text()
    for name in ("Transaction", "Label", "ValidatedTransaction"):
        assert f"class {name}(" in events
    for name in ("PredictionRecord", "DriftEvent", "RetrainRequest"):
        assert f"class {name}(" in monitoring
    assert "class ModelEvent(" in models
    assert "class PredictorStub" in (fresh / "mlops/v1/predictor_pb2_grpc.pyi").read_text()
    assert "class ModelRegistryStub" in (fresh / "mlops/v1/registry_pb2_grpc.pyi").read_text()


def test_the_check_finds_an_edited_generated_file(
    generate: ModuleType, fresh: Path, tmp_path: Path
) -> None:
    committed = tmp_path / "proto"
    shutil.copytree(fresh, committed)
    assert generate._differences(committed, fresh) == []

    edited = committed / "mlops" / "v1" / "events_pb2.py"
    edited.write_text(edited.read_text() + "\n# edited by hand\n")
    (committed / "mlops" / "v1" / "monitoring_pb2.pyi").unlink()
    differences = generate._differences(committed, fresh)
    assert "mlops/v1/differs: events_pb2.py" in differences
    assert "mlops/v1/missing from committed: monitoring_pb2.pyi" in differences
