"""The component table of the local stack: what runs, on which ports, how it is probed.

To add a platform service, add one ``ServiceSpec`` to ``SERVICE_TABLE`` and its ports to
``StackSettings`` by the names the spec implies (``<name>_metrics_port``, and
``<name>_grpc_port`` or ``<name>_port``), plus its scrape job in deploy/local/prometheus.yml.
It runs as ``python -m services.<name>`` once ``services/<name>/__main__.py`` exists, gets the
stack's shared addresses (``LocalStack.client_environment``) and its own as
``MLOPS_<NAME>_METRICS_HOST/PORT`` and ``MLOPS_<NAME>_HOST/PORT``.

The infrastructure (Tansu, Redis, Triton, MLflow, Prometheus) comes from the process specs of
services/cli/localinfra.py, which the test fixtures start too.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Literal

from services.cli import localinfra
from services.cli.localstack.health import Health, probe, prometheus_health, service_health

if TYPE_CHECKING:
    from services.cli.localstack.stack import LocalStack


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


@dataclass(frozen=True)
class ServiceSpec:
    """A platform service as the local stack runs it."""

    name: str
    grpc_api: str | None = None  # the gRPC service it serves on StackSettings.<name>_grpc_port
    http_api: str | None = None  # what it serves over HTTP on StackSettings.<name>_port
    http_health_path: str = "/"  # with http_api: the page that answers 2xx when healthy
    metrics: bool = True  # Prometheus /metrics on StackSettings.<name>_metrics_port
    # Off the request and event path (analytics, batch training, control, the operators'
    # page): runs at nice BACKGROUND_NICE, so that when the cores are contended they go to
    # Predict and the event path first. It still gets every core nobody else wants.
    background: bool = False


SERVICE_TABLE: tuple[ServiceSpec, ...] = (
    ServiceSpec("ingestion"),
    ServiceSpec("features"),
    ServiceSpec("training", background=True),
    ServiceSpec("registry", grpc_api="mlops.v1.ModelRegistry"),
    ServiceSpec("serving", grpc_api="mlops.v1.Predictor"),
    ServiceSpec("monitoring", background=True),
    ServiceSpec("autopilot", background=True),
    ServiceSpec(
        "dashboard",
        http_api="operator dashboard",
        http_health_path="/healthz",
        background=True,
    ),
)
SERVICES = tuple(spec.name for spec in SERVICE_TABLE)
SERVICE_SPECS = {spec.name: spec for spec in SERVICE_TABLE}

INFRASTRUCTURE_PRIORITY = 10  # supervisord starts low priorities first and stops them last
SERVICE_PRIORITY = 100
BACKGROUND_NICE = 10  # CFS weight 110 against 1,024 at nice 0: ~1/10 of a contended core


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
        probe(spec.ready, *probe_says),
        tuple(endpoints),
        ports,
        priority,
        scrape_port=scrape_port,
    )


def infrastructure_components(stack: LocalStack) -> list[Component]:
    """Kafka (Tansu), Redis, Triton and MLflow; Prometheus is added by ``stack_components``."""
    s, h = stack.settings, stack.settings.host
    redis = localinfra.redis(s.redis_port, stack.data_dir / "redis", host=h)
    mlflow = localinfra.mlflow(s.mlflow_port, stack.data_dir / "mlflow", h)
    return [
        _infrastructure(
            localinfra.tansu(s.kafka_port, host=h),
            ("metadata answers", "no metadata answer"),
            [Endpoint("Kafka bootstrap (Tansu)", f"{h}:{s.kafka_port}")],
            (s.kafka_port,),
            priority=INFRASTRUCTURE_PRIORITY,
        ),
        _infrastructure(
            redis,
            ("PONG", "no PONG"),
            [Endpoint("Redis (Feast online store)", f"{h}:{s.redis_port}")],
            (s.redis_port,),
            priority=INFRASTRUCTURE_PRIORITY,
            # Redis rewrites its process title over its environment by default, which
            # would erase the stack's markers (stack_processes could not see it)
            command=(*redis.command, "--set-proc-title", "no"),
        ),
        _infrastructure(
            localinfra.triton(
                s.triton_http_port,
                s.triton_grpc_port,
                s.triton_metrics_port,
                stack.triton_models,
                h,
            ),
            ("/v2/health/ready 200", "not ready"),
            [
                Endpoint("Triton HTTP", f"http://{h}:{s.triton_http_port}"),
                Endpoint("Triton gRPC", f"{h}:{s.triton_grpc_port}"),
                Endpoint("Triton metrics", f"http://{h}:{s.triton_metrics_port}/metrics"),
            ],
            (s.triton_http_port, s.triton_grpc_port, s.triton_metrics_port),
            priority=INFRASTRUCTURE_PRIORITY + 10,
            scrape_port=s.triton_metrics_port,
        ),
        _infrastructure(
            mlflow,
            ("/health OK", "no /health answer"),
            [Endpoint("MLflow tracking", f"http://{h}:{s.mlflow_port}")],
            (s.mlflow_port,),
            priority=INFRASTRUCTURE_PRIORITY + 10,
            # a restart must first end the uvicorn child a killed server leaves on the port
            command=(
                str(stack.python),
                "-m",
                "services.cli.replace_previous",
                "--stack",
                str(stack.var_dir),
                "--program",
                "mlflow",
                "--",
                *mlflow.command,
            ),
        ),
    ]


def service_component(stack: LocalStack, spec: ServiceSpec) -> Component:
    """``python -m services.<name>`` with its environment, endpoints and probe."""
    s, h = stack.settings, stack.settings.host
    metrics_port = s.metrics_port(spec.name) if spec.metrics else None
    grpc_port = s.grpc_port(spec.name) if spec.grpc_api else None
    http_port = s.http_port(spec.name) if spec.http_api else None
    endpoints = []
    if grpc_port is not None:
        endpoints.append(Endpoint(f"{spec.name} gRPC ({spec.grpc_api})", f"{h}:{grpc_port}"))
    if http_port is not None:
        endpoints.append(Endpoint(f"{spec.name} {spec.http_api}", f"http://{h}:{http_port}"))
    if metrics_port is not None:
        endpoints.append(Endpoint(f"{spec.name} /metrics", f"http://{h}:{metrics_port}/metrics"))
    http_url = None if http_port is None else f"http://{h}:{http_port}{spec.http_health_path}"
    command: tuple[str, ...] = (str(stack.python), "-m", f"services.{spec.name}")
    if spec.background:
        command = ("nice", "-n", str(BACKGROUND_NICE), *command)  # nice execs: same pid
    return Component(
        spec.name,
        "service",
        command,
        stack.service_environment(spec.name),
        partial(service_health, h, metrics_port, grpc_port, http_url),
        tuple(endpoints),
        tuple(p for p in (metrics_port, grpc_port, http_port) if p is not None),
        priority=SERVICE_PRIORITY,
        autostart=False,  # started by `up` once the infrastructure is healthy
        scrape_port=metrics_port,
    )


def stack_components(stack: LocalStack) -> list[Component]:
    """Every component of ``stack``: the infrastructure, Prometheus (healthy once every
    target it scrapes is up) and the services that are built."""
    s, h = stack.settings, stack.settings.host
    infra = infrastructure_components(stack)
    services = [service_component(stack, SERVICE_SPECS[name]) for name in stack.built_services()]
    jobs = ["prometheus", *(c.name for c in [*infra, *services] if c.scrape_port)]
    prometheus = localinfra.prometheus(
        s.prometheus_port, stack.prometheus_config, stack.data_dir / "prometheus", h
    )
    infra.append(
        Component(
            prometheus.name,
            "infrastructure",
            tuple(prometheus.command),
            prometheus.env,
            partial(prometheus_health, h, s.prometheus_port, jobs),
            (Endpoint("Prometheus", f"http://{h}:{s.prometheus_port}"),),
            (s.prometheus_port,),
            priority=INFRASTRUCTURE_PRIORITY + 20,
            scrape_port=s.prometheus_port,
        )
    )
    return [*infra, *services]
