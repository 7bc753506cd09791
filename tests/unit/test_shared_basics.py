"""Shared building blocks: topics, logging format, error codes, token checks."""

from __future__ import annotations

import json
import logging

import grpc
import pytest

from services.shared.errors import (
    IntegrityError,
    InvalidArgument,
    PermissionDenied,
    PlatformError,
    Unauthenticated,
)
from services.shared.grpc_server import BearerTokenAuth
from services.shared.logging import configure_logging, get_logger
from services.shared.settings import KafkaSettings
from services.shared.topics import Topics


def test_topics_follow_the_contract_and_take_the_prefix() -> None:
    plain = Topics.from_settings(KafkaSettings())
    assert plain.transactions == "events.transactions"
    assert plain.lifecycle == "models.lifecycle"
    assert set(plain.all()) >= {
        "events.transactions",
        "events.labels",
        "events.validated",
        "events.dlq",
        "predictions.log",
        "monitoring.drift",
        "training.requests",
        "models.lifecycle",
    }
    prefixed = Topics.from_settings(KafkaSettings(topic_prefix="t1."))
    assert all(name.startswith("t1.") for name in prefixed.all())
    assert len(set(prefixed.all())) == len(prefixed.all())


def test_errors_carry_their_status_codes() -> None:
    error = InvalidArgument("transaction.amount", "must be greater than 0")
    assert error.grpc_code is grpc.StatusCode.INVALID_ARGUMENT
    assert error.http_status == 400
    assert str(error) == "transaction.amount: must be greater than 0"
    assert error.field == "transaction.amount"
    assert IntegrityError("x").grpc_code is grpc.StatusCode.DATA_LOSS
    assert issubclass(Unauthenticated, PlatformError)
    assert InvalidArgument("f", "bad", code="out_of_range").code == "out_of_range"


@pytest.mark.parametrize("fmt", ["logfmt", "json"])
def test_log_lines_are_structured(fmt: str, capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("INFO", fmt)  # type: ignore[arg-type]
    try:
        get_logger("test").info("event_rejected", transaction_id="t 1", reason_code="x")
        line = capsys.readouterr().err.strip().splitlines()[-1]
    finally:
        logging.getLogger().handlers.clear()
    if fmt == "json":
        record = json.loads(line)
        assert record["event"] == "event_rejected"
        assert record["transaction_id"] == "t 1"
        assert record["logger"] == "mlops.test"
    else:
        assert "event=event_rejected" in line
        assert 'transaction_id="t 1"' in line
        assert "level=info" in line


def test_bearer_token_auth() -> None:
    auth = BearerTokenAuth("s3cret", ["SetAlias"])
    auth.check("ListModelVersions", [])  # read-only: no token needed
    auth.check("SetAlias", [("authorization", "Bearer s3cret")])
    with pytest.raises(Unauthenticated):
        auth.check("SetAlias", [])
    with pytest.raises(Unauthenticated):
        auth.check("SetAlias", [("authorization", "Basic s3cret")])
    with pytest.raises(PermissionDenied):
        auth.check("SetAlias", [("authorization", "Bearer wrong")])
    with pytest.raises(ValueError, match="token is required"):
        BearerTokenAuth("", ["SetAlias"])
