"""gRPC transport of mlops.v1.Predictor: converts messages and calls the ``Predictor``.

Errors are ``PlatformError``s; the shared gRPC edge maps them to status codes.
"""

from __future__ import annotations

import grpc

from services.serving import metrics
from services.serving.predictor import Prediction, Predictor
from services.shared.errors import PlatformError
from services.shared.proto.mlops.v1 import predictor_pb2, predictor_pb2_grpc

SERVICE_NAME = predictor_pb2.DESCRIPTOR.services_by_name["Predictor"].full_name

_DECISIONS = {True: predictor_pb2.DECISION_DECLINE, False: predictor_pb2.DECISION_APPROVE}


def to_response(prediction: Prediction) -> predictor_pb2.PredictResponse:
    return predictor_pb2.PredictResponse(
        transaction_id=prediction.transaction_id,
        fraud_probability=prediction.fraud_probability,
        decision=_DECISIONS[prediction.declined],
        model_name=prediction.model_name,
        model_version=prediction.model_version,
        degraded=prediction.degraded,
        request_id=prediction.request_id,
        route=prediction.route,  # type: ignore[arg-type]
    )


class PredictorServicer(predictor_pb2_grpc.PredictorServicer):
    def __init__(self, predictor: Predictor) -> None:
        self._predictor = predictor

    async def Predict(
        self, request: predictor_pb2.PredictRequest, context: grpc.aio.ServicerContext
    ) -> predictor_pb2.PredictResponse:
        try:
            prediction = await self._predictor.predict(
                request.transaction if request.HasField("transaction") else None,
                request.request_id,
                context.time_remaining(),
            )
        except PlatformError as exc:
            metrics.ERRORS.labels(exc.grpc_code.name).inc()
            raise
        return to_response(prediction)

    async def PredictBatch(
        self, request: predictor_pb2.PredictBatchRequest, context: grpc.aio.ServicerContext
    ) -> predictor_pb2.PredictBatchResponse:
        try:
            predictions = await self._predictor.predict_many(
                [
                    (r.transaction if r.HasField("transaction") else None, r.request_id)
                    for r in request.requests
                ],
                context.time_remaining(),
            )
        except PlatformError as exc:
            metrics.ERRORS.labels(exc.grpc_code.name).inc()
            raise
        return predictor_pb2.PredictBatchResponse(responses=[to_response(p) for p in predictions])
