"""The routing table derived from aliases, and lineage assembly (pure)."""

from __future__ import annotations

import json
from datetime import UTC, datetime

from services.registry.mlflow_store import VersionView
from services.registry.routing import routing_table
from services.registry.service import assemble_lineage
from services.shared import run_contract as rc
from services.shared.mlflow_client import RunView


def rows(aliases: dict[str, int], tags: dict[int, dict[str, str]]) -> list[tuple]:
    return [
        (s.version, s.alias, s.traffic_percent, s.threshold) for s in routing_table(aliases, tags)
    ]


def test_production_alone_takes_all_traffic() -> None:
    assert rows({"production": 3}, {3: {"threshold": "0.42"}}) == [(3, "production", 100, 0.42)]


def test_a_canary_takes_its_share_from_production() -> None:
    table = rows(
        {"canary": 4, "production": 3},
        {3: {"threshold": "0.4"}, 4: {"threshold": "0.6", "traffic_percent": "20"}},
    )
    assert table == [(3, "production", 80, 0.4), (4, "canary", 20, 0.6)]


def test_a_shadow_mirrors_without_taking_traffic() -> None:
    table = rows(
        {"production": 1, "canary": 2, "shadow": 3},
        {
            1: {"threshold": "0.5"},
            2: {"threshold": "0.5", "traffic_percent": "10"},
            3: {"threshold": "0.5", "traffic_percent": "50"},
        },
    )
    assert [(v, a, p) for v, a, p, _ in table] == [
        (1, "production", 90),
        (2, "canary", 10),
        (3, "shadow", 50),
    ]


def test_no_aliases_no_routing() -> None:
    assert routing_table({}, {}) == []


def test_lineage_follows_version_to_run_to_snapshot_to_code() -> None:
    version = VersionView(
        version=7,
        run_id="run-1",
        source="mlflow-artifacts:/1/run-1/artifacts/model",
        tags={"sha256": "ab" * 32, "feature_names": json.dumps(["a"])},
        aliases=("production",),
        created_at=datetime(2026, 3, 1, tzinfo=UTC),
        description="",
    )
    run = RunView(
        run_id="run-1",
        experiment_id="4",
        status="FINISHED",
        artifact_uri="mlflow-artifacts:/1/run-1/artifacts",
        tags={
            rc.TAG_SNAPSHOT_ID: "snap-1",
            rc.TAG_SNAPSHOT_SHA256: "cd" * 32,
            rc.TAG_FEATURE_SERVICE: "fraud_model_v1",
            rc.TAG_FEATURE_DEFINITIONS_SHA256: "ef" * 32,
            rc.TAG_CODE_COMMIT: "0123abcd" * 5,
            rc.TAG_REQUEST_ID: "req-9",
        },
        params={"seed": "42"},
        metrics={"test_pr_auc": 0.7},
    )
    lineage = assemble_lineage("fraud_detector", version, run)
    assert (lineage.model_name, lineage.version, lineage.run_id) == ("fraud_detector", 7, "run-1")
    assert lineage.experiment_id == "4"
    assert (lineage.dataset_snapshot_id, lineage.dataset_sha256) == ("snap-1", "cd" * 32)
    assert lineage.feature_service == "fraud_model_v1"
    assert lineage.feature_definitions_sha256 == "ef" * 32
    assert lineage.code_commit == "0123abcd" * 5
    assert lineage.artifact_sha256 == "ab" * 32
    assert lineage.training_request_id == "req-9"
    assert dict(lineage.params) == {"seed": "42"} and lineage.metrics["test_pr_auc"] == 0.7


def test_the_routes_go_out_with_role_name_and_shadow_flag() -> None:
    from services.registry.views import routes_message
    from services.shared.proto.mlops.v1 import models_pb2

    table = routing_table(
        {"production": 1, "shadow": 3},
        {1: {"threshold": "0.5"}, 3: {"threshold": "0.7", "traffic_percent": "40"}},
    )
    messages = routes_message(table)
    assert [(m.version, m.role, m.alias, m.traffic_percent, m.shadow) for m in messages] == [
        (1, models_pb2.MODEL_ALIAS_PRODUCTION, "production", 100, False),
        (3, models_pb2.MODEL_ALIAS_SHADOW, "shadow", 40, True),
    ]
