"""The autopilot's JSON API served on a real port (beside /metrics) and `mlops loop` against
it: status, history, pause and resume with and without the registry token."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from services.autopilot.api import build_api
from services.autopilot.judges import VersionHealth
from services.autopilot.loop import Autopilot, LoopPolicy, PairedData
from services.autopilot.state import StateFile
from services.cli import localinfra
from services.cli.main import app as cli
from services.shared.http_api import HttpApi
from services.shared.proto.mlops.v1 import monitoring_pb2

TOKEN = "test-loop-token"  # a test value, not a secret


class _Registry:
    async def set_alias(
        self, alias: str, version: int, *, traffic_percent: int = 0, reason: str = ""
    ) -> None:
        return None

    async def rollback(self, reason: str) -> None:
        return None

    async def training_request_id(self, version: int) -> str:
        return ""

    async def production_version(self) -> int:
        return 4


class _Training:
    def __init__(self) -> None:
        self.sent: list[monitoring_pb2.RetrainRequest] = []

    async def send(self, request: monitoring_pb2.RetrainRequest) -> None:
        self.sent.append(request)


class _Evidence:
    async def paired(self, baseline: int, candidate: int, limit: int) -> PairedData:
        return PairedData([], [], [], [], [])

    async def live_quality(self, version: int) -> dict[str, float] | None:
        return None

    async def new_labels_since(self, since: datetime) -> float | None:
        return 1e6

    async def health(self, versions: list[tuple[str, int]], since: datetime) -> list[VersionHealth]:
        return [VersionHealth() for _ in versions]


class ApiInThread:
    def __init__(self, autopilot: Autopilot) -> None:
        self.autopilot = autopilot
        self.port = localinfra.free_port()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self.api = HttpApi(
            build_api(autopilot, asyncio.Lock(), lambda: TOKEN), "127.0.0.1", self.port
        )

    def run(self, coroutine) -> object:  # type: ignore[no-untyped-def]
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(30)

    def __enter__(self) -> ApiInThread:
        self._thread.start()
        self.run(self.api.start())
        return self

    def __exit__(self, *exc: object) -> None:
        self.run(self.api.stop())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()


@pytest.fixture
def api(tmp_path: Path) -> Iterator[ApiInThread]:
    autopilot = Autopilot(
        LoopPolicy(cooldown_s=0, min_new_labels=0),
        _Registry(),
        _Training(),
        _Evidence(),
        StateFile(tmp_path / "state.json"),
    )
    with ApiInThread(autopilot) as running:
        running.run(autopilot.start())
        yield running


def _mlops(api: ApiInThread, *args: str, token: str = TOKEN, columns: int = 200) -> tuple[int, str]:
    env = {
        "MLOPS_AUTOPILOT_CLIENT_URL": f"http://127.0.0.1:{api.port}",
        "MLOPS_REGISTRY_CLIENT_TOKEN": token,
        "MLOPS_REGISTRY_CLIENT_TOKEN_FILE": "does-not-exist",
        "COLUMNS": str(columns),
    }
    result = CliRunner().invoke(cli, list(args), env=env)
    return result.exit_code, result.output


def test_status_history_and_metrics_on_one_port(api: ApiInThread) -> None:
    base = f"http://127.0.0.1:{api.port}"
    status = httpx.get(f"{base}/api/v1/loop").json()
    assert status["state"] == "watching" and status["production_version"] == 4
    assert httpx.get(f"{base}/api/v1/loop/history").json() == {"cycles": []}
    metrics = httpx.get(f"{base}/metrics").text
    assert 'mlops_autopilot_phase{phase="watching"} 1.0' in metrics

    code, out = _mlops(api, "loop", "status")
    assert code == 0, out
    assert "watching" in out and "v4" in out
    code, out = _mlops(api, "loop", "history")
    assert code == 0 and "no cycle yet" in out


def test_pause_and_resume_need_the_token_and_are_recorded(api: ApiInThread) -> None:
    base = f"http://127.0.0.1:{api.port}"
    refused = httpx.post(f"{base}/api/v1/loop/pause")
    assert refused.status_code == 401 and refused.json()["error"] == "unauthenticated"
    wrong = httpx.post(f"{base}/api/v1/loop/pause", headers={"authorization": "Bearer nope"})
    assert wrong.status_code == 401
    code, out = _mlops(api, "loop", "pause", token="nope")
    assert code == 1 and "401" in out
    assert not api.autopilot.state.paused

    code, out = _mlops(api, "loop", "pause", "--reason", "label feed broken")
    assert code == 0 and "paused" in out
    assert api.autopilot.state.paused
    event = api.autopilot.state.events[-1]
    assert event.kind == "paused" and event.reason == "label feed broken"
    assert event.actor.startswith("cli:")
    code, out = _mlops(api, "loop", "status")
    assert "paused" in out and "label feed broken" in out

    code, out = _mlops(api, "loop", "resume")
    assert code == 0 and "resumed" in out and not api.autopilot.state.paused


def test_a_cycle_shows_in_history_with_its_steps(api: ApiInThread) -> None:
    drift = monitoring_pb2.DriftEvent(event_id="d", detector="ADWIN", model_name="fraud_detector")
    api.run(api.autopilot.on_drift(drift))
    code, out = _mlops(api, "loop", "status")
    assert code == 0 and "retraining" in out
    cycle_id = api.autopilot.state.cycle.cycle_id  # type: ignore[union-attr]
    cycle = api.autopilot.state.cycle
    assert cycle is not None
    # The cycle's last allowed training never came: it timed out, and no further try is left.
    cycle.attempts = api.autopilot.policy.max_training_attempts
    cycle.requested_at = "2000-01-01T00:00:00+00:00"
    api.run(api.autopilot.tick())
    code, out = _mlops(api, "loop", "history")
    assert code == 0 and cycle_id in out and "training_failed" in out
    # a terminal of 80 columns: nothing wider, and the names are whole (not folded)
    code, out = _mlops(api, "loop", "history", columns=80)
    assert code == 0 and max(len(line) for line in out.splitlines()) <= 80, out
    assert f" {cycle_id} " in out and " training_failed" in out, out
    assert f"{cycle_id}: " in out  # the why, below the table
    code, out = _mlops(api, "loop", "history", cycle_id)
    assert code == 0 and "retraining requested (drift)" in out
