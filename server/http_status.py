"""The HTTP twin of server/status.py: typed errors become HTTP status codes and OpenAI's error
`type`, by class along the error's hierarchy, never by message."""

from __future__ import annotations

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
from loraplex.server.status import by_class

INTERNAL = (500, "internal_error")
HTTP_BY_ERROR: dict[type[BaseException], tuple[int, str]] = {
    InvalidRequest: (400, "invalid_request_error"),
    AdapterNotFound: (404, "not_found_error"),
    InvalidAdapter: (400, "invalid_request_error"),  # its files cannot be served
    AdapterInUse: (409, "conflict_error"),
    AdapterPinned: (409, "conflict_error"),  # unpin first, or unload with force
    AdapterSourceRefused: (403, "permission_error"),  # outside --adapter-sources
    AdapterSourceUnavailable: (503, "service_unavailable_error"),  # hub or URL unreachable now
    AdapterCapacityExceeded: (429, "rate_limit_error"),  # all resident ones busy
    AdapterError: (400, "invalid_request_error"),
    Overloaded: (429, "rate_limit_error"),
    DeadlineExceeded: (504, "timeout_error"),
    Draining: (503, "service_unavailable_error"),
    Cancelled: (499, "cancelled_error"),  # nginx's "client closed request"; nobody reads it
    ModelUnavailable: (503, "service_unavailable_error"),
    EngineFailure: INTERNAL,
    LoraplexError: INTERNAL,
}


def http_status_for(err: BaseException) -> tuple[int, str] | None:
    """(HTTP status, OpenAI error type) for a typed error; None if it is not ours."""
    return by_class(HTTP_BY_ERROR, err)
