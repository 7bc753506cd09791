"""The platform's one error hierarchy.

Every error the platform raises on purpose is a ``PlatformError``: it knows its gRPC status
code, its HTTP status and a machine-readable ``code``. Transports map it once, at the edge
(``services.shared.grpc_server``); nothing else translates errors.
"""

from __future__ import annotations

import grpc


class PlatformError(Exception):
    """Root of every error the platform raises deliberately."""

    grpc_code: grpc.StatusCode = grpc.StatusCode.INTERNAL
    http_status: int = 500
    code: str = "internal"

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code

    def __str__(self) -> str:
        return self.message


class InvalidArgument(PlatformError):
    """The caller sent something that breaks the contract; ``field`` names what."""

    grpc_code = grpc.StatusCode.INVALID_ARGUMENT
    http_status = 400
    code = "invalid_argument"

    def __init__(self, field: str, message: str, *, code: str | None = None) -> None:
        super().__init__(f"{field}: {message}" if field else message, code=code)
        self.field = field
        self.reason = message


class NotFound(PlatformError):
    grpc_code = grpc.StatusCode.NOT_FOUND
    http_status = 404
    code = "not_found"


class AlreadyExists(PlatformError):
    grpc_code = grpc.StatusCode.ALREADY_EXISTS
    http_status = 409
    code = "already_exists"


class FailedPrecondition(PlatformError):
    """The request is valid but the system is not in a state to carry it out."""

    grpc_code = grpc.StatusCode.FAILED_PRECONDITION
    http_status = 409
    code = "failed_precondition"


class Unauthenticated(PlatformError):
    grpc_code = grpc.StatusCode.UNAUTHENTICATED
    http_status = 401
    code = "unauthenticated"


class PermissionDenied(PlatformError):
    grpc_code = grpc.StatusCode.PERMISSION_DENIED
    http_status = 403
    code = "permission_denied"


class Unavailable(PlatformError):
    """A dependency (Triton, Redis, Kafka, MLflow) cannot be reached; retrying may help."""

    grpc_code = grpc.StatusCode.UNAVAILABLE
    http_status = 503
    code = "unavailable"


class DeadlineExceeded(PlatformError):
    grpc_code = grpc.StatusCode.DEADLINE_EXCEEDED
    http_status = 504
    code = "deadline_exceeded"


class IntegrityError(PlatformError):
    """An artifact does not match its recorded checksum: refused, never loaded."""

    grpc_code = grpc.StatusCode.DATA_LOSS
    http_status = 422
    code = "integrity_error"
