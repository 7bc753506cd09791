"""What operators get, against one running local stack (`mlops stack up` on free ports, then
`mlops bootstrap` for a production model), shared by every test of this module:

- the dashboard in a real browser (Debian's chromium through Playwright): it loads without a
  console error, shows the production version, a chart updates when Predict traffic flows, a
  drift event shows once one is published to monitoring.drift, a trace explains a
  prediction; a screenshot is saved to var/test-results/dashboard.png;
- the dashboard's JSON API: no panel is an empty chart without a sentence, actions need the
  registry token, and a schemathesis run over its OpenAPI schema finds no server error;
- `mlops trace` for a served transaction: answer, lineage, point-in-time recomputation;
- every PromQL query of the Grafana dashboards, the alert rules and the dashboard's charts
  runs on the stack's Prometheus and names only metrics a component exports.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from google.protobuf.timestamp_pb2 import Timestamp
from rich.console import Console

from services.cli.localinfra import wait_until
from services.cli.localstack import (
    LocalStack,
    StackSettings,
    end_processes,
    load_stack,
    stack_processes,
)
from services.cli.trace import show
from services.dashboard.board import chart_specs
from services.shared.kafka import create_producer
from services.shared.prediction_trace import PredictionTrace
from services.shared.proto.mlops.v1 import (
    events_pb2,
    monitoring_pb2,
    predictor_pb2,
    predictor_pb2_grpc,
)
from services.shared.settings import PROJECT_ROOT, KafkaSettings

# the module's stack (up + bootstrap) is set up within its first test's time
pytestmark = pytest.mark.timeout(900)
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ROOT = PROJECT_ROOT
SCREENSHOT = PROJECT_ROOT / "var" / "test-results" / "dashboard.png"
GRAFANA = PROJECT_ROOT / "deploy" / "docker" / "grafana" / "dashboards"
ALERTS = PROJECT_ROOT / "deploy" / "alerts" / "alerts.yml"


def _mlops(env: dict[str, str], *args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "services.cli.main", *args],
        env=env,
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


class Stack:
    def __init__(self, env: dict[str, str], local: LocalStack) -> None:
        self.env = env
        self.local = local
        s = local.settings
        self.dashboard = f"http://{s.host}:{s.dashboard_port}"
        self.prometheus = f"http://{s.host}:{s.prometheus_port}"
        self.serving = f"{s.host}:{s.serving_grpc_port}"
        self.kafka = KafkaSettings(bootstrap=f"{s.host}:{s.kafka_port}", broker_flavor="tansu")
        self.token = local.registry_token()

    def get(self, url: str, headers: dict[str, str] | None = None) -> Any:
        request = urllib.request.Request(url, headers=headers or {})
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.load(response)

    def post(self, path: str, body: dict[str, Any], token: str | None) -> tuple[int, Any]:
        headers = {"content-type": "application/json"}
        if token is not None:
            headers["authorization"] = f"Bearer {token}"
        request = urllib.request.Request(
            self.dashboard + path, data=json.dumps(body).encode(), headers=headers, method="POST"
        )
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return response.status, json.load(response)
        except urllib.error.HTTPError as exc:
            return exc.code, json.load(exc)

    def board(self) -> dict[str, Any]:
        result: dict[str, Any] = self.get(self.dashboard + "/api/v1/board")
        return result


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    running = os.environ.get("OPERATORS_TEST_STACK")  # iterating: a bootstrapped stack's var dir
    if running:
        local = LocalStack(
            StackSettings.model_validate_json((Path(running) / "run" / "stack.json").read_text())
        )
        yield Stack({**os.environ, **local.client_environment(), "COLUMNS": "200"}, local)
        return
    var_dir = tmp_path_factory.mktemp("operators") / "var"
    names = [name for name in StackSettings.model_fields if name.endswith("_port")]
    with contextlib.ExitStack() as held:  # held together: no two components share a port
        sockets = [held.enter_context(socket.create_server(("127.0.0.1", 0))) for _ in names]
        ports = {
            f"MLOPS_STACK_{name.upper()}": str(sock.getsockname()[1])
            for name, sock in zip(names, sockets, strict=True)
        }
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("MLOPS_")},
        **ports,
        "MLOPS_STACK_VAR_DIR": str(var_dir),
        # every prediction of this test is sampled, compared within seconds
        "MLOPS_MONITORING_SKEW_SAMPLE_RATE": "1",
        "MLOPS_MONITORING_SKEW_INTERVAL_S": "3",
        "MLOPS_MONITORING_SKEW_MIN_AGE_S": "3",
        "MLOPS_TRAINING_PARAM_EPOCHS": "5",  # a production model, not a good one
        "MLOPS_INGESTION_ARCHIVE_MAX_AGE_S": "1",  # bootstrap waits for the archive
        "COLUMNS": "200",
    }
    try:
        started = time.monotonic()
        up = _mlops(env, "stack", "up", "--timeout", "300", timeout=400)
        assert up.returncode == 0, up.stdout + up.stderr
        up_s = time.monotonic() - started
        local = load_stack(StackSettings(var_dir=var_dir))  # the ports it was started with
        client = {**env, **local.client_environment()}
        boot = _mlops(
            client,
            "bootstrap",
            "--days",
            "4",
            "--users",
            "400",
            "--fraud-rate",
            "0.05",
            "--timeout",
            "300",
            timeout=600,
        )
        assert boot.returncode == 0, boot.stdout + boot.stderr
        print(f"stack up {up_s:.0f} s, bootstrap {time.monotonic() - started - up_s:.0f} s")
        yield Stack(client, local)
    finally:
        started = time.monotonic()
        _mlops(env, "stack", "down", timeout=120)
        print(f"stack down {time.monotonic() - started:.0f} s")
        end_processes(stack_processes(var_dir.resolve()))


# ----------------------------------------------------------------------------- traffic


def _transaction(transaction_id: str, user: int) -> events_pb2.Transaction:
    return events_pb2.Transaction(
        transaction_id=transaction_id,
        user_id=f"user-{user % 400:05d}",  # users of the simulated history: they have features
        merchant_id=f"merchant-{user % 50:04d}",
        amount=42.5 + user,
        currency="EUR",
        channel="web",
        country="DE",
        event_time=datetime.now(UTC).isoformat(),
    )


class Traffic:
    """Predict calls in a thread until stopped; remembers the transactions it sent."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.sent: list[str] = []
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with grpc.insecure_channel(self.address) as channel:
            stub = predictor_pb2_grpc.PredictorStub(channel)
            n = 0
            while not self._stop.is_set():
                transaction_id = f"op-{uuid.uuid4().hex[:12]}"
                try:
                    stub.Predict(
                        predictor_pb2.PredictRequest(transaction=_transaction(transaction_id, n)),
                        timeout=2.0,
                    )
                    self.sent.append(transaction_id)
                except grpc.RpcError as exc:
                    self.errors.append(f"{exc.code()}: {exc.details()}")
                n += 1
                time.sleep(0.05)

    def __enter__(self) -> Traffic:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


def _publish_drift(kafka: KafkaSettings, event: monitoring_pb2.DriftEvent) -> None:
    async def send() -> None:
        producer = create_producer(kafka, client_id="test-operators")
        await producer.start()
        try:
            await producer.send_and_wait(
                "monitoring.drift", event.SerializeToString(), key=event.model_name.encode()
            )
        finally:
            await producer.stop()

    # in a thread of its own: Playwright's sync API runs an event loop in this one
    worker = threading.Thread(target=asyncio.run, args=(send(),))
    worker.start()
    worker.join(timeout=30)


# ----------------------------------------------------------------------------- the page


def test_the_dashboard_in_a_real_browser(stack: Stack) -> None:
    from playwright.sync_api import sync_playwright

    errors: list[str] = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM, headless=True, args=CHROMIUM_FLAGS
        )
        try:
            page = browser.new_page(viewport={"width": 1500, "height": 2000})
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(stack.dashboard + "/")

            # the production version, as the registry says it
            page.wait_for_function(
                "document.getElementById('production-version').textContent.includes(' v1')",
                timeout=30_000,
            )
            assert page.inner_text("#models-table").count("production") >= 1

            # a chart updates when traffic flows: the Predict rate chart gets points
            def points() -> int:
                return int(page.get_attribute("#chart-predict_rate", "data-points") or 0)

            before = points()
            with Traffic(stack.serving) as traffic:
                page.wait_for_function(
                    f"Number(document.getElementById('chart-predict_rate').dataset.points)"
                    f" > {before}",
                    timeout=90_000,
                )
                assert page.get_attribute("#chart-predict_rate", "class") == "card ok"
                assert page.locator("#chart-predict_rate .chart .main-svg").count() > 0
            assert traffic.sent and not traffic.errors, traffic.errors[:3]

            # a drift event shows once one is produced
            event_id = f"drift-{uuid.uuid4().hex[:8]}"
            detected = Timestamp()
            detected.FromDatetime(datetime.now(UTC))
            _publish_drift(
                stack.kafka,
                monitoring_pb2.DriftEvent(
                    event_id=event_id,
                    detector="test-detector",
                    signal="log_amount",
                    model_name="fraud_detector",
                    model_version=1,
                    statistic=7.5,
                    threshold=5.0,
                    detected_at=detected,
                ),
            )
            page.wait_for_selector(f"li[data-event-id='{event_id}']", timeout=30_000)
            assert "log_amount" in page.inner_text(f"li[data-event-id='{event_id}']")
            assert "log_amount" in page.inner_text("#timeline")  # on the loop's timeline too

            # the trace of one served transaction, from the page
            page.fill("#trace-id", traffic.sent[0])
            page.click("#trace-form button")
            page.wait_for_selector("#trace-features", timeout=90_000)
            assert "production" in page.inner_text("#trace-answers")
            page.wait_for_timeout(1200)  # one more refresh for the picture
            SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(SCREENSHOT), full_page=True)
        finally:
            browser.close()
    assert errors == []


# ----------------------------------------------------------------------------- the API


def test_every_panel_shows_data_or_says_why(stack: Stack) -> None:
    board = stack.board()
    assert time.time() - board["generated_at"] < 3  # at most one refresh old
    for chart in board["charts"]:
        if chart["status"] == "ok":
            assert chart["series"] and any(v is not None for v in chart["series"][0]["y"])
        else:
            assert chart["message"] and not chart["series"], chart
    for panel in ("models", "quality", "drift", "loop"):
        assert board[panel]["status"] == "ok" or board[panel]["message"], board[panel]
    assert board["models"]["production_version"] == 1
    [version] = board["models"]["versions"]
    assert version["stage"] == "production" and version["aliases"] == ["production"]


def test_actions_need_the_registry_token(stack: Stack) -> None:
    body = {"reason": "test"}
    assert stack.post("/api/v1/actions/rollback", body, None)[0] == 401
    assert stack.post("/api/v1/actions/rollback", body, "not-the-token")[0] == 403
    # the right token reaches the registry, which has no previous production to go back to
    status, answer = stack.post("/api/v1/actions/rollback", body, stack.token)
    assert status == 409, answer
    assert stack.board()["models"]["production_version"] == 1


def test_schemathesis_finds_no_server_error(stack: Stack) -> None:
    result = subprocess.run(
        [
            str(Path(sys.executable).parent / "schemathesis"),
            "run",
            stack.dashboard + "/openapi.json",
            "--checks",
            "not_a_server_error",
            "--max-examples",
            "10",
            "--phases",
            "examples,fuzzing",
            "--workers",
            "1",
            "--suppress-health-check",
            "too_slow",
        ],
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
    assert "/api/v1/trace/{transaction_id}" in result.stdout  # the operations were tested


# ----------------------------------------------------------------------------- mlops trace


def _predictions_read(stack: Stack) -> float:
    """How many predictions monitoring has read from predictions.log."""
    s = stack.local.settings
    with urllib.request.urlopen(
        f"http://{s.host}:{s.monitoring_metrics_port}/metrics", timeout=5
    ) as response:
        text = response.read().decode()
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("mlops_monitoring_predictions_total{")
    )


def test_mlops_trace_explains_one_prediction(stack: Stack) -> None:
    transaction_id = f"trace-{uuid.uuid4().hex[:10]}"
    before = _predictions_read(stack)
    with grpc.insecure_channel(stack.serving) as channel:
        answer = predictor_pb2_grpc.PredictorStub(channel).Predict(
            predictor_pb2.PredictRequest(transaction=_transaction(transaction_id, 7)), timeout=5
        )
    # monitoring has read it, so it is in predictions.log
    wait_until(
        lambda: _predictions_read(stack) > before, 30, "the prediction logged", interval_s=0.2
    )
    result = _mlops(stack.env, "trace", transaction_id, "--json", timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    trace = json.loads(result.stdout)
    [served] = trace["answers"]
    assert served["route"] == "production" and served["model_version"] == answer.model_version
    assert abs(served["fraud_probability"] - answer.fraud_probability) < 1e-6
    assert set(served["features"]) == {c["name"] for c in trace["recomputation"]["inputs"]}
    assert trace["lineage"]["run_id"] and trace["lineage"]["dataset_snapshot_id"]
    assert trace["lineage"]["feature_definitions_changed"] is False
    assert trace["label"] is None and "no label" in trace["label_status"]
    # served from the online store, recomputed from the offline log: the same pipeline wrote
    # both, so a healthy platform shows no skew for this request
    assert trace["recomputation"]["skewed"] == [], trace["recomputation"]["inputs"]
    assert trace["recomputation_status"] == "no skew: all 16 model inputs equal"
    # what the terminal shows of the same trace
    console = Console(record=True, width=160)
    with contextlib.redirect_stdout(io.StringIO()):
        show(PredictionTrace.model_validate(trace), console)
    text = console.export_text()
    assert transaction_id in text and "no skew" in text and "production" in text


# ----------------------------------------------------------------------------- PromQL

_METRIC = re.compile(r"\b((?:mlops|nv)_[a-z0-9_]+|up)\b")
_NAME_REGEX = re.compile(r'__name__=~"([^"]+)"')
_SUFFIXES = {
    "counter": ("", "_total", "_created"),
    "histogram": ("", "_bucket", "_sum", "_count", "_created"),
    "summary": ("", "_sum", "_count", "_created"),
    "gauge": ("",),
    "untyped": ("",),
}


def _queries() -> dict[str, str]:
    """Every PromQL expression operators rely on, by where it is written."""
    found = {}
    for path in sorted(GRAFANA.glob("*.json")):
        for panel in json.loads(path.read_text())["panels"]:
            for target in panel["targets"]:
                found[f"{path.name}: {panel['title']} [{target['refId']}]"] = target["expr"]
    for group in yaml.safe_load(ALERTS.read_text())["groups"]:
        for rule in group["rules"]:
            found[f"alerts.yml: {rule['alert']}"] = rule["expr"]
    for spec in chart_specs("1m"):
        for n, query in enumerate(spec.queries):
            found[f"dashboard: {spec.id} [{n}]"] = query.promql
    return found


def _exported(stack: Stack) -> set[str]:
    """Every sample name the scraped components declare (# TYPE lines: a labelled metric
    with no sample yet counts), with its type's suffixes."""
    targets = stack.get(stack.prometheus + "/api/v1/targets")["data"]["activeTargets"]
    names = {"up", "scrape_duration_seconds", "scrape_samples_scraped"}
    for target in targets:
        with urllib.request.urlopen(target["scrapeUrl"], timeout=10) as response:
            text = response.read().decode()
        for line in text.splitlines():
            if line.startswith("# TYPE "):
                _, _, family, kind = line.split(maxsplit=3)
                names |= {family + suffix for suffix in _SUFFIXES.get(kind, ("",))}
            elif line and not line.startswith("#"):
                names.add(re.split(r"[{ ]", line, maxsplit=1)[0])
    return names


def test_every_promql_runs_and_names_exported_metrics(stack: Stack) -> None:
    queries = _queries()
    assert len(queries) > 60  # three Grafana boards, the alert rules, the page's charts
    exported = _exported(stack)
    built = set(stack.local.built_services())
    failures = []
    pending: set[str] = set()
    for where, expr in queries.items():
        url = f"{stack.prometheus}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        try:
            answer = stack.get(url)
        except urllib.error.HTTPError as exc:
            answer = json.load(exc)
        if answer.get("status") != "success":
            failures.append(f"{where}: {answer.get('error')}")
        for name in set(_METRIC.findall(expr)):
            if name in exported:
                continue
            owner = name.split("_")[1] if name.startswith("mlops_") else ""
            if owner and owner not in built and not (ROOT / "services" / owner).is_dir():
                # a service whose package is not in the repository yet: its metrics are
                # checked from the day it is (then it runs in the stack and must export them)
                pending.add(name)
                continue
            failures.append(f"{where}: {name} is exported by no component")
        for pattern in _NAME_REGEX.findall(expr):
            if not any(re.fullmatch(pattern, n) for n in exported):
                failures.append(f"{where}: no exported metric matches {pattern}")
    assert not failures, "\n".join(failures)
    print(
        f"{len(queries)} queries checked; metrics of services not in the repository yet: "
        f"{sorted(pending)}"
    )
