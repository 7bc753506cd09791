"""Test harness for training and the registry (tests only).

- ``RegistryInThread`` runs the real registry (``RegistryApp``: gRPC server, MLflow store,
  Triton repository, Kafka lifecycle publisher, reconcile loop) in a thread with its own event
  loop, on a free port, so blocking clients (the trainer, the CLI's client) can call it.
- ``training_settings`` points the trainer at a test's storage, Feast project, MLflow server
  and registry, with few epochs.
- ``read_lifecycle`` reads a test's models.lifecycle topic from the beginning.
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from pathlib import Path

from pydantic import SecretStr

from services.registry.main import RegistryApp
from services.registry.settings import RegistrySettings
from services.shared.codecs import header
from services.shared.kafka import create_consumer
from services.shared.proto.mlops.v1 import models_pb2
from services.shared.settings import (
    FeastSettings,
    KafkaSettings,
    MlflowSettings,
    RegistryClientSettings,
    StorageSettings,
    TritonSettings,
)
from services.shared.topics import Topics
from services.training.settings import TrainingParams, TrainingSettings

TOKEN = "test-registry-token"  # a test value, not a secret


def unique_model_name() -> str:
    return f"fraud_{uuid.uuid4().hex[:8]}"


class RegistryInThread:
    def __init__(self, settings: RegistrySettings) -> None:
        self.settings = settings
        self.app: RegistryApp | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._run, name="registry", daemon=True)

    def _run(self) -> None:
        asyncio.run(self._main())

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        try:
            self.app = RegistryApp(self.settings)
            await self.app.start()
        except Exception as exc:  # noqa: BLE001 - handed to the thread that starts us
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        await self._stop.wait()
        await self.app.stop()

    def start(self, timeout_s: float = 60.0) -> RegistryInThread:
        self._thread.start()
        if not self._ready.wait(timeout_s):
            raise TimeoutError("the registry did not start")
        if self._error is not None:
            raise self._error
        return self

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(30)

    @property
    def port(self) -> int:
        assert self.app is not None
        return self.app.port

    def client_settings(self, token: str = TOKEN) -> RegistryClientSettings:
        return RegistryClientSettings(
            address=f"127.0.0.1:{self.port}",
            token=SecretStr(token),
            token_file=Path("does-not-exist"),
            model_name=self.settings.model_name,
        )

    def reconcile(self) -> None:
        """Run one reconcile pass on the registry's loop and wait for it."""
        assert self.app is not None and self._loop is not None
        future = asyncio.run_coroutine_threadsafe(self.app.servicer.reconcile(), self._loop)
        future.result(120)


def registry_settings(
    kafka: KafkaSettings, mlflow: MlflowSettings, triton: TritonSettings, **overrides: object
) -> RegistrySettings:
    values: dict[str, object] = {
        "port": 0,
        "token": SecretStr(TOKEN),
        "model_name": unique_model_name(),
        "mlflow": mlflow,
        "triton": triton,
        "kafka": kafka,
        "reconcile_interval_s": 3600.0,
        **overrides,
    }
    return RegistrySettings.model_validate(values)


FAST_PARAMS = TrainingParams(epochs=12, patience=4, baseline_max_iter=60)


def training_settings(
    storage: StorageSettings,
    feast: FeastSettings,
    mlflow: MlflowSettings,
    registry: RegistryClientSettings,
    params: TrainingParams = FAST_PARAMS,
) -> TrainingSettings:
    return TrainingSettings.model_validate(
        {
            "storage": storage,
            "feast": feast,
            "mlflow": mlflow,
            "registry": registry,
            "params": params,
        }
    )


async def read_lifecycle(
    kafka: KafkaSettings, at_least: int, timeout_s: float = 30.0
) -> list[models_pb2.ModelEvent]:
    """Every ModelEvent on the test's lifecycle topic (waits until ``at_least`` arrived)."""
    topic = Topics.from_settings(kafka).lifecycle
    consumer = create_consumer(kafka, topic, group_id=None, client_id="test-lifecycle")
    await consumer.start()
    events: list[models_pb2.ModelEvent] = []
    deadline = time.monotonic() + timeout_s
    try:
        while len(events) < at_least and time.monotonic() < deadline:
            batches = await consumer.getmany(timeout_ms=500)
            for records in batches.values():
                for record in records:
                    assert header(record.headers, "message-type") == "mlops.v1.ModelEvent"
                    event = models_pb2.ModelEvent()
                    event.ParseFromString(record.value)
                    events.append(event)
    finally:
        await consumer.stop()
    return events
