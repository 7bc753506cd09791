"""Load test of the running prediction API with locust (gRPC): ``make loadtest``.

    make up && make loadtest USERS=50 DURATION=1m
    .venv/bin/locust -f loadtests/locustfile.py --headless --users 50 --spawn-rate 10 \\
        --run-time 1m --host 127.0.0.1:50051

Each locust user is one product-service client with its own gRPC channel, calling
``Predict`` back to back (and now and then ``PredictBatch`` with 16 transactions) for the
simulator's card holders and merchants (``user-00042``, ``merchant-0042``: the ones
``mlops simulate`` / ``mlops bootstrap`` gave online features), with the event time set to
the moment of the call. Without ``--host`` the address is the serving settings' own
(``MLOPS_SERVING_HOST`` / ``MLOPS_SERVING_PORT``, 127.0.0.1:50051). Locust reports every call
under ``grpc Predict`` / ``grpc PredictBatch``, failures with their status code.

This is the operator's smoke load against a live stack; the measured comparison with Triton
and a naive server is ``loadtests/bench_serving.py`` (``make bench``).
"""

from __future__ import annotations

import itertools
import random
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any

# grpc must cooperate with gevent (locust's workers) before any channel exists
import grpc
import grpc.experimental.gevent as grpc_gevent

grpc_gevent.init_gevent()

from locust import User, constant, events, task  # noqa: E402

from services.cli.simulator import SimulationConfig, TrafficSimulator  # noqa: E402
from services.serving.settings import ServingSettings  # noqa: E402
from services.shared.proto.mlops.v1 import (  # noqa: E402
    events_pb2,
    predictor_pb2,
    predictor_pb2_grpc,
)

POOL_SIZE = 5_000  # distinct transactions, cycled
BATCH_SIZE = 16
TIMEOUT_S = 2.0


def transaction_pool(seed: int = 42) -> list[events_pb2.Transaction]:
    """Valid transactions of the simulator's world (its default seed: the stack's users)."""
    simulator = TrafficSimulator(SimulationConfig(seed=seed, rate=1000.0))
    pool: list[events_pb2.Transaction] = []
    for event in simulator.live(datetime.now(UTC), max_transactions=POOL_SIZE):
        if event.kind == "transaction" and event.expect == "valid":
            pool.append(events_pb2.Transaction(**event.value))
    return pool


POOL = transaction_pool()


def default_address() -> str:
    settings = ServingSettings()
    host = "127.0.0.1" if settings.host in ("0.0.0.0", "") else settings.host
    return f"{host}:{settings.port}"


class PredictionClient(User):
    """A product service scoring its payments one by one (closed loop, no think time)."""

    wait_time = constant(0)

    def on_start(self) -> None:
        self.address = self.host or default_address()
        self.channel = grpc.insecure_channel(self.address)
        self.stub = predictor_pb2_grpc.PredictorStub(self.channel)
        start = random.randrange(len(POOL))
        self.transactions: Iterator[events_pb2.Transaction] = itertools.islice(
            itertools.cycle(POOL), start, None
        )

    def on_stop(self) -> None:
        self.channel.close()

    def _next(self) -> events_pb2.Transaction:
        transaction = events_pb2.Transaction()
        transaction.CopyFrom(next(self.transactions))
        transaction.event_time = datetime.now(UTC).isoformat()
        return transaction

    def _call(self, name: str, call: Callable[[], Any], size: Callable[[Any], int]) -> None:
        started = time.perf_counter()
        reply: Any = None
        error: Exception | None = None
        try:
            reply = call()
        except grpc.RpcError as exc:
            error = exc
        events.request.fire(
            request_type="grpc",
            name=name if error is None else f"{name} {error.code().name}",  # type: ignore[attr-defined]
            response_time=(time.perf_counter() - started) * 1000.0,
            response_length=size(reply) if reply is not None else 0,
            exception=error,
            context={"address": self.address},
        )

    @task(20)
    def predict(self) -> None:
        request = predictor_pb2.PredictRequest(transaction=self._next())
        self._call(
            "Predict",
            lambda: self.stub.Predict(request, timeout=TIMEOUT_S),
            lambda reply: reply.ByteSize(),
        )

    @task(1)
    def predict_batch(self) -> None:
        request = predictor_pb2.PredictBatchRequest(
            requests=[
                predictor_pb2.PredictRequest(transaction=self._next()) for _ in range(BATCH_SIZE)
            ]
        )
        self._call(
            "PredictBatch",
            lambda: self.stub.PredictBatch(request, timeout=TIMEOUT_S),
            lambda reply: reply.ByteSize(),
        )
