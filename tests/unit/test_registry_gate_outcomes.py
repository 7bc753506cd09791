"""What the registry does with each gate outcome (no network): a real ModelRegistryService
over an in-memory MLflow store, registering runs whose TorchScript models and held-out sets
are real. Insufficient data leaves the version a candidate (no verdict), a candidate no better
than production is rejected, a clearly better one passes; none of them reaches Triton while
publish_passed_as is 'none'."""

from __future__ import annotations

import io
import json
import warnings
from dataclasses import dataclass, field
from datetime import UTC, datetime

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from pydantic import SecretStr

from services.registry.mlflow_store import VersionView
from services.registry.service import ModelRegistryService
from services.registry.settings import RegistrySettings
from services.registry.triton_repository import sha256_hex
from services.shared import run_contract as rc
from services.shared.errors import NotFound
from services.shared.mlflow_client import RunView
from services.shared.proto.mlops.v1 import models_pb2

MODEL = "fraud_gate_test"
FEATURES = ["a", "b"]
Stage = models_pb2.ModelStage
EventType = models_pb2.ModelEventType


class Scorer(torch.nn.Module):
    """sigmoid(a + use_b * b - 3): only a model that reads ``b`` sees all the signal."""

    def __init__(self, use_b: float) -> None:
        super().__init__()
        self.use_b = use_b

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(x[:, 0:1] + self.use_b * x[:, 1:2] - 3.0)


def torchscript(use_b: float) -> bytes:
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.save(torch.jit.script(Scorer(use_b)), buffer)
    return buffer.getvalue()


def held_out(rows: int, seed: int) -> bytes:
    """Frauds have a higher ``a`` and a higher ``b``."""
    rng = np.random.default_rng(seed)
    labels = (rng.random(rows) < 0.06).astype(np.int8)
    a = 1.0 * labels + rng.normal(0, 0.5, rows)
    b = 1.5 * labels + rng.normal(0, 0.5, rows)
    table = pa.table(
        {
            "a": pa.array(a, pa.float32()),
            "b": pa.array(b, pa.float32()),
            rc.LABEL_COLUMN: pa.array(labels),
        }
    )
    sink = io.BytesIO()
    pq.write_table(table, sink)
    return sink.getvalue()


@dataclass
class MemoryStore:
    """The MLflow store as ``register`` uses it, in memory."""

    artifacts: dict[tuple[str, str], bytes] = field(default_factory=dict)
    runs: dict[str, RunView] = field(default_factory=dict)
    views: dict[int, VersionView] = field(default_factory=dict)
    alias_table: dict[str, int] = field(default_factory=dict)
    history: list[int] = field(default_factory=list)

    def add_run(
        self, run_id: str, model: bytes, test_set: bytes, extra: dict[str, str] | None = None
    ) -> str:
        self.artifacts[(run_id, rc.MODEL_ARTIFACT)] = model
        self.artifacts[(run_id, rc.TEST_SET_ARTIFACT)] = test_set
        tags = {
            rc.TAG_MODEL_SHA256: sha256_hex(model),
            rc.TAG_FEATURE_NAMES: json.dumps(FEATURES),
            rc.TAG_THRESHOLD: "0.3",
            **(extra or {}),
        }
        self.runs[run_id] = RunView(run_id, "1", "FINISHED", f"mem://{run_id}", tags, {}, {})
        return sha256_hex(model)

    def run(self, run_id: str) -> RunView:
        if run_id not in self.runs:
            raise NotFound(run_id)
        return self.runs[run_id]

    def download(self, run_id: str, path: str) -> bytes:
        return self.artifacts[(run_id, path)]

    def ensure_model(self, name: str) -> None:
        pass

    def versions(self, name: str) -> list[VersionView]:
        return [self.version(name, v) for v in sorted(self.views)]

    def version(self, name: str, version: int) -> VersionView:
        if version not in self.views:
            raise NotFound(f"no v{version}")
        view = self.views[version]
        held = tuple(sorted(a for a, v in self.alias_table.items() if v == version))
        return VersionView(
            view.version, view.run_id, "", dict(view.tags), held, view.created_at, ""
        )

    def create_version(
        self, name: str, run: RunView, tags: dict[str, str], description: str
    ) -> VersionView:
        version = len(self.views) + 1
        self.views[version] = VersionView(
            version, run.run_id, "", dict(tags), (), datetime(2026, 3, 1, tzinfo=UTC), description
        )
        return self.version(name, version)

    def set_version_tags(self, name: str, version: int, tags: dict[str, str]) -> None:
        self.views[version].tags.update(tags)  # type: ignore[attr-defined]

    def aliases(self, name: str) -> dict[str, int]:
        return dict(self.alias_table)

    def production_history(self, name: str) -> list[int]:
        return list(self.history)


class UntouchedTriton:
    """Nothing in these scenarios may reach Triton."""

    def __getattr__(self, name: str) -> object:
        if name in ("ready_versions",):
            return lambda: [1]
        raise AssertionError(f"Triton was called: {name}")


@pytest.fixture
def registry() -> tuple[ModelRegistryService, MemoryStore]:
    store = MemoryStore()
    sha = store.add_run("run-prod", torchscript(0.0), held_out(3000, 0))
    store.views[1] = VersionView(
        1,
        "run-prod",
        "",
        {"sha256": sha, "stage": "PRODUCTION", "threshold": "0.3", "feature_names": '["a","b"]'},
        (),
        datetime(2026, 3, 1, tzinfo=UTC),
        "",
    )
    store.alias_table["production"] = 1
    store.history = [1]
    settings = RegistrySettings.model_validate(
        {
            "token": SecretStr("t"),
            "model_name": MODEL,
            "publish_passed_as": "none",
            "gate_resamples": 300,
            "gate_calibration_tolerance": 1.0,
        }
    )
    service = ModelRegistryService(settings, store, UntouchedTriton())  # type: ignore[arg-type]
    return service, store


def test_a_tiny_held_out_set_leaves_the_version_a_candidate_without_a_verdict(
    registry: tuple[ModelRegistryService, MemoryStore],
) -> None:
    service, store = registry
    sha = store.add_run("run-tiny", torchscript(1.0), held_out(120, 1))
    transition = service.register(MODEL, "run-tiny", sha)
    version = transition.version
    assert version.stage == Stage.MODEL_STAGE_CANDIDATE and version.gate is not None
    assert version.gate.outcome == "insufficient_data"
    assert not version.gate.passed and version.gate.rows == 120 and version.gate.test == ""
    assert [e.type for e in transition.events] == [
        EventType.MODEL_EVENT_TYPE_REGISTERED,
        EventType.MODEL_EVENT_TYPE_GATE_REJECTED,
    ]
    assert transition.events[1].gate == version.gate


def test_a_copy_of_production_is_rejected_and_a_better_model_passes(
    registry: tuple[ModelRegistryService, MemoryStore],
) -> None:
    service, store = registry
    same = store.add_run("run-same", torchscript(0.0), held_out(3000, 2))
    rejected = service.register(MODEL, "run-same", same).version
    assert rejected.stage == Stage.MODEL_STAGE_REJECTED and rejected.gate is not None
    assert rejected.gate.outcome == "failed"
    assert rejected.gate.interval_low == rejected.gate.interval_high == 0.0  # same scores
    better = store.add_run("run-better", torchscript(1.0), held_out(3000, 3))
    transition = service.register(MODEL, "run-better", better)
    passed = transition.version
    assert passed.stage == Stage.MODEL_STAGE_CANDIDATE  # awaits the autopilot
    assert passed.gate is not None and passed.gate.outcome == "passed"
    assert 0 < passed.gate.interval_low <= passed.gate.statistic <= passed.gate.interval_high
    assert (passed.gate.rows, passed.gate.resamples) == (3000, 300)
    assert transition.events[-1].type == EventType.MODEL_EVENT_TYPE_GATE_PASSED
    assert transition.events[-1].gate == passed.gate


def test_a_run_that_may_be_one_of_several_tests_is_judged_at_its_share_of_the_error_rate(
    registry: tuple[ModelRegistryService, MemoryStore],
) -> None:
    service, store = registry
    one = store.add_run("run-one", torchscript(1.0), held_out(3000, 3))
    alone = service.register(MODEL, "run-one", one).version.gate
    four = store.add_run("run-four", torchscript(1.0), held_out(3000, 3), {rc.TAG_GATE_TESTS: "4"})
    shared = service.register(MODEL, "run-four", four).version.gate
    assert alone is not None and shared is not None
    assert alone.confidence == pytest.approx(0.95)
    assert shared.confidence == pytest.approx(0.9875)  # 0.05 split over the cycle's 4 tests
    assert shared.interval_low < alone.interval_low and shared.statistic == alone.statistic
