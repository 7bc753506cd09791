"""Hostile calls to the gRPC APIs: every method of ``mlops.v1.Predictor`` and
``mlops.v1.ModelRegistry`` with fuzzed, oversized and missing fields (hypothesis builds the
request messages from their descriptors). Every call gets a deliberate status (never
UNKNOWN or INTERNAL; INVALID_ARGUMENT names a field of the request), a message over the 16 MiB
limit gets RESOURCE_EXHAUSTED, a PredictBatch over ``max_batch_requests`` INVALID_ARGUMENT, and the
server answers a valid call afterwards.

Predictor runs behind its real gRPC server (services.shared.grpc_server) with an in-memory
online store and scorer (what is fuzzed is the API's handling of input, not Triton); the
registry is the real service against the session's MLflow, Triton and broker.
"""

from __future__ import annotations

import asyncio
import math
import re
from typing import Any

import grpc
import numpy as np
import pytest
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from registry_harness import TOKEN, RegistryInThread, registry_settings

from services.serving.prediction_log import PredictionLog
from services.serving.predictor import Predictor
from services.serving.routing import CanaryRouter, RoutingTable, ServedModel
from services.serving.servicer import SERVICE_NAME, PredictorServicer
from services.shared.grpc_server import GrpcServer
from services.shared.proto.mlops.v1 import (
    events_pb2,
    predictor_pb2,
    predictor_pb2_grpc,
    registry_pb2,
)
from services.shared.settings import KafkaSettings, MlflowSettings, TritonSettings
from services.shared.usecase.features import MERCHANT_FEATURES, USER_FEATURES

ALLOWED = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.ALREADY_EXISTS,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.UNAUTHENTICATED,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.UNAVAILABLE,  # a dependency (MLflow, Triton) refused what it was given
}
TOO_BIG = 17 * 1024 * 1024  # over the servers' 16 MiB receive limit

_INT_RANGES = {
    FieldDescriptor.TYPE_INT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SINT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_INT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SINT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_UINT32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_UINT64: (0, 2**64 - 1),
}
texts = st.one_of(
    st.text(st.characters(codec="utf-8"), max_size=40),
    st.sampled_from(["", " ", "production", "canary", "fraud_detector", "1", "-1"]),
    st.integers(1000, 300_000).map(lambda n: "x" * n),  # oversized fields
)


def _value(field: FieldDescriptor, depth: int) -> st.SearchStrategy[Any]:
    if field.type == FieldDescriptor.TYPE_MESSAGE:
        return messages(field.message_type, depth + 1)
    if field.type == FieldDescriptor.TYPE_STRING:
        return texts
    if field.type == FieldDescriptor.TYPE_BYTES:
        return st.binary(max_size=64)
    if field.type == FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if field.type in (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT):
        finite = field.type == FieldDescriptor.TYPE_DOUBLE
        return st.floats(allow_nan=True, allow_infinity=True, width=64 if finite else 32)
    if field.type == FieldDescriptor.TYPE_ENUM:
        return st.sampled_from([v.number for v in field.enum_type.values] + [99])
    low, high = _INT_RANGES.get(field.type, (-(2**31), 2**31 - 1))
    return st.one_of(
        st.integers(low, high), st.sampled_from([0, 1, 2, -1]).filter(lambda v: low <= v <= high)
    )


@st.composite
def _message(draw: st.DrawFn, descriptor: Descriptor, depth: int) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for field in descriptor.fields:
        if depth > 2 and field.type == FieldDescriptor.TYPE_MESSAGE:
            continue
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            continue  # maps: left empty
        if not draw(st.booleans()):
            continue  # missing
        if field.label == FieldDescriptor.LABEL_REPEATED:
            values[field.name] = draw(st.lists(_value(field, depth), max_size=3))
        else:
            values[field.name] = draw(_value(field, depth))
    return values


def messages(descriptor: Descriptor, depth: int = 0) -> st.SearchStrategy[Any]:
    return _message(descriptor, depth)


def build(message_type: type[Message], values: dict[str, Any]) -> Message:
    message = message_type()
    _fill(message, values)
    return message


def _fill(message: Message, values: dict[str, Any]) -> None:
    for name, value in values.items():
        field = message.DESCRIPTOR.fields_by_name[name]
        if field.type == FieldDescriptor.TYPE_MESSAGE:
            if field.label == FieldDescriptor.LABEL_REPEATED:
                for item in value:
                    _fill(getattr(message, name).add(), item)
            else:
                _fill(getattr(message, name), value)
        elif field.label == FieldDescriptor.LABEL_REPEATED:
            getattr(message, name).extend(value)
        else:
            setattr(message, name, value)


def _call(channel: grpc.Channel, service: str, method: str, payload: bytes, token: str) -> Any:
    call = channel.unary_unary(
        f"/{service}/{method}", request_serializer=None, response_deserializer=None
    )
    try:
        call(payload, timeout=30, metadata=[("authorization", f"Bearer {token}")])
    except grpc.RpcError as exc:
        return exc.code(), exc.details() or ""
    return grpc.StatusCode.OK, ""


def _methods(service: Any) -> list[tuple[str, type[Message]]]:
    from google.protobuf import symbol_database

    db = symbol_database.Default()
    return [(m.name, db.GetSymbol(m.input_type.full_name)) for m in service.methods]


def _fuzz_method(
    channel: grpc.Channel,
    service: str,
    method: str,
    request_type: type[Message],
    examples: int,
    seen: set[str],
) -> None:
    @settings(
        max_examples=examples,
        deadline=None,
        derandomize=True,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(messages(request_type.DESCRIPTOR), st.sampled_from([TOKEN, "", "wrong"]))
    def check(values: dict[str, Any], token: str) -> None:
        payload = build(request_type, values).SerializeToString()
        code, details = _call(channel, service, method, payload, token)
        assert code in ALLOWED, (method, values, code, details)
        if code == grpc.StatusCode.INVALID_ARGUMENT:  # names the field: "field[.sub]: why"
            named = re.split(r"[.\[:]", details, maxsplit=1)[0]
            assert named in request_type.DESCRIPTOR.fields_by_name, (method, values, details)
        seen.add(code.name)

    check()
    # bytes that are no message of the type, and a message over the limit
    code, details = _call(channel, service, method, b"\xff\xff\xff\x0f", TOKEN)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "request" in details, (method, code)
    code, _ = _call(channel, service, method, b"\x0a" + b"x" * TOO_BIG, TOKEN)
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, (method, code)


def _fuzz_service(channel: grpc.Channel, service: Any, examples: int) -> dict[str, set[str]]:
    seen: dict[str, set[str]] = {}
    for method, request_type in _methods(service):
        _fuzz_method(
            channel,
            service.full_name,
            method,
            request_type,
            examples,
            seen.setdefault(method, set()),
        )
    return seen


# ----------------------------------------------------------------------------- Predictor


class MemoryFeatures:
    from types import SimpleNamespace

    layout = SimpleNamespace(join_keys=["user_id", "merchant_id"])

    async def read(self, entities: dict[str, list[str]], timeout_s: float | None = None) -> Any:
        n = len(entities["user_id"])
        m = len(entities["merchant_id"])
        return {
            **{name: [None] * n for name in USER_FEATURES},
            **{name: [None] * m for name in MERCHANT_FEATURES},
        }


class HalfScorer:
    async def score(self, version: int, features: np.ndarray, timeout_s: float) -> np.ndarray:
        return np.full(features.shape[0], 0.5, dtype=np.float32)


def _never_started() -> Any:
    raise AssertionError("the prediction log is not started here")


def _valid_transaction() -> events_pb2.Transaction:
    from datetime import UTC, datetime

    return events_pb2.Transaction(
        transaction_id="tx-ok",
        user_id="u-1",
        merchant_id="m-1",
        amount=10.0,
        currency="EUR",
        channel="web",
        country="FR",
        event_time=datetime.now(UTC).isoformat(),
    )


async def test_predictor_answers_hostile_calls_with_deliberate_statuses_and_keeps_serving() -> None:
    predictor = Predictor(
        model_name="fraud_detector",
        router=CanaryRouter(RoutingTable(production=ServedModel(1, "production", 100, 0.5))),
        features=MemoryFeatures(),  # type: ignore[arg-type]
        scorer=HalfScorer(),  # type: ignore[arg-type]
        prediction_log=PredictionLog(_never_started, "predictions.log", capacity=100_000),
        max_batch_requests=1000,
    )
    server = GrpcServer(host="127.0.0.1", port=0, service_names=[SERVICE_NAME])
    predictor_pb2_grpc.add_PredictorServicer_to_server(PredictorServicer(predictor), server.server)
    await server.start()
    try:
        # the fuzzing client is synchronous (hypothesis): in a thread, the server on this loop
        await asyncio.to_thread(_fuzz_predictor, server.port)
    finally:
        await server.stop(1)
        await predictor.close()


def _fuzz_predictor(port: int) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        seen = _fuzz_service(channel, predictor_pb2.DESCRIPTOR.services_by_name["Predictor"], 25)
        assert "INVALID_ARGUMENT" in seen["Predict"]  # the fuzzing did reach validation
        stub = predictor_pb2_grpc.PredictorStub(channel)
        too_many = predictor_pb2.PredictBatchRequest(
            requests=[predictor_pb2.PredictRequest(transaction=_valid_transaction())] * 1001
        )
        with pytest.raises(grpc.RpcError) as caught:
            stub.PredictBatch(too_many, timeout=10)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "requests" in (caught.value.details() or "")
        answer = stub.Predict(
            predictor_pb2.PredictRequest(transaction=_valid_transaction()), timeout=10
        )
        assert math.isclose(answer.fraud_probability, 0.5, rel_tol=1e-6)


# ----------------------------------------------------------------------------- registry


def test_registry_answers_hostile_calls_with_deliberate_statuses_and_keeps_serving(
    kafka: KafkaSettings, mlflow_server: MlflowSettings, triton_server: TritonSettings
) -> None:
    from services.shared.proto.mlops.v1 import registry_pb2_grpc

    registry = RegistryInThread(registry_settings(kafka, mlflow_server, triton_server)).start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{registry.port}") as channel:
            seen = _fuzz_service(
                channel, registry_pb2.DESCRIPTOR.services_by_name["ModelRegistry"], 5
            )
            assert any("INVALID_ARGUMENT" in codes for codes in seen.values())
            assert "INVALID_ARGUMENT" in seen["SetAlias"]  # an unset or unknown ModelAlias
            stub = registry_pb2_grpc.ModelRegistryStub(channel)
            for selector in (0, 99):  # an alias that is no ModelAlias names the field
                with pytest.raises(grpc.RpcError) as caught:
                    stub.GetModelVersion(
                        registry_pb2.GetModelVersionRequest(alias=selector),  # type: ignore[arg-type]
                        timeout=30,
                    )
                assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                assert (caught.value.details() or "").startswith("alias:")
            routes = stub.GetRoutingTable(
                registry_pb2.GetRoutingTableRequest(model_name=registry.settings.model_name),
                timeout=30,
            )
            assert list(routes.routes) == []  # nothing fuzzed became production
            listed = stub.ListModelVersions(
                registry_pb2.ListModelVersionsRequest(model_name=registry.settings.model_name),
                timeout=30,
            )
            assert list(listed.versions) == []  # nothing fuzzed got registered
    finally:
        registry.stop()
