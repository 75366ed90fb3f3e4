"""Typed errors raised by the server side; the gRPC service maps each class to a status code."""

from __future__ import annotations


class LoraplexError(Exception):
    """Base of every error loraplex raises on purpose."""


class InvalidRequest(LoraplexError):
    """A request field has a value the server refuses; `field` names it."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field
        self.problem = problem


class Overloaded(LoraplexError):
    """The admission queue is full; the client should retry later."""


class DeadlineExceeded(LoraplexError):
    """The request's deadline passed before it finished."""


class ModelUnavailable(LoraplexError):
    """A base model spec could not be turned into files the backends can load."""


class ModelNotFound(ModelUnavailable):
    """A local model path does not exist or holds no model."""


class CorruptModel(ModelUnavailable):
    """A model file exists but is truncated, corrupt or has the wrong checksum."""


class HubUnreachable(ModelUnavailable):
    """A hub id was given but no model hub could be reached."""


class Draining(LoraplexError):
    """The server is shutting down and no longer admits requests, or ran out of grace time."""


class EngineFailure(LoraplexError):
    """The backend raised while running a step; the sequences in that step were ended."""


class Cancelled(LoraplexError):
    """The client cancelled the request (or its call ended) before it finished."""
