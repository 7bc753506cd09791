"""gRPC server bootstrap shared by every gRPC service.

``GrpcServer`` builds a ``grpc.aio`` server with:
- ``grpc.health.v1.Health`` (``HealthStatus`` sets it per service) and server reflection;
- one interceptor that maps ``PlatformError`` to its status code (anything unexpected becomes
  INTERNAL, logged with its traceback, never a raw ``UNKNOWN``), checks the bearer token on
  mutating methods, and records Prometheus metrics per method and status code.
Servicers stay thin: they convert messages and call their service's domain object.
"""

from __future__ import annotations

import hmac
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import grpc
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import Counter, Histogram

from services.shared.errors import InvalidArgument, PermissionDenied, PlatformError, Unauthenticated
from services.shared.logging import get_logger
from services.shared.settings import GrpcTlsSettings
from services.shared.tls import server_credentials

log = get_logger("grpc")

GRPC_REQUESTS = Counter(
    "mlops_grpc_requests_total",
    "gRPC calls handled, by method and status code",
    ["method", "code"],
)
GRPC_LATENCY = Histogram(
    "mlops_grpc_request_seconds",
    "gRPC call latency, by method",
    ["method"],
    buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)

Behavior = Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]]


class BearerTokenAuth:
    """Checks ``authorization: Bearer <token>`` metadata on the methods given."""

    def __init__(self, token: str, mutating_methods: Iterable[str]) -> None:
        if not token:
            raise ValueError("a control-plane token is required for mutating methods")
        self._token = token.encode()
        self.methods = frozenset(mutating_methods)

    def check(self, method: str, metadata: Iterable[tuple[str, str | bytes]] | None) -> None:
        if method not in self.methods:
            return
        values = [v for k, v in metadata or () if k.lower() == "authorization"]
        if not values:
            raise Unauthenticated(f"{method} needs 'authorization: Bearer <token>' metadata")
        value = values[0] if isinstance(values[0], str) else values[0].decode()
        scheme, _, token = value.partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise Unauthenticated("authorization metadata must be 'Bearer <token>'")
        if not hmac.compare_digest(token.strip().encode(), self._token):
            raise PermissionDenied(f"the token is not allowed to call {method}")


_MAX_DETAIL = 1024


class _Undecodable:
    """What a request that is no message of its type deserialises to (gRPC would answer
    UNKNOWN for the deserializer's exception; the edge answers INVALID_ARGUMENT)."""

    __slots__ = ("error",)

    def __init__(self, error: str) -> None:
        self.error = error


def _tolerant(deserialize: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if deserialize is None:
        return None

    def tolerant(data: bytes) -> Any:
        try:
            return deserialize(data)
        except DecodeError as exc:
            return _Undecodable(str(exc))

    return tolerant


class _EdgeInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, auth: BearerTokenAuth | None) -> None:
        self._auth = auth
        # a method's handler never changes once the server runs: each is wrapped once and
        # reused (no closure, handler tuple or metric-label lookup per call on hot paths)
        self._wrapped: dict[str, grpc.RpcMethodHandler | None] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        method: str = handler_call_details.method
        try:
            return self._wrapped[method]
        except KeyError:
            pass
        handler = await continuation(handler_call_details)
        wrapped = self._wrap(method, handler)
        if handler is not None:  # unknown methods are not remembered (no unbounded cache)
            self._wrapped[method] = wrapped
        return wrapped

    def _wrap(
        self, method: str, handler: grpc.RpcMethodHandler | None
    ) -> grpc.RpcMethodHandler | None:
        if handler is None or handler.unary_unary is None:
            return handler
        short = method.rsplit("/", 1)[-1]
        auth = self._auth
        behavior: Behavior = handler.unary_unary
        latency = GRPC_LATENCY.labels(short)
        ok = GRPC_REQUESTS.labels(short, grpc.StatusCode.OK.name)

        async def wrapped(request: Any, context: grpc.aio.ServicerContext) -> Any:
            started = time.perf_counter()
            code = grpc.StatusCode.OK
            try:
                if auth is not None:
                    auth.check(short, context.invocation_metadata())
                if isinstance(request, _Undecodable):
                    raise InvalidArgument(
                        "request",
                        f"not a valid {short} request message: {request.error}",
                        code="malformed_request",
                    )
                return await behavior(request, context)
            except PlatformError as exc:
                code = exc.grpc_code
                # a message echoing a huge field would not fit gRPC's 8 KiB of trailers (the
                # caller would get RESOURCE_EXHAUSTED instead of the error): cut it
                detail = exc.message
                if len(detail) > _MAX_DETAIL:
                    detail = f"{detail[:_MAX_DETAIL]}... ({len(exc.message)} characters, cut)"
                log.info("rpc_error", method=short, code=code.name, reason=exc.code, detail=detail)
                await context.abort(code, detail)
            except grpc.aio.AbortError:
                code = context.code() or grpc.StatusCode.UNKNOWN
                raise
            except Exception as exc:  # the edge: nothing leaks as UNKNOWN
                code = grpc.StatusCode.INTERNAL
                log.exception("rpc_failed", method=short, error=type(exc).__name__)
                await context.abort(code, f"internal error: {type(exc).__name__}")
            finally:
                if code is grpc.StatusCode.OK:
                    ok.inc()
                else:
                    GRPC_REQUESTS.labels(short, code.name).inc()
                latency.observe(time.perf_counter() - started)

        return grpc.unary_unary_rpc_method_handler(
            wrapped,
            request_deserializer=_tolerant(handler.request_deserializer),
            response_serializer=handler.response_serializer,
        )


class HealthStatus:
    """The health service's view of this process, per gRPC service name."""

    def __init__(self, servicer: health.aio.HealthServicer, names: Iterable[str]) -> None:
        self._servicer = servicer
        self._names = ["", *names]

    async def set(self, serving: bool, name: str | None = None) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for target in self._names if name is None else [name]:
            await self._servicer.set(target, status)


class GrpcServer:
    """A grpc.aio server with health, reflection, auth, error mapping and metrics."""

    def __init__(
        self,
        *,
        host: str,
        port: int,
        service_names: Iterable[str],
        auth: BearerTokenAuth | None = None,
        reuse_port: bool = False,
        tls: GrpcTlsSettings | None = None,
    ) -> None:
        """``reuse_port``: several processes may bind the same port (SO_REUSEPORT) and the
        kernel spreads connections over them; off, a second server on the port fails.
        ``tls``: with a certificate the port speaks TLS only (mutual TLS with a client CA);
        its ``health_port`` adds a plaintext port that serves only the health service."""
        self._names = list(service_names)
        self.server = grpc.aio.server(
            interceptors=[_EdgeInterceptor(auth)],
            options=[
                ("grpc.so_reuseport", 1 if reuse_port else 0),
                ("grpc.max_receive_message_length", 16 * 1024 * 1024),
                ("grpc.keepalive_permit_without_calls", 1),
                ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
            ],
        )
        self._health_servicer = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self._health_servicer, self.server)
        reflection.enable_server_reflection(
            [*self._names, health.SERVICE_NAME, reflection.SERVICE_NAME], self.server
        )
        self.health = HealthStatus(self._health_servicer, self._names)
        credentials = server_credentials(tls) if tls is not None else None
        self.tls = credentials is not None
        self.mutual_tls = tls is not None and tls.tls_client_ca_file is not None
        if credentials is None:
            self.port = self.server.add_insecure_port(f"{host}:{port}")
        else:
            self.port = self.server.add_secure_port(f"{host}:{port}", credentials)
        if self.port == 0:
            raise OSError(f"cannot bind gRPC server to {host}:{port}")
        # the probes' port: the same health servicer (same statuses), nothing else on it
        self._health_server: grpc.aio.Server | None = None
        self.health_port = 0
        if tls is not None and tls.health_port:
            self._health_server = grpc.aio.server(
                options=[("grpc.so_reuseport", 1 if reuse_port else 0)]
            )
            health_pb2_grpc.add_HealthServicer_to_server(self._health_servicer, self._health_server)
            self.health_port = self._health_server.add_insecure_port(f"{host}:{tls.health_port}")
            if self.health_port == 0:
                raise OSError(f"cannot bind the health port {host}:{tls.health_port}")

    async def start(self, *, serving: bool = True) -> None:
        await self.health.set(serving)
        await self.server.start()
        if self._health_server is not None:
            await self._health_server.start()
        log.info(
            "grpc_started",
            port=self.port,
            services=",".join(self._names),
            tls="mutual" if self.mutual_tls else "on" if self.tls else "off",
            health_port=self.health_port,
        )

    async def stop(self, grace: float = 5.0) -> None:
        await self.health.set(False)
        await self.server.stop(grace)
        if self._health_server is not None:
            await self._health_server.stop(grace)
