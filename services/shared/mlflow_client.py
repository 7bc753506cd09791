"""The platform's one adapter to MLflow: a lazily built client, MLflow's errors turned into the
platform's, and retries of what MLflow itself does not retry.

The registry (its metadata store) and training (experiment tracking) both call MLflow through
``MlflowConnection``, so a failure means the same thing in both:

- ``RESOURCE_DOES_NOT_EXIST`` / ``NOT_FOUND`` (and the ``INVALID_PARAMETER_VALUE`` MLflow answers
  for an unknown alias or version, whose message says "not found") -> ``NotFound``;
- ``RESOURCE_ALREADY_EXISTS`` -> ``AlreadyExists``; ``PERMISSION_DENIED`` -> ``PermissionDenied``;
  ``UNAUTHENTICATED`` -> ``Unauthenticated``;
- anything else MLflow raises (a server error, its HTTP layer giving up) and an ``OSError`` from
  below it -> ``Unavailable`` (retrying later may help).

Retries: MLflow's HTTP layer already retries a refused connection and 5xx answers for each
request (``MLFLOW_HTTP_REQUEST_MAX_RETRIES``). What reaches us as a bare ``OSError`` is a transfer
broken after the request was answered (an artifact's body cut off), which it does not retry;
``call`` retries those ``MlflowSettings.retry_attempts`` times. ``call_once`` is for calls that
create something (a run, a version), where a retry could create it twice.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from services.shared.errors import (
    AlreadyExists,
    NotFound,
    PermissionDenied,
    PlatformError,
    Unauthenticated,
    Unavailable,
)
from services.shared.logging import get_logger
from services.shared.settings import MlflowSettings

if TYPE_CHECKING:
    from mlflow import MlflowClient

log = get_logger("mlflow")
T = TypeVar("T")

_BY_ERROR_CODE: dict[str, type[PlatformError]] = {
    "RESOURCE_DOES_NOT_EXIST": NotFound,
    "NOT_FOUND": NotFound,
    "RESOURCE_ALREADY_EXISTS": AlreadyExists,
    "PERMISSION_DENIED": PermissionDenied,
    "UNAUTHENTICATED": Unauthenticated,
}


@dataclass(frozen=True)
class RunView:
    """One MLflow run, as the platform reads it."""

    run_id: str
    experiment_id: str
    status: str
    artifact_uri: str
    tags: Mapping[str, str]
    params: Mapping[str, str]
    metrics: Mapping[str, float]


def run_view(run: Any) -> RunView:
    """An ``mlflow.entities.Run`` as a ``RunView``."""
    return RunView(
        run_id=run.info.run_id,
        experiment_id=run.info.experiment_id,
        status=run.info.status,
        artifact_uri=run.info.artifact_uri,
        tags=dict(run.data.tags),
        params=dict(run.data.params),
        metrics=dict(run.data.metrics),
    )


def mlflow_error(what: str, exc: BaseException) -> PlatformError | None:
    """The platform's error for a failure of MLflow while trying to ``what``; None when ``exc``
    is not MLflow's (nor a connection's) to answer for."""
    from mlflow.exceptions import MlflowException, RestException

    if isinstance(exc, RestException):
        message = exc.message
        kind = _BY_ERROR_CODE.get(exc.error_code)
        if kind is None and exc.error_code == "INVALID_PARAMETER_VALUE":
            kind = NotFound if "not found" in message.lower() else None
        return (kind or Unavailable)(f"MLflow could not {what}: {message}")
    if isinstance(exc, MlflowException):
        return Unavailable(f"MLflow could not {what}: {exc.message}")
    if isinstance(exc, OSError):
        return Unavailable(f"MLflow could not {what}: {exc}")
    return None


class MlflowConnection:
    """``MlflowClient`` for the configured server, every call through ``call``/``call_once``."""

    def __init__(
        self, settings: MlflowSettings, *, sleep: Callable[[float], None] = time.sleep
    ) -> None:
        self.settings = settings
        self._client: MlflowClient | None = None
        self._sleep = sleep

    @property
    def client(self) -> MlflowClient:
        if self._client is None:
            from mlflow import MlflowClient

            self._client = MlflowClient(
                tracking_uri=self.settings.tracking_uri, registry_uri=self.settings.tracking_uri
            )
        return self._client

    def call(self, what: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """``fn(*args, **kwargs)``, retried after a broken transfer (``OSError``); MLflow's
        errors raised as the platform's. For calls that are safe to repeat."""
        return self._attempt(self.settings.retry_attempts, what, fn, *args, **kwargs)

    def call_once(self, what: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """``fn(*args, **kwargs)`` once (it creates something); errors as the platform's."""
        return self._attempt(1, what, fn, *args, **kwargs)

    def _attempt(
        self, attempts: int, what: str, fn: Callable[..., T], *args: Any, **kwargs: Any
    ) -> T:
        for attempt in range(1, max(1, attempts) + 1):
            try:
                return fn(*args, **kwargs)
            except Exception as exc:
                error = mlflow_error(what, exc)
                if error is None:
                    raise
                if not isinstance(exc, OSError) or attempt >= attempts:
                    raise error from exc
                log.warning("mlflow_retry", what=what, attempt=attempt, error=repr(exc))
                self._sleep(self.settings.retry_backoff_s * 2 ** (attempt - 1))
        raise AssertionError("unreachable: the last attempt returns or raises")

    def run(self, run_id: str) -> RunView:
        return run_view(self.call(f"get run {run_id}", self.client.get_run, run_id))

    def download(self, run_id: str, artifact_path: str) -> bytes:
        """An artifact's bytes (downloaded to a temporary directory, read, deleted)."""
        with tempfile.TemporaryDirectory(prefix="mlops-artifact-") as tmp:
            local = self.call(
                f"download {artifact_path} of run {run_id}",
                self.client.download_artifacts,
                run_id,
                artifact_path,
                tmp,
            )
            return Path(local).read_bytes()
