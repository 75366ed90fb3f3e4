"""Typed client errors, one per gRPC status the server answers with."""

from __future__ import annotations

import grpc


class LoraplexClientError(Exception):
    """A call failed; `code` is the gRPC status and `details` the server's explanation."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details


class InvalidArgument(LoraplexClientError):
    """A request field has a value the server refuses; the message names the field."""


class NotFound(LoraplexClientError):
    """No adapter with this id exists on the server."""


class FailedPrecondition(LoraplexClientError):
    """The adapter cannot be used or changed now (invalid files, in use, ...)."""


class ResourceExhausted(LoraplexClientError):
    """The server's queue is full; retry later."""


class DeadlineExceeded(LoraplexClientError):
    """The call's deadline passed before the server finished."""


class Unavailable(LoraplexClientError):
    """The server cannot be reached or is shutting down."""


class Unauthenticated(LoraplexClientError):
    """The server wants a valid token: pass `token=` or set LORAPLEX_TOKEN."""


class PermissionDenied(LoraplexClientError):
    """The token is valid but its role may not make this call (admin calls need an admin token)."""


class ClientSetupError(LoraplexClientError):
    """The client could not be set up (unreadable token or certificate file); nothing was sent."""

    def __init__(self, details: str) -> None:
        super().__init__(grpc.StatusCode.INVALID_ARGUMENT, details)


class Cancelled(LoraplexClientError):
    """The call was cancelled."""


class ServerError(LoraplexClientError):
    """The server failed while handling the request."""


ERROR_BY_STATUS: dict[grpc.StatusCode, type[LoraplexClientError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPrecondition,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.CANCELLED: Cancelled,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
}


def from_rpc_error(err: grpc.RpcError) -> LoraplexClientError:
    code = err.code() if hasattr(err, "code") else grpc.StatusCode.UNKNOWN
    details = (err.details() if hasattr(err, "details") else None) or str(err)
    return ERROR_BY_STATUS.get(code, ServerError)(code, details)
