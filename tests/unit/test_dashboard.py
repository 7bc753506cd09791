"""The operator board's logic without a network: Prometheus, monitoring and the autopilot are
answered by httpx.MockTransport (their JSON contracts), the registry by a fake source; the HTTP
transport through FastAPI's TestClient."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from services.dashboard.app import create_app
from services.dashboard.board import OperatorBoard, chart_specs
from services.dashboard.events import PlatformEvents
from services.dashboard.sources import JsonApi, PrometheusSource
from services.shared.errors import PermissionDenied, Unavailable
from services.shared.proto.mlops.v1 import models_pb2, monitoring_pb2
from services.shared.settings import KafkaSettings, RegistryClientSettings

NOW = 1_800_000_000.0


class FakeRegistry:
    settings = RegistryClientSettings(address="registry:1")
    model_name = "fraud_detector"

    def __init__(self, versions: list[models_pb2.ModelVersion] | None = None) -> None:
        self._versions = versions
        self.rollbacks: list[tuple[str, str]] = []

    async def versions(self) -> list[models_pb2.ModelVersion]:
        if self._versions is None:
            raise Unavailable("registry at registry:1: connection refused")
        return self._versions

    async def rollback(self, token: str, reason: str, actor: str) -> models_pb2.ModelVersion:
        if token != "right":
            raise PermissionDenied("wrong token")
        self.rollbacks.append((token, reason))
        return models_pb2.ModelVersion(version=1, stage=models_pb2.MODEL_STAGE_PRODUCTION)


def _prometheus(request: httpx.Request) -> httpx.Response:
    query = request.url.params.get("query", "")
    if "mlops_serving_predictions_total" in query and "route!=" not in query:
        if request.url.path.endswith("query_range"):
            start = float(request.url.params["start"])
            values = [[start + 5 * i, "2.5"] for i in range(3)] + [[start + 15, "NaN"]]
            result = [{"metric": {"route": "production"}, "values": values}]
            return httpx.Response(200, json={"status": "success", "data": {"result": result}})
        vector = [{"metric": {"model_version": "3"}, "value": [NOW, "4.25"]}]
        return httpx.Response(
            200, json={"status": "success", "data": {"resultType": "vector", "result": vector}}
        )
    if "nv_inference" in query:
        return httpx.Response(
            400, json={"status": "error", "errorType": "bad_data", "error": "parse error"}
        )
    return httpx.Response(
        200, json={"status": "success", "data": {"resultType": "matrix", "result": []}}
    )


def _apis(request: httpx.Request) -> httpx.Response:
    if request.url.port == 9107 and request.url.path == "/api/v1/loop":
        return httpx.Response(
            200,
            json={
                "state": "canary",
                "cycle": {
                    "cycle_id": "c2",
                    "trigger": "drift",
                    "steps": [
                        {
                            "phase": "canary",
                            "at": "2026-01-01T10:05:00+00:00",
                            "summary": "v3 takes 10 %",
                            "evidence": {"traffic_percent": 10},
                        }
                    ],
                },
                "events": [
                    {
                        "kind": "paused",
                        "at": "2026-01-01T09:00:00+00:00",
                        "actor": "ann",
                        "reason": "x",
                    }
                ],
            },
        )
    if request.url.port == 9107 and request.url.path == "/api/v1/loop/history":
        return httpx.Response(
            200,
            json=[
                {
                    "cycle_id": "c1",
                    "trigger": "schedule",
                    "steps": [
                        {
                            "phase": "rolled_back",
                            "at": "2026-01-01T08:00:00+00:00",
                            "summary": "worse PR-AUC",
                            "evidence": {"pr_auc": [0.41, 0.52]},
                        }
                    ],
                }
            ],
        )
    if request.url.port == 9107 and request.url.path == "/api/v1/loop/pause":
        assert request.headers["authorization"] == "Bearer right"
        return httpx.Response(200, json={"state": "paused"})
    return httpx.Response(404, text="Not Found")


def _board(
    registry: FakeRegistry | None = None, *, apis: Any = _apis
) -> tuple[OperatorBoard, PlatformEvents]:
    prometheus = httpx.AsyncClient(transport=httpx.MockTransport(_prometheus))
    http = httpx.AsyncClient(transport=httpx.MockTransport(apis))
    events = PlatformEvents(KafkaSettings(), keep=10)
    board = OperatorBoard(
        PrometheusSource(prometheus, "http://prometheus:9090"),
        JsonApi(http, "http://monitoring:9106", "monitoring"),
        JsonApi(http, "http://autopilot:9107", "autopilot"),
        registry or FakeRegistry(),  # type: ignore[arg-type]
        events,
        clock=lambda: NOW,
    )
    return board, events


def test_a_chart_with_data_is_drawn_and_one_without_says_why() -> None:
    board, _ = _board()
    snapshot = asyncio.run(board.snapshot())
    charts = {c.id: c for c in snapshot.charts}
    rate = charts["predict_rate"]
    assert rate.status == "ok" and rate.series[0].name == "production"
    assert rate.series[0].y == [2.5, 2.5, 2.5, None]  # NaN is a gap, not a zero
    # points on the step grid, so an unchanged series is an unchanged chart
    assert all(t % 5 == 0 for t in rate.series[0].t)
    assert charts["dead_letters"].status == "empty"
    assert charts["dead_letters"].message == "no dead letter so far: every event was valid"
    assert charts["triton_time"].status == "waiting"
    assert "parse error" in charts["triton_time"].message
    assert len(snapshot.charts) == len(chart_specs("1m"))


def test_panels_of_missing_sources_say_what_they_wait_for() -> None:
    board, _ = _board(apis=lambda request: httpx.Response(404, text="Not Found"))
    snapshot = asyncio.run(board.snapshot())
    assert snapshot.models.status == "waiting"
    assert "registry:1" in snapshot.models.message
    assert snapshot.quality.status == "waiting"
    assert "GET http://monitoring:9106/api/v1/quality" in snapshot.quality.message
    assert snapshot.drift.status == "waiting" and "/api/v1/drift" in snapshot.drift.message
    assert snapshot.loop.status == "waiting" and "/api/v1/loop" in snapshot.loop.message


def test_versions_show_stage_traffic_and_observed_answers() -> None:
    versions = [
        models_pb2.ModelVersion(
            version=2, stage=models_pb2.MODEL_STAGE_PRODUCTION, aliases=["production"]
        ),
        models_pb2.ModelVersion(
            version=3,
            stage=models_pb2.MODEL_STAGE_CANARY,
            aliases=["canary"],
            traffic_percent=10,
            gate=models_pb2.GateResult(passed=True, reason="beats production"),
        ),
    ]
    board, _ = _board(FakeRegistry(versions))
    models = asyncio.run(board.snapshot()).models
    assert models.production_version == 2
    assert [(r.version, r.stage, r.traffic_percent) for r in models.versions] == [
        (3, "canary", 10),
        (2, "production", 0),
    ]
    assert models.versions[0].gate == "passed: beats production"
    assert models.versions[0].observed_per_s == 4.25
    assert models.versions[1].observed_per_s is None


def test_the_loops_timeline_merges_autopilot_cycles_and_platform_events() -> None:
    board, events = _board()
    drift = monitoring_pb2.DriftEvent(
        event_id="d1", detector="cusum", signal="score", statistic=6.0, threshold=5.0
    )
    drift.detected_at.FromJsonString("2026-01-01T07:00:00Z")
    events.add("monitoring.drift", drift.SerializeToString())
    events.add("monitoring.drift", b"\xff not protobuf")
    assert events.skipped == 1
    loop = asyncio.run(board.snapshot()).loop
    assert loop.status == "ok" and loop.state == "canary"
    assert [s.kind for s in loop.timeline] == ["canary", "paused", "rolled_back", "drift"]
    assert loop.timeline[2].evidence == {"pr_auc": [0.41, 0.52]}
    assert loop.timeline[3].evidence["signal"] == "score"


def test_actions_need_the_token_and_forward_it() -> None:
    registry = FakeRegistry([])
    board, _ = _board(registry)
    app = create_app(board, None, token="right", interval_s=1.0)  # type: ignore[arg-type]
    client = TestClient(app)
    body = {"reason": "bad canary"}
    assert client.post("/api/v1/actions/rollback", json=body).status_code == 401
    wrong = client.post(
        "/api/v1/actions/rollback", json=body, headers={"authorization": "Bearer wrong"}
    )
    assert wrong.status_code == 403 and wrong.json()["error"] == "permission_denied"
    right = client.post(
        "/api/v1/actions/rollback", json=body, headers={"authorization": "Bearer right"}
    )
    assert right.status_code == 200 and right.json()["detail"]["production_version"] == 1
    assert registry.rollbacks == [("right", "bad canary")]
    paused = client.post(
        "/api/v1/actions/loop/pause", json=body, headers={"authorization": "Bearer right"}
    )
    assert paused.status_code == 200 and paused.json()["detail"] == {"state": "paused"}
    # the autopilot has no resume endpoint here: the service that acts cannot be reached
    resumed = client.post(
        "/api/v1/actions/loop/resume", json=body, headers={"authorization": "Bearer right"}
    )
    assert resumed.status_code == 503
    # without the token nothing about the body is answered; with it, a bad body is a 422
    assert client.post("/api/v1/actions/rollback", json={"reason": ""}).status_code == 401
    assert client.post("/api/v1/actions/rollback", content=b"{").status_code == 401
    invalid = client.post(
        "/api/v1/actions/rollback", json={"reason": ""}, headers={"authorization": "Bearer right"}
    )
    assert invalid.status_code == 422


def test_the_page_its_chart_library_and_schema() -> None:
    board, _ = _board()
    client = TestClient(create_app(board, None, token="", interval_s=1.0))  # type: ignore[arg-type]
    page = client.get("/")
    assert page.status_code == 200 and '<script src="/static/plotly.min.js">' in page.text
    assert "cdn" not in page.text.lower()
    plotly = client.get("/static/plotly.min.js")
    assert plotly.status_code == 200 and b"plotly.js" in plotly.content[:2000]
    assert client.get("/static/../settings.py").status_code == 404
    schema = client.get("/openapi.json").json()
    assert set(schema["paths"]) == {
        "/healthz",
        "/api/v1/board",
        "/api/v1/models",
        "/api/v1/trace/{transaction_id}",
        "/api/v1/actions/loop/pause",
        "/api/v1/actions/loop/resume",
        "/api/v1/actions/rollback",
    }
    assert all(
        "post" not in methods for p, methods in schema["paths"].items() if "actions" not in p
    )
    board_json = client.get("/api/v1/board").json()
    assert json.dumps(board_json)  # serialisable as the page receives it


@pytest.mark.parametrize("transaction_id", ["a b", "x" * 65, "../etc"])
def test_a_malformed_transaction_id_is_refused_before_any_lookup(transaction_id: str) -> None:
    board, _ = _board()
    client = TestClient(create_app(board, None, token="", interval_s=1.0))  # type: ignore[arg-type]
    assert client.get(f"/api/v1/trace/{transaction_id}").status_code in (404, 422)
