"""Health probes of the local stack's components: one ``Health`` (ok + what was seen) each."""

from __future__ import annotations

import http.client
import json
import re
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from services.cli.localinfra import http_ok, http_text

_STARTUP = re.compile(r"^mlops_service_startup_seconds\{[^}]*\} ([0-9.eE+-]+)$", re.MULTILINE)


@dataclass(frozen=True)
class Health:
    ok: bool
    detail: str


def service_health(
    host: str, metrics_port: int | None, grpc_port: int | None, http_url: str | None = None
) -> Health:
    """A service is healthy when each of what it exposes answers: /metrics, gRPC health,
    an HTTP page."""
    # grpc is imported only when probing: the MLflow wrapper imports this package too
    from services.cli.healthcheck import grpc_health_status

    parts = []
    healthy = True
    if metrics_port is not None:
        text = http_text(f"http://{host}:{metrics_port}/metrics")
        metrics = text is not None
        parts.append(f"/metrics {'ok' if metrics else 'no answer'}")
        startup = _STARTUP.search(text or "")
        if startup is not None:  # the process's own figure: spawn to its first ready
            parts.append(f"ready {float(startup.group(1)):.1f}s after spawn")
        elif metrics:
            parts.append("not ready yet")
        healthy = metrics
    if grpc_port is not None:
        status = grpc_health_status(f"{host}:{grpc_port}")
        # NOT_SERVING is an answer: serving says so until a model is loaded (shown, not hidden)
        parts.append(f"gRPC health {status or 'no answer'}")
        healthy = healthy and status is not None
    if http_url is not None:
        page = http_ok(http_url)
        parts.append(f"HTTP {'ok' if page else 'no answer'}")
        healthy = healthy and page
    return Health(healthy, ", ".join(parts))


def prometheus_health(host: str, port: int, jobs: Iterable[str]) -> Health:
    """Ready, and every job it should scrape is up."""
    if not http_ok(f"http://{host}:{port}/-/ready"):
        return Health(False, "not ready")
    try:
        with urllib.request.urlopen(
            f"http://{host}:{port}/api/v1/targets?state=active", timeout=2
        ) as response:
            targets = json.load(response)["data"]["activeTargets"]
    except (urllib.error.URLError, OSError, ValueError, KeyError, http.client.HTTPException) as exc:
        return Health(False, f"targets API: {exc}")
    health = {t["labels"]["job"]: (t["health"], t.get("lastError", "")) for t in targets}
    expected = sorted(jobs)
    not_up = {job: health.get(job, ("absent", "")) for job in expected}
    not_up = {job: state for job, state in not_up.items() if state[0] != "up"}
    if not_up:
        shown = "; ".join(
            f"{job} {state}" + (f": {error}" if error else "")
            for job, (state, error) in not_up.items()
        )
        return Health(False, f"{len(expected) - len(not_up)}/{len(expected)} targets up ({shown})")
    return Health(True, f"ready, {len(expected)}/{len(expected)} targets up")


def probe(check: Callable[[], bool], ok: str, failed: str) -> Callable[[], Health]:
    """A ``Health`` probe from a yes/no check and what to say in either case."""
    return lambda: Health(True, ok) if check() else Health(False, failed)
