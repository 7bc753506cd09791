"""The local stack: its files, the environment each service gets, its rendered configurations
and first-start preparation (data directories, the registry token, the Feast registry)."""

from __future__ import annotations

import contextlib
import os
import secrets
import sys
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from services.cli import localinfra
from services.cli.localstack.components import SERVICE_SPECS, SERVICES, Component, stack_components
from services.cli.localstack.health import Health
from services.cli.localstack.processes import StackProcess, listener_of, stack_processes
from services.cli.localstack.settings import StackError, StackSettings
from services.cli.localstack.supervisor import render_supervisord_config
from services.shared.settings import PROJECT_ROOT

PROMETHEUS_TEMPLATE = PROJECT_ROOT / "deploy" / "local" / "prometheus.yml"


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
    def supervisord_pidfile(self) -> Path:
        return self.run_dir / "supervisord.pid"

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
            # the loop's API (`mlops loop`, the dashboard)
            "MLOPS_AUTOPILOT_CLIENT_URL": f"http://{s.host}:{s.autopilot_metrics_port}",
        }

    def service_environment(self, service: str) -> dict[str, str]:
        """The environment ``service`` runs with: the one place the local stack's addresses
        reach the services (they read it through their settings classes)."""
        s, spec = self.settings, SERVICE_SPECS[service]
        env = {"PYTHONUNBUFFERED": "1", **self.client_environment()}
        prefix = f"MLOPS_{service.upper()}_"
        if spec.metrics:
            env[prefix + "METRICS_HOST"] = s.host
            env[prefix + "METRICS_PORT"] = str(s.metrics_port(service))
        # the address of its API server: <PREFIX>HOST / <PREFIX>PORT
        if spec.grpc_api:
            env[prefix + "HOST"] = s.host
            env[prefix + "PORT"] = str(s.grpc_port(service))
        elif spec.http_api:
            env[prefix + "HOST"] = s.host
            env[prefix + "PORT"] = str(s.http_port(service))
        if service == "registry":
            env["MLOPS_REGISTRY_TOKEN"] = self.registry_token()
            # the autopilot runs here: a gated candidate waits for it (shadow first)
            env["MLOPS_REGISTRY_PUBLISH_PASSED_AS"] = "none"
        if service == "autopilot":
            env["MLOPS_AUTOPILOT_MONITORING_URL"] = (
                f"http://{s.host}:{s.metrics_port('monitoring')}"
            )
            env["MLOPS_AUTOPILOT_PROMETHEUS_URL"] = f"http://{s.host}:{s.prometheus_port}"
        if service == "dashboard":  # what the page reads besides the shared components
            env["MLOPS_DASHBOARD_PROMETHEUS_URL"] = f"http://{s.host}:{s.prometheus_port}"
            env["MLOPS_DASHBOARD_MONITORING_API_URL"] = (
                f"http://{s.host}:{s.metrics_port('monitoring')}"
            )
            env["MLOPS_DASHBOARD_AUTOPILOT_API_URL"] = (
                f"http://{s.host}:{s.metrics_port('autopilot')}"
            )
        return env

    def components(self) -> list[Component]:
        """Every component, in the order of the table (services/cli/localstack/components.py)."""
        return stack_components(self)

    # --------------------------------------------------------------- rendering
    def render_supervisord_config(self) -> str:
        return render_supervisord_config(self)

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
        # alert rules: paths in the template are relative to the project
        config["rule_files"] = [str(PROJECT_ROOT / path) for path in config.get("rule_files", [])]
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
