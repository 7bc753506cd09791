"""The registry process and its gRPC edge: bearer-token auth on mutating calls, reads without
one, and ``python -m services.registry`` starting (health SERVING) or refusing to start."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from registry_harness import TOKEN, RegistryInThread, registry_settings

from services.cli import localinfra
from services.shared.errors import FailedPrecondition, NotFound, PermissionDenied, Unauthenticated
from services.shared.registry_client import RegistryClient
from services.shared.settings import KafkaSettings, MlflowSettings, TritonSettings


@pytest.fixture
def registry(
    kafka: KafkaSettings, mlflow_server: MlflowSettings, triton_server: TritonSettings
) -> Iterator[RegistryInThread]:
    running = RegistryInThread(registry_settings(kafka, mlflow_server, triton_server)).start()
    try:
        yield running
    finally:
        running.stop()


@pytest.mark.parametrize(
    ("token", "error"), [("", Unauthenticated), ("not-the-token", PermissionDenied)]
)
def test_mutating_calls_need_the_right_token(
    registry: RegistryInThread, token: str, error: type[Exception]
) -> None:
    with RegistryClient(registry.client_settings(token=token)) as client:
        with pytest.raises(error):
            client.register("run", "a" * 64)
        with pytest.raises(error):
            client.set_alias("production", 1)
        with pytest.raises(error):
            client.rollback()
        assert client.list_versions() == []  # reads need no token
        with pytest.raises(NotFound):
            client.get_version(alias="production")


def test_with_the_token_calls_reach_the_registry(registry: RegistryInThread) -> None:
    with RegistryClient(registry.client_settings()) as client:
        with pytest.raises(FailedPrecondition, match="no production version"):
            client.rollback()
        with pytest.raises(NotFound):
            client.register("no-such-run", "a" * 64)


def _python_m_registry(env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "services.registry"],
        env={**os.environ, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def test_the_service_refuses_to_start_without_a_token() -> None:
    process = _python_m_registry({"MLOPS_REGISTRY_TOKEN": "", "MLOPS_REGISTRY_METRICS_PORT": "0"})
    output, _ = process.communicate(timeout=60)
    assert process.returncode == 1
    assert "MLOPS_REGISTRY_TOKEN is not set" in output


def test_the_service_starts_serves_health_and_stops(
    kafka: KafkaSettings, mlflow_server: MlflowSettings, triton_server: TritonSettings
) -> None:
    port = localinfra.free_port()
    process = _python_m_registry(
        {
            "MLOPS_REGISTRY_TOKEN": TOKEN,
            "MLOPS_REGISTRY_PORT": str(port),
            "MLOPS_REGISTRY_METRICS_PORT": "0",
            "MLOPS_REGISTRY_MODEL_NAME": "fraud_main_test",
            "MLOPS_MLFLOW_TRACKING_URI": mlflow_server.tracking_uri,
            "MLOPS_TRITON_GRPC_PORT": str(triton_server.grpc_port),
            "MLOPS_TRITON_MODEL_REPOSITORY": str(triton_server.model_repository),
            "MLOPS_KAFKA_BOOTSTRAP": kafka.bootstrap,
            "MLOPS_KAFKA_TOPIC_PREFIX": kafka.topic_prefix,
            "MLOPS_KAFKA_BROKER_FLAVOR": "tansu",
        }
    )
    try:

        def serving() -> bool:
            with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
                try:
                    response = health_pb2_grpc.HealthStub(channel).Check(
                        health_pb2.HealthCheckRequest(service="mlops.v1.ModelRegistry"),
                        timeout=1,
                    )
                except grpc.RpcError:
                    return False
                return response.status == health_pb2.HealthCheckResponse.SERVING

        localinfra.wait_until(
            serving, 60, "registry health", interval_s=0.3, alive=lambda: process.poll() is None
        )
        os.killpg(process.pid, signal.SIGTERM)
        output, _ = process.communicate(timeout=30)
        assert process.returncode == 0, output
        assert "registry_ready" in output and "service_stopped" in output
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
