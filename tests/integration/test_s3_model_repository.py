"""The model repository on object storage, against a real S3-compatible server (moto's server
mode, over HTTP) and a real Triton reading ``s3://`` itself: the same files and checksums as
the local directory, refusals on a checksum mismatch, and a version switch under concurrent
inference with no failed request."""

from __future__ import annotations

import asyncio
import io
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import tritonclient.grpc.aio as tritonaio
from tritonclient.utils import InferenceServerException

from services.cli import localinfra
from services.registry.s3_repository import S3TritonModelRepository, s3_client, triton_location
from services.registry.triton_repository import MODEL_FILE, sha256_hex
from services.shared.errors import IntegrityError
from services.shared.settings import ObjectStorageSettings, TritonSettings
from services.shared.usecase.features import MODEL_INPUTS, TRITON_INPUT, TRITON_OUTPUT
from services.shared.usecase.model import FraudMLP

MODEL = "fraud_detector"
BUCKET = "mlops-models"


def torchscript(seed: int) -> bytes:
    torch.manual_seed(seed)
    n = len(MODEL_INPUTS)
    model = FraudMLP(torch.rand(n), torch.rand(n) + 0.5, hidden=(16, 8)).eval()
    buffer = io.BytesIO()
    torch.jit.save(torch.jit.script(model), buffer)
    return buffer.getvalue()


def local_scores(payload: bytes, rows: np.ndarray) -> np.ndarray:
    model = torch.jit.load(io.BytesIO(payload))
    with torch.inference_mode():
        return model(torch.from_numpy(rows)).numpy().reshape(-1)


@pytest.fixture(scope="module")
def object_store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ObjectStorageSettings]:
    port = localinfra.free_port()
    log = tmp_path_factory.mktemp("moto") / "moto.log"
    spec = localinfra.ProcessSpec(
        name="moto",
        command=[sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        ready=lambda: localinfra.http_ok(f"http://127.0.0.1:{port}/moto-api/"),
        startup_timeout_s=60,
    )
    process = localinfra.RunningProcess(spec, log)
    settings = ObjectStorageSettings(
        endpoint_url=f"http://127.0.0.1:{port}",
        access_key_id="test-key",  # type: ignore[arg-type]
        secret_access_key="test-secret",  # type: ignore[arg-type]
    )
    s3_client(settings).create_bucket(Bucket=BUCKET)
    try:
        yield settings
    finally:
        process.stop()


@pytest.fixture(scope="module")
def s3_triton(
    object_store: ObjectStorageSettings, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[TritonSettings]:
    ports = [localinfra.free_port() for _ in range(3)]
    # Triton refuses to start on a location with nothing under it: the marker the dev
    # overlay's bucket Job writes (and any object under the prefix) makes it a directory
    s3_client(object_store).put_object(Bucket=BUCKET, Key="triton/.keep", Body=b"")
    settings = TritonSettings(
        http_port=ports[0],
        grpc_port=ports[1],
        metrics_port=ports[2],
        model_repository_url=f"s3://{BUCKET}/triton",
    )
    spec = localinfra.triton(*ports, model_repository=Path("unused"))
    location = triton_location(settings, object_store)
    assert location == f"s3://{object_store.endpoint_url.split('//')[1]}/{BUCKET}/triton"
    command = [
        f"--model-repository={location}" if part.startswith("--model-repository=") else part
        for part in spec.command
    ]
    env = {
        **spec.env,
        "AWS_ACCESS_KEY_ID": object_store.access_key_id.get_secret_value(),
        "AWS_SECRET_ACCESS_KEY": object_store.secret_access_key.get_secret_value(),
        "AWS_DEFAULT_REGION": object_store.region,
    }
    process = localinfra.RunningProcess(
        localinfra.ProcessSpec(
            name="triton-s3",
            command=command,
            env=env,
            ready=spec.ready,
            startup_timeout_s=spec.startup_timeout_s,
        ),
        tmp_path_factory.mktemp("triton-s3") / "triton.log",
    )
    try:
        yield settings
    finally:
        process.stop()


def test_versions_are_written_with_their_checksums_and_refused_without(
    object_store: ObjectStorageSettings,
) -> None:
    settings = TritonSettings(model_repository_url=f"s3://{BUCKET}/checks")
    repository = S3TritonModelRepository(settings, MODEL, object_store)
    payload = torchscript(1)
    with pytest.raises(IntegrityError):
        repository.write_version(1, payload, "0" * 64)
    assert not repository.has_version(1)

    repository.write_version(1, payload, sha256_hex(payload))
    assert repository.has_version(1) and repository.verify_version(1)
    client = s3_client(object_store)
    key = f"checks/{MODEL}/1/"
    stored = client.get_object(Bucket=BUCKET, Key=key + MODEL_FILE)["Body"].read()
    marker = client.get_object(Bucket=BUCKET, Key=key + f"{MODEL_FILE}.sha256")["Body"].read()
    # the same files and checksum line as the local directory (the backend verifies it)
    assert stored == payload
    assert marker.decode() == f"{sha256_hex(payload)}  {MODEL_FILE}\n"
    assert client.get_object(Bucket=BUCKET, Key=key + "model.py")["Body"].read()

    # a model file changed behind the registry's back no longer verifies
    client.put_object(Bucket=BUCKET, Key=key + MODEL_FILE, Body=payload + b"tampered")
    assert not repository.verify_version(1)
    repository.write_version(1, payload, sha256_hex(payload))  # republished intact
    assert repository.verify_version(1)


async def test_triton_serves_from_s3_and_switches_versions_without_a_failed_request(
    s3_triton: TritonSettings, object_store: ObjectStorageSettings
) -> None:
    repository = S3TritonModelRepository(s3_triton, MODEL, object_store)
    n_inputs = len(MODEL_INPUTS)
    models = {v: torchscript(v) for v in (1, 2)}
    rows = np.random.default_rng(0).random((4, n_inputs), dtype=np.float32)

    await asyncio.to_thread(repository.write_version, 1, models[1], sha256_hex(models[1]))
    await asyncio.to_thread(repository.write_config, [1], n_inputs)
    await asyncio.to_thread(repository.load)
    assert await asyncio.to_thread(repository.ready_versions) == [1]
    served = await asyncio.to_thread(repository.infer, 1, rows)
    np.testing.assert_allclose(served, local_scores(models[1], rows), rtol=1e-5, atol=1e-6)

    client = tritonaio.InferenceServerClient(s3_triton.grpc_url)
    stop = asyncio.Event()
    counts = {"ok": 0, "failed": 0}
    target = {"ok": 50}
    reached = asyncio.Event()

    async def caller() -> None:
        tensor = tritonaio.InferInput(TRITON_INPUT, [1, n_inputs], "FP32")
        tensor.set_data_from_numpy(rows[:1])
        while not stop.is_set():
            try:  # no version: the newest Triton serves, as serving asks during a switch
                await client.infer(
                    MODEL, [tensor], outputs=[tritonaio.InferRequestedOutput(TRITON_OUTPUT)]
                )
                counts["ok"] += 1
                if counts["ok"] >= target["ok"]:
                    reached.set()
            except InferenceServerException:
                counts["failed"] += 1

    callers = [asyncio.create_task(caller()) for _ in range(8)]
    try:
        await asyncio.wait_for(reached.wait(), 60)  # traffic flows before the switch
        # the switch: v2's files, then a config naming both, then the load; v1 until then
        await asyncio.to_thread(repository.write_version, 2, models[2], sha256_hex(models[2]))
        await asyncio.to_thread(repository.write_config, [1, 2], n_inputs)
        await asyncio.to_thread(repository.load)
        assert await asyncio.to_thread(repository.ready_versions) == [1, 2]
        await asyncio.to_thread(repository.write_config, [2], n_inputs)
        await asyncio.to_thread(repository.load)
        reached.clear()
        target["ok"] = counts["ok"] + 50
        await asyncio.wait_for(reached.wait(), 60)  # and after it
    finally:
        stop.set()
        await asyncio.gather(*callers)
        await client.close()
    assert counts["failed"] == 0, counts
    assert await asyncio.to_thread(repository.ready_versions) == [2]
    served = await asyncio.to_thread(repository.infer, 2, rows)
    np.testing.assert_allclose(served, local_scores(models[2], rows), rtol=1e-5, atol=1e-6)


def test_the_registry_opens_the_repository_its_settings_name(
    object_store: ObjectStorageSettings, tmp_path: Path
) -> None:
    from services.registry.s3_repository import open_model_repository

    on_s3 = open_model_repository(
        TritonSettings(model_repository_url=f"s3://{BUCKET}/x"), object_store, MODEL
    )
    local = open_model_repository(TritonSettings(model_repository=tmp_path), object_store, MODEL)
    assert isinstance(on_s3, S3TritonModelRepository)
    assert not isinstance(local, S3TritonModelRepository)
