"""The platform as local processes under supervisord: what runs, where, and whether it is healthy.

``mlops stack`` (services/cli/stack.py) is the terminal front end; the logic is here:

- ``StackSettings``: the var directory and every port, contract defaults (DESIGN.md), each
  overridable (``MLOPS_STACK_KAFKA_PORT=19092`` ...), so a second stack can run beside the
  first (the integration test does).
- ``LocalStack``: the components (the infrastructure from ``services.shared.localinfra`` and the
  six services, ``python -m services.<name>``), the one environment every service gets,
  the rendered supervisord and Prometheus configurations, first-start preparation (data
  directories, the registry token, the Feast registry) and a health probe per component.
- ``Supervisor``: supervisord's XML-RPC interface on its unix socket.

Every supervised process carries two environment markers (``MLOPS_LOCAL_STACK`` = the var
directory, ``MLOPS_LOCAL_STACK_PROGRAM`` = its program), inherited by its children. They let
``down`` prove nothing was left behind and let a restarted program end the remains of its
previous run (services/cli/replace_previous.py).
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import xmlrpc.client
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from services.shared import localinfra
from services.shared.errors import FailedPrecondition
from services.shared.settings import PROJECT_ROOT

SERVICES = ("ingestion", "features", "training", "registry", "serving", "monitoring")
GRPC_SERVICES = ("registry", "serving")
STACK_MARKER = "MLOPS_LOCAL_STACK"
PROGRAM_MARKER = "MLOPS_LOCAL_STACK_PROGRAM"
PROMETHEUS_TEMPLATE = PROJECT_ROOT / "deploy" / "local" / "prometheus.yml"


class StackSettings(BaseSettings):
    """Where the local stack keeps its files and which ports it uses (defaults: the contract)."""

    model_config = SettingsConfigDict(env_prefix="MLOPS_STACK_", extra="ignore", frozen=True)

    var_dir: Path = Field(
        PROJECT_ROOT / "var",
        description="Root of the stack's files: run/ (configs, socket), log/, data/, secrets/.",
    )
    host: str = Field("127.0.0.1", description="Address every component binds to.")
    kafka_port: int = Field(9092, description="Kafka-protocol broker (Tansu).")
    redis_port: int = Field(6379, description="Redis, the Feast online store.")
    triton_http_port: int = Field(8000, description="Triton HTTP.")
    triton_grpc_port: int = Field(8001, description="Triton gRPC.")
    triton_metrics_port: int = Field(8002, description="Triton Prometheus metrics.")
    prometheus_port: int = Field(9090, description="Prometheus.")
    mlflow_port: int = Field(5000, description="MLflow tracking server.")
    serving_grpc_port: int = Field(50051, description="serving: mlops.v1.Predictor.")
    registry_grpc_port: int = Field(50052, description="registry: mlops.v1.ModelRegistry.")
    ingestion_metrics_port: int = Field(9101, description="ingestion /metrics.")
    features_metrics_port: int = Field(9102, description="features /metrics.")
    training_metrics_port: int = Field(9103, description="training /metrics.")
    registry_metrics_port: int = Field(9104, description="registry /metrics.")
    serving_metrics_port: int = Field(9105, description="serving /metrics.")
    monitoring_metrics_port: int = Field(9106, description="monitoring /metrics.")
    scrape_interval_s: int = Field(5, ge=1, description="Prometheus scrape interval.")
    startup_timeout_s: float = Field(
        300.0, description="How long `up` waits for every component to be healthy."
    )

    @field_validator("var_dir")
    @classmethod
    def _absolute(cls, value: Path) -> Path:
        return value.expanduser().resolve()

    def metrics_port(self, service: str) -> int:
        return int(getattr(self, f"{service}_metrics_port"))

    def grpc_port(self, service: str) -> int:
        return int(getattr(self, f"{service}_grpc_port"))


class StackError(FailedPrecondition):
    """The local stack cannot do what was asked; the message says why and what to do."""

    code = "local_stack"


# ----------------------------------------------------------------------------- health


@dataclass(frozen=True)
class Health:
    ok: bool
    detail: str


def _service_health(host: str, metrics_port: int, grpc_port: int | None) -> Health:
    # grpc is imported only when probing: the MLflow wrapper imports this module too
    from services.cli.healthcheck import grpc_health_status

    metrics = localinfra.http_ok(f"http://{host}:{metrics_port}/metrics")
    parts = [f"/metrics {'ok' if metrics else 'no answer'}"]
    healthy = metrics
    if grpc_port is not None:
        status = grpc_health_status(f"{host}:{grpc_port}")
        # NOT_SERVING is an answer: serving says so until a model is loaded (shown, not hidden)
        parts.append(f"gRPC health {status or 'no answer'}")
        healthy = healthy and status is not None
    return Health(healthy, ", ".join(parts))


def _prometheus_health(host: str, port: int, jobs: Iterable[str]) -> Health:
    if not localinfra.http_ok(f"http://{host}:{port}/-/ready"):
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


def _probe(check: Callable[[], bool], ok: str, failed: str) -> Callable[[], Health]:
    return lambda: Health(True, ok) if check() else Health(False, failed)


# ----------------------------------------------------------------------------- components


@dataclass(frozen=True)
class Endpoint:
    what: str
    address: str


@dataclass(frozen=True)
class Component:
    """One supervised program."""

    name: str
    role: Literal["infrastructure", "service"]
    command: tuple[str, ...]
    env: Mapping[str, str]
    probe: Callable[[], Health]
    endpoints: tuple[Endpoint, ...]
    ports: tuple[int, ...]
    priority: int
    autostart: bool = True
    scrape_port: int | None = None  # what Prometheus scrapes (job = name)


def _infrastructure(
    spec: localinfra.ProcessSpec,
    probe_says: tuple[str, str],
    endpoints: list[Endpoint],
    ports: tuple[int, ...],
    *,
    priority: int,
    command: tuple[str, ...] | None = None,
    scrape_port: int | None = None,
) -> Component:
    """A component of the infrastructure from its ``localinfra`` process spec."""
    return Component(
        spec.name,
        "infrastructure",
        command or tuple(spec.command),
        spec.env,
        _probe(spec.ready, *probe_says),
        tuple(endpoints),
        ports,
        priority,
        scrape_port=scrape_port,
    )


@dataclass(frozen=True)
class StackProcess:
    pid: int
    program: str
    command: str


@dataclass
class ProgramState:
    name: str
    state: str  # RUNNING, STARTING, BACKOFF, FATAL, STOPPED, EXITED ... or "not loaded"
    pid: int = 0
    description: str = ""


@dataclass
class LocalStack:
    settings: StackSettings
    python: Path = field(default_factory=lambda: Path(sys.executable))

    # --------------------------------------------------------------- layout
    @property
    def var_dir(self) -> Path:
        return self.settings.var_dir

    @property
    def run_dir(self) -> Path:
        return self.var_dir / "run"

    @property
    def log_dir(self) -> Path:
        return self.var_dir / "log"

    @property
    def data_dir(self) -> Path:
        return self.var_dir / "data"

    @property
    def token_file(self) -> Path:
        return self.var_dir / "secrets" / "registry.token"

    @property
    def supervisord_config(self) -> Path:
        return self.run_dir / "supervisord.conf"

    @property
    def supervisor_socket(self) -> Path:
        return self.run_dir / "supervisor.sock"

    @property
    def prometheus_config(self) -> Path:
        return self.run_dir / "prometheus.yml"

    @property
    def settings_file(self) -> Path:
        """The settings of the running stack, so `status`/`down` need no environment."""
        return self.run_dir / "stack.json"

    @property
    def triton_models(self) -> Path:
        return self.data_dir / "triton_models"

    def log_file(self, program: str) -> Path:
        return self.log_dir / f"{program}.log"

    # --------------------------------------------------------------- what runs
    @staticmethod
    def built_services() -> list[str]:
        """Services whose package can run (``services/<name>/__main__.py`` exists)."""
        return [s for s in SERVICES if (PROJECT_ROOT / "services" / s / "__main__.py").exists()]

    @staticmethod
    def unbuilt_services() -> list[str]:
        built = LocalStack.built_services()
        return [s for s in SERVICES if s not in built]

    def client_environment(self) -> dict[str, str]:
        """Where the stack's shared components are, as the settings classes read it: what
        every service gets, and what a client of this stack needs (`mlops stack env`)."""
        s = self.settings
        return {
            "MLOPS_KAFKA_BOOTSTRAP": f"{s.host}:{s.kafka_port}",
            "MLOPS_KAFKA_BROKER_FLAVOR": "tansu",
            "MLOPS_REDIS_HOST": s.host,
            "MLOPS_REDIS_PORT": str(s.redis_port),
            "MLOPS_TRITON_HOST": s.host,
            "MLOPS_TRITON_HTTP_PORT": str(s.triton_http_port),
            "MLOPS_TRITON_GRPC_PORT": str(s.triton_grpc_port),
            "MLOPS_TRITON_METRICS_PORT": str(s.triton_metrics_port),
            "MLOPS_TRITON_MODEL_REPOSITORY": str(self.triton_models),
            "MLOPS_MLFLOW_TRACKING_URI": f"http://{s.host}:{s.mlflow_port}",
            "MLOPS_STORAGE_DATA_DIR": str(self.data_dir),
            "MLOPS_REGISTRY_CLIENT_ADDRESS": f"{s.host}:{s.registry_grpc_port}",
            "MLOPS_REGISTRY_CLIENT_TOKEN_FILE": str(self.token_file),
            # where Predict is served (serving binds it; clients such as the load test call it)
            "MLOPS_SERVING_HOST": s.host,
            "MLOPS_SERVING_PORT": str(s.serving_grpc_port),
        }

    def service_environment(self, service: str) -> dict[str, str]:
        """The environment ``service`` runs with: the one place the local stack's addresses
        reach the services (they read it through their settings classes)."""
        s = self.settings
        env = {"PYTHONUNBUFFERED": "1", **self.client_environment()}
        prefix = f"MLOPS_{service.upper()}_"
        env[prefix + "METRICS_HOST"] = s.host
        env[prefix + "METRICS_PORT"] = str(s.metrics_port(service))
        if service in GRPC_SERVICES:  # the gRPC server's address: <PREFIX>HOST / <PREFIX>PORT
            env[prefix + "HOST"] = s.host
            env[prefix + "PORT"] = str(s.grpc_port(service))
        if service == "registry":
            env["MLOPS_REGISTRY_TOKEN"] = self.registry_token()
        return env

    def components(self) -> list[Component]:
        s, h = self.settings, self.settings.host
        kafka = localinfra.tansu(s.kafka_port, host=h)
        redis = localinfra.redis(s.redis_port, self.data_dir / "redis", host=h)
        triton = localinfra.triton(
            s.triton_http_port, s.triton_grpc_port, s.triton_metrics_port, self.triton_models, h
        )
        prometheus = localinfra.prometheus(
            s.prometheus_port, self.prometheus_config, self.data_dir / "prometheus", h
        )
        mlflow = localinfra.mlflow(s.mlflow_port, self.data_dir / "mlflow", h)
        infra = [
            _infrastructure(
                kafka,
                ("metadata answers", "no metadata answer"),
                [Endpoint("Kafka bootstrap (Tansu)", f"{h}:{s.kafka_port}")],
                (s.kafka_port,),
                priority=10,
            ),
            _infrastructure(
                redis,
                ("PONG", "no PONG"),
                [Endpoint("Redis (Feast online store)", f"{h}:{s.redis_port}")],
                (s.redis_port,),
                priority=10,
                # Redis rewrites its process title over its environment by default, which
                # would erase the stack's markers (stack_processes could not see it)
                command=(*redis.command, "--set-proc-title", "no"),
            ),
            _infrastructure(
                triton,
                ("/v2/health/ready 200", "not ready"),
                [
                    Endpoint("Triton HTTP", f"http://{h}:{s.triton_http_port}"),
                    Endpoint("Triton gRPC", f"{h}:{s.triton_grpc_port}"),
                    Endpoint("Triton metrics", f"http://{h}:{s.triton_metrics_port}/metrics"),
                ],
                (s.triton_http_port, s.triton_grpc_port, s.triton_metrics_port),
                priority=20,
                scrape_port=s.triton_metrics_port,
            ),
            _infrastructure(
                mlflow,
                ("/health OK", "no /health answer"),
                [Endpoint("MLflow tracking", f"http://{h}:{s.mlflow_port}")],
                (s.mlflow_port,),
                priority=20,
                # a restart must first end the uvicorn child a killed server leaves on the port
                command=(
                    str(self.python),
                    "-m",
                    "services.cli.replace_previous",
                    "--stack",
                    str(self.var_dir),
                    "--program",
                    "mlflow",
                    "--",
                    *mlflow.command,
                ),
            ),
        ]
        services = []
        for service in self.built_services():
            grpc_port = s.grpc_port(service) if service in GRPC_SERVICES else None
            metrics_port = s.metrics_port(service)
            endpoints = [Endpoint(f"{service} /metrics", f"http://{h}:{metrics_port}/metrics")]
            if grpc_port is not None:
                api = "mlops.v1.Predictor" if service == "serving" else "mlops.v1.ModelRegistry"
                endpoints.insert(0, Endpoint(f"{service} gRPC ({api})", f"{h}:{grpc_port}"))
            services.append(
                Component(
                    service,
                    "service",
                    (str(self.python), "-m", f"services.{service}"),
                    self.service_environment(service),
                    partial(_service_health, h, metrics_port, grpc_port),
                    tuple(endpoints),
                    (metrics_port, *([grpc_port] if grpc_port else [])),
                    priority=100,
                    autostart=False,  # started by `up` once the infrastructure is healthy
                    scrape_port=metrics_port,
                )
            )
        jobs = ["prometheus", *(c.name for c in [*infra, *services] if c.scrape_port)]
        infra.append(
            replace(
                _infrastructure(
                    prometheus,
                    ("ready", "not ready"),
                    [Endpoint("Prometheus", f"http://{h}:{s.prometheus_port}")],
                    (s.prometheus_port,),
                    priority=30,
                    scrape_port=s.prometheus_port,
                ),
                # healthy once every target it scrapes is up
                probe=partial(_prometheus_health, h, s.prometheus_port, jobs),
            )
        )
        return [*infra, *services]

    # --------------------------------------------------------------- rendering
    def render_supervisord_config(self) -> str:
        def quoted(value: str) -> str:
            if '"' in value:
                raise StackError(f"a value of the stack's configuration contains '\"': {value}")
            return '"' + value.replace("%", "%%") + '"'

        lines = [
            "; Generated by `mlops stack up` (services/cli/localstack.py). Do not edit.",
            "[unix_http_server]",
            f"file={self.supervisor_socket}",
            "chmod=0700",
            "",
            "[supervisord]",
            f"logfile={self.log_dir / 'supervisord.log'}",
            "logfile_maxbytes=10MB",
            "logfile_backups=2",
            f"pidfile={self.run_dir / 'supervisord.pid'}",
            f"directory={PROJECT_ROOT}",
            "identifier=mlops-local-stack",
            "minfds=4096",
            "",
            "[rpcinterface:supervisor]",
            "supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface",
            "",
            "[supervisorctl]",
            f"serverurl=unix://{self.supervisor_socket}",
        ]
        for c in self.components():
            env = {**c.env, STACK_MARKER: str(self.var_dir), PROGRAM_MARKER: c.name}
            lines += [
                "",
                f"[program:{c.name}]",
                f"command={shlex.join(c.command).replace('%', '%%')}",
                f"directory={PROJECT_ROOT}",
                "environment=" + ",".join(f"{k}={quoted(v)}" for k, v in sorted(env.items())),
                f"priority={c.priority}",
                f"autostart={'true' if c.autostart else 'false'}",
                "autorestart=true",
                "startsecs=2",
                "startretries=5",
                "stopasgroup=true",
                "killasgroup=true",
                "stopwaitsecs=20",
                "redirect_stderr=true",
                f"stdout_logfile={self.log_file(c.name)}",
                "stdout_logfile_maxbytes=20MB",
                "stdout_logfile_backups=2",
            ]
        return "\n".join(lines) + "\n"

    def scrape_targets(self) -> dict[str, str]:
        """Prometheus job -> host:port, for every component that exposes metrics."""
        return {
            c.name: f"{self.settings.host}:{c.scrape_port}"
            for c in self.components()
            if c.scrape_port is not None
        }

    def render_prometheus_config(self) -> str:
        """deploy/local/prometheus.yml with the ports in use and only the jobs that run."""
        config = yaml.safe_load(PROMETHEUS_TEMPLATE.read_text())
        targets = self.scrape_targets()
        known = {job["job_name"] for job in config["scrape_configs"]}
        if unknown := sorted(set(targets) - known):
            raise StackError(f"{PROMETHEUS_TEMPLATE.name} has no scrape job for {unknown}")
        config["global"]["scrape_interval"] = f"{self.settings.scrape_interval_s}s"
        config["global"]["scrape_timeout"] = f"{max(1, self.settings.scrape_interval_s - 1)}s"
        config["scrape_configs"] = [
            {**job, "static_configs": [{"targets": [targets[job["job_name"]]]}]}
            for job in config["scrape_configs"]
            if job["job_name"] in targets
        ]
        header = "# Generated by `mlops stack up` from deploy/local/prometheus.yml. Do not edit.\n"
        return header + yaml.safe_dump(config, sort_keys=False)

    # --------------------------------------------------------------- preparation
    def registry_token(self) -> str:
        """The registry's bearer token, generated once (mode 0600) and kept across restarts."""
        if not self.token_file.exists():
            self.token_file.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            with contextlib.suppress(FileExistsError):
                fd = os.open(self.token_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                with os.fdopen(fd, "w") as out:
                    out.write(secrets.token_urlsafe(32) + "\n")
        return self.token_file.read_text().strip()

    def prepare(self) -> None:
        """Create the directories, the registry token, the saved settings and Prometheus'
        configuration (supervisord's is written by ``write_supervisord_config``)."""
        for directory in (
            self.run_dir,
            self.log_dir,
            self.triton_models,
            self.data_dir / "redis",
            self.data_dir / "mlflow" / "artifacts",
            self.data_dir / "prometheus",
            self.data_dir / "offline",
        ):
            directory.mkdir(parents=True, exist_ok=True)
        self.registry_token()
        _write_private(self.settings_file, self.settings.model_dump_json(indent=2))
        self.prometheus_config.write_text(self.render_prometheus_config())

    def write_supervisord_config(self) -> bool:
        """Write the configuration; returns whether it changed. Mode 0600: it holds the
        registry token in the registry's environment."""
        text = self.render_supervisord_config()
        if self.supervisord_config.exists() and self.supervisord_config.read_text() == text:
            return False
        _write_private(self.supervisord_config, text)
        return True

    def apply_feature_definitions(self) -> bool:
        """Register the Feast definitions before any service starts (they never apply:
        one writer); returns whether it applied (unchanged definitions are skipped)."""
        from services.cli.apply_features import apply_if_changed
        from services.shared.settings import FeastSettings, RedisSettings, StorageSettings

        return apply_if_changed(
            FeastSettings(),
            RedisSettings(host=self.settings.host, port=self.settings.redis_port),
            StorageSettings(data_dir=self.data_dir),
        )

    # --------------------------------------------------------------- processes and ports
    def processes(self) -> list[StackProcess]:
        return stack_processes(self.var_dir)

    def ports_in_use(self, components: Iterable[Component]) -> dict[int, str]:
        """Ports of ``components`` something already listens on -> who (best effort)."""
        used = {}
        for c in components:
            for port in c.ports:
                if localinfra.port_open(self.settings.host, port, timeout=0.3):
                    used[port] = f"{c.name}: {listener_of(port) or 'unknown process'}"
        return used

    def health(self, components: Iterable[Component]) -> dict[str, Health]:
        """Probe ``components`` in parallel."""
        components = list(components)
        with ThreadPoolExecutor(max_workers=max(1, len(components))) as pool:
            results = list(pool.map(lambda c: c.probe(), components))
        return {c.name: h for c, h in zip(components, results, strict=True)}

    def log_tail(self, program: str, lines: int = 25) -> str:
        path = self.log_file(program)
        if not path.exists():
            return "(no log yet)"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def load_stack(settings: StackSettings | None = None) -> LocalStack:
    """The stack as configured by the environment; for a stack that has been started, the
    settings it was started with (so `status` and `down` work from any shell)."""
    stack = LocalStack(settings or StackSettings())
    if stack.settings_file.exists():
        with contextlib.suppress(ValueError):
            return LocalStack(StackSettings.model_validate_json(stack.settings_file.read_text()))
    return stack


def _write_private(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(text)
    os.chmod(path, 0o600)


# ----------------------------------------------------------------------------- /proc


def stack_processes(var_dir: Path, program: str | None = None) -> list[StackProcess]:
    """Live processes carrying this stack's marker (and ``program``'s, if given)."""
    stack = f"{STACK_MARKER}={var_dir}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes().split(b"\0")
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:  # gone meanwhile, or not ours to read
            continue
        if stack not in environ:
            continue
        name = next(
            (
                v.split(b"=", 1)[1].decode()
                for v in environ
                if v.startswith(f"{PROGRAM_MARKER}=".encode())
            ),
            "supervisord",
        )
        if program is None or name == program:
            found.append(StackProcess(int(entry.name), name, cmdline.strip()))
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"  # a zombie has ended; its parent just has not reaped it yet


def end_processes(processes: Iterable[StackProcess], timeout_s: float = 10.0) -> None:
    """SIGTERM, then SIGKILL what is still alive after ``timeout_s``."""
    pids = [p.pid for p in processes]
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)
        deadline = time.monotonic() + timeout_s
        while any(_alive(pid) for pid in pids) and time.monotonic() < deadline:
            time.sleep(0.1)
        pids = [pid for pid in pids if _alive(pid)]
        if not pids:
            return


def listener_of(port: int) -> str | None:
    """Which process listens on ``port`` (from ``ss``), for error messages."""
    ss = shutil.which("ss")
    if ss is None:
        return None
    result = subprocess.run(
        [ss, "-H", "-ltnp", f"sport = :{port}"], capture_output=True, text=True, check=False
    )
    line = result.stdout.strip().splitlines()[:1]
    if not line:
        return None
    users = line[0].split("users:", 1)
    return users[1].strip() if len(users) == 2 else line[0]


# ----------------------------------------------------------------------------- supervisord


class Supervisor:
    """supervisord of one stack, driven through its XML-RPC interface."""

    def __init__(self, stack: LocalStack) -> None:
        self.stack = stack
        self.socket = stack.supervisor_socket
        self.pidfile = stack.run_dir / "supervisord.pid"

    @contextlib.contextmanager
    def _rpc(self) -> Iterator[Any]:
        from supervisor.xmlrpc import SupervisorTransport

        transport = SupervisorTransport(None, None, f"unix://{self.socket}")
        try:
            yield xmlrpc.client.ServerProxy("http://127.0.0.1", transport=transport).supervisor
        finally:
            transport.close()

    def running(self) -> bool:
        if not self.socket.exists():
            return False
        try:
            with self._rpc() as rpc:
                return bool(rpc.getState()["statename"] == "RUNNING")
        except (OSError, xmlrpc.client.Error):
            return False

    def pid(self) -> int | None:
        try:
            return int(self.pidfile.read_text().strip())
        except (OSError, ValueError):
            return None

    def start(self, timeout_s: float = 20.0) -> None:
        """Start supervisord (it daemonizes); returns once it answers."""
        env = {**os.environ, STACK_MARKER: str(self.stack.var_dir)}
        binary = self.stack.python.parent / "supervisord"
        result = subprocess.run(
            [str(binary), "-c", str(self.stack.supervisord_config)],
            env=env,
            capture_output=True,
            text=True,
            check=False,
        )
        if result.returncode != 0:
            raise StackError(f"supervisord failed to start: {result.stderr or result.stdout}")
        localinfra.wait_until(self.running, timeout_s, "supervisord", interval_s=0.1)

    def programs(self) -> dict[str, ProgramState]:
        with self._rpc() as rpc:
            infos = rpc.getAllProcessInfo()
        return {
            info["name"]: ProgramState(
                info["name"], info["statename"], int(info["pid"]), info["description"]
            )
            for info in infos
        }

    def start_program(self, name: str) -> None:
        with self._rpc() as rpc, contextlib.suppress(xmlrpc.client.Fault):  # ALREADY_STARTED
            rpc.startProcess(name, False)

    def reload(self) -> tuple[list[str], list[str], list[str]]:
        """Apply a changed configuration like ``supervisorctl update``: added programs are
        added, changed ones restarted, removed ones stopped. Returns (added, changed, removed)."""
        with self._rpc() as rpc:
            added, changed, removed = rpc.reloadConfig()[0]
            for name in [*changed, *removed]:
                with contextlib.suppress(xmlrpc.client.Fault):
                    rpc.stopProcessGroup(name)
                rpc.removeProcessGroup(name)
            for name in [*changed, *added]:
                rpc.addProcessGroup(name)
        return list(added), list(changed), list(removed)

    def shutdown(self, timeout_s: float = 90.0) -> None:
        """Stop every program (services first, by priority) and supervisord itself."""
        pid = self.pid()
        with contextlib.suppress(OSError, xmlrpc.client.Error), self._rpc() as rpc:
            rpc.shutdown()
        if pid is not None:
            localinfra.wait_until(
                lambda: not _alive(pid), timeout_s, "supervisord shutdown", interval_s=0.2
            )
