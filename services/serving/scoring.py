"""Scoring feature matrices on Triton over gRPC (tritonclient's asyncio client).

One client, one HTTP/2 channel for the process: requests of every batch share it, nothing is
set up per request. Each call names the model version it wants, so a version switch in the
routing table never sends a request to a version Triton was not asked for. Every call carries
a timeout taken from the caller's deadline; whatever goes wrong (Triton down, the version not
loaded, its backend stub dead, no answer in time) is an ``Unavailable``.
"""

from __future__ import annotations

import numpy as np
import tritonclient.grpc.aio as tritonaio
from tritonclient.grpc import InferInput, InferRequestedOutput
from tritonclient.utils import InferenceServerException

from services.shared.errors import Unavailable
from services.shared.settings import TritonSettings
from services.shared.usecase.model import TRITON_INPUT, TRITON_OUTPUT

_MAX_MESSAGE = 64 * 1024 * 1024
# after Triton restarts, reconnect within a second instead of gRPC's default backoff (<=120 s)
_CHANNEL_ARGS = [
    ("grpc.max_send_message_length", _MAX_MESSAGE),
    ("grpc.max_receive_message_length", _MAX_MESSAGE),
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
]


class VersionNotServed(Unavailable):
    """Triton is up but does not serve the version asked for (not loaded, or unloaded)."""


def _not_served(exc: InferenceServerException) -> bool:
    # Triton answers NOT_FOUND for a version it never loaded and UNAVAILABLE "... is not at
    # ready state" for one it has unloaded (both start "Request for unknown model")
    return exc.status() == "StatusCode.NOT_FOUND" or "unknown model" in (exc.message() or "")


class TritonScorer:
    """Fraud probabilities for a matrix of model inputs, from one version of the model."""

    def __init__(self, settings: TritonSettings, model_name: str) -> None:
        self.model_name = model_name
        self.url = settings.grpc_url
        self._client = tritonaio.InferenceServerClient(self.url, channel_args=_CHANNEL_ARGS)
        self._output = [InferRequestedOutput(TRITON_OUTPUT)]

    async def score(self, version: int, features: np.ndarray, timeout_s: float) -> np.ndarray:
        """One probability per row of ``features`` (float32, [rows, inputs])."""
        if timeout_s <= 0:
            raise Unavailable(f"no time left to call Triton for {self.model_name} v{version}")
        matrix = np.ascontiguousarray(features, dtype=np.float32)
        tensor = InferInput(TRITON_INPUT, list(matrix.shape), "FP32")
        tensor.set_data_from_numpy(matrix)
        try:
            result = await self._client.infer(
                self.model_name,
                [tensor],
                model_version=str(version),
                outputs=self._output,
                client_timeout=timeout_s,
            )
        except InferenceServerException as exc:
            error = VersionNotServed if _not_served(exc) else Unavailable
            raise error(
                f"Triton {self.url} could not score {self.model_name} v{version}: "
                f"{exc.status() or ''} {exc.message()}".strip()
            ) from exc
        scores = result.as_numpy(TRITON_OUTPUT)
        if scores is None or scores.shape[0] != matrix.shape[0]:
            raise Unavailable(f"Triton answered {self.model_name} v{version} without scores")
        return scores.reshape(-1)

    async def close(self) -> None:
        await self._client.close()
