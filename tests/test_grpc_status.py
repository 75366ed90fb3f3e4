"""Typed errors map to status codes by class, along the class hierarchy."""

from __future__ import annotations

import grpc
import pytest

from loraplex.adapters import errors as adapter_errors
from loraplex.server import errors
from loraplex.server.status import status_for

Code = grpc.StatusCode


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (errors.InvalidRequest("top_p", "bad"), Code.INVALID_ARGUMENT),
        (adapter_errors.AdapterNotFound("x", "missing"), Code.NOT_FOUND),
        (adapter_errors.InvalidAdapter("x", "shapes"), Code.FAILED_PRECONDITION),
        (adapter_errors.AdapterInUse("x", "busy"), Code.FAILED_PRECONDITION),
        (errors.Overloaded("full"), Code.RESOURCE_EXHAUSTED),
        (adapter_errors.AdapterCapacityExceeded("x", "all busy"), Code.RESOURCE_EXHAUSTED),
        (errors.DeadlineExceeded("late"), Code.DEADLINE_EXCEEDED),
        (errors.Draining("bye"), Code.UNAVAILABLE),
        (errors.Cancelled("gone"), Code.CANCELLED),
        (errors.EngineFailure("boom"), Code.INTERNAL),
        (errors.CorruptModel("bad file"), Code.UNAVAILABLE),  # via ModelUnavailable
    ],
)
def test_typed_errors_map_by_class(error: Exception, code: grpc.StatusCode) -> None:
    assert status_for(error) == code


def test_every_adapter_error_has_a_status() -> None:
    for cls in adapter_errors.AdapterError.__subclasses__():
        assert status_for(cls("x", "problem")) is not None, cls


def test_messages_play_no_part() -> None:
    assert status_for(ValueError("adapter not found")) is None
    assert status_for(errors.InvalidRequest("x", "not found")) == Code.INVALID_ARGUMENT
