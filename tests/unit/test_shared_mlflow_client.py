"""The one MLflow adapter: MLflow's errors as the platform's, and which failures are retried."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import requests
from mlflow.exceptions import MlflowException, RestException

from services.shared.errors import (
    AlreadyExists,
    NotFound,
    PermissionDenied,
    Unauthenticated,
    Unavailable,
)
from services.shared.mlflow_client import MlflowConnection, mlflow_error
from services.shared.settings import MlflowSettings


def rest(code: str, message: str = "something") -> RestException:
    return RestException({"error_code": code, "message": message})


@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        (rest("RESOURCE_DOES_NOT_EXIST"), NotFound),
        (rest("NOT_FOUND"), NotFound),
        (rest("INVALID_PARAMETER_VALUE", "Registered model alias canary not found."), NotFound),
        (rest("INVALID_PARAMETER_VALUE", "Invalid value for max_results"), Unavailable),
        (rest("RESOURCE_ALREADY_EXISTS"), AlreadyExists),
        (rest("PERMISSION_DENIED"), PermissionDenied),
        (rest("UNAUTHENTICATED"), Unauthenticated),
        (rest("INTERNAL_ERROR"), Unavailable),
        (MlflowException("API request to /api/2.0/x failed with exception ..."), Unavailable),
        (requests.exceptions.ChunkedEncodingError("connection broken"), Unavailable),
        (ConnectionResetError("reset by peer"), Unavailable),
    ],
)
def test_mlflow_failures_become_the_platforms_errors(exc: Exception, expected: type) -> None:
    error = mlflow_error("get run r1", exc)
    assert type(error) is expected
    assert error is not None and "get run r1" in error.message


def test_errors_that_are_not_mlflows_are_not_translated() -> None:
    assert mlflow_error("x", ValueError("a bug")) is None


class Flaky:
    """Fails with the given errors in turn, then answers."""

    def __init__(self, *errors: Exception) -> None:
        self.errors = list(errors)
        self.calls = 0

    def __call__(self, value: str) -> str:
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        return value


def connection(attempts: int = 3) -> tuple[MlflowConnection, list[float]]:
    pauses: list[float] = []
    settings = MlflowSettings(retry_attempts=attempts, retry_backoff_s=0.5)
    return MlflowConnection(settings, sleep=pauses.append), pauses


def test_a_broken_transfer_is_retried_with_a_doubling_pause() -> None:
    mlflow, pauses = connection()
    flaky = Flaky(ConnectionResetError("reset"), requests.exceptions.ChunkedEncodingError("cut"))
    assert mlflow.call("download", flaky, "bytes") == "bytes"
    assert (flaky.calls, pauses) == (3, [0.5, 1.0])


def test_retries_stop_after_the_configured_attempts() -> None:
    mlflow, pauses = connection(attempts=2)
    flaky = Flaky(*(ConnectionResetError("reset") for _ in range(5)))
    with pytest.raises(Unavailable, match="download"):
        mlflow.call("download", flaky, "bytes")
    assert (flaky.calls, pauses) == (2, [0.5])


@pytest.mark.parametrize(
    "failure",
    [
        rest("RESOURCE_DOES_NOT_EXIST"),  # an answer: asking again changes nothing
        MlflowException("API request failed"),  # MLflow's HTTP layer already retried
    ],
)
def test_answers_and_mlflows_own_give_ups_are_not_retried(failure: Exception) -> None:
    mlflow, pauses = connection()
    flaky = Flaky(failure)
    with pytest.raises((NotFound, Unavailable)):
        mlflow.call("get run", flaky, "x")
    assert (flaky.calls, pauses) == (1, [])


def test_a_call_that_creates_something_is_never_repeated() -> None:
    mlflow, pauses = connection()
    flaky = Flaky(ConnectionResetError("reset"))
    with pytest.raises(Unavailable):
        mlflow.call_once("create a version", flaky, "x")
    assert (flaky.calls, pauses) == (1, [])


@pytest.mark.parametrize("call", ["call", "call_once"])
def test_a_bug_propagates_unchanged(call: str) -> None:
    mlflow, _ = connection()
    method: Callable[..., Any] = getattr(mlflow, call)
    with pytest.raises(KeyError):
        method("get run", Flaky(KeyError("bug")), "x")
