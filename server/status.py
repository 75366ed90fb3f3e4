"""The one place where typed errors become gRPC status codes (by class, never by message)."""

from __future__ import annotations

from typing import TypeVar

import grpc

from loraplex.adapters.errors import (
    AdapterCapacityExceeded,
    AdapterError,
    AdapterInUse,
    AdapterNotFound,
    AdapterPinned,
    AdapterSourceRefused,
    AdapterSourceUnavailable,
    InvalidAdapter,
)
from loraplex.server.errors import (
    Cancelled,
    DeadlineExceeded,
    Draining,
    EngineFailure,
    InvalidRequest,
    LoraplexError,
    ModelUnavailable,
    Overloaded,
)

T = TypeVar("T")

STATUS_BY_ERROR: dict[type[BaseException], grpc.StatusCode] = {
    InvalidRequest: grpc.StatusCode.INVALID_ARGUMENT,
    AdapterNotFound: grpc.StatusCode.NOT_FOUND,
    InvalidAdapter: grpc.StatusCode.FAILED_PRECONDITION,
    AdapterInUse: grpc.StatusCode.FAILED_PRECONDITION,
    AdapterPinned: grpc.StatusCode.FAILED_PRECONDITION,  # unpin first, or unload with force
    AdapterSourceRefused: grpc.StatusCode.PERMISSION_DENIED,  # outside --adapter-sources
    AdapterSourceUnavailable: grpc.StatusCode.UNAVAILABLE,  # hub or URL unreachable now
    AdapterCapacityExceeded: grpc.StatusCode.RESOURCE_EXHAUSTED,  # all resident ones busy
    AdapterError: grpc.StatusCode.FAILED_PRECONDITION,
    Overloaded: grpc.StatusCode.RESOURCE_EXHAUSTED,
    DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
    Draining: grpc.StatusCode.UNAVAILABLE,
    Cancelled: grpc.StatusCode.CANCELLED,
    ModelUnavailable: grpc.StatusCode.UNAVAILABLE,
    EngineFailure: grpc.StatusCode.INTERNAL,
    LoraplexError: grpc.StatusCode.INTERNAL,
}


def by_class(table: dict[type[BaseException], T], err: BaseException) -> T | None:
    """The entry for the error's nearest class in `table`; None if it is not ours."""
    return next((table[cls] for cls in type(err).__mro__ if cls in table), None)


def status_for(err: BaseException) -> grpc.StatusCode | None:
    """The gRPC status for a typed error, found along its class hierarchy."""
    return by_class(STATUS_BY_ERROR, err)
