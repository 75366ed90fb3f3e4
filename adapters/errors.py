"""Typed adapter errors; each names the adapter and says what is wrong."""

from __future__ import annotations


class AdapterError(Exception):
    """Base of every adapter error."""

    def __init__(self, adapter_id: str, problem: str) -> None:
        super().__init__(f"adapter {adapter_id!r}: {problem}")
        self.adapter_id = adapter_id
        self.problem = problem


class AdapterNotFound(AdapterError):
    """No adapter with this id exists under any adapter root."""


class InvalidAdapter(AdapterError):
    """The adapter's files are unreadable, unsupported or do not fit the resident base model."""


class AdapterSourceRefused(AdapterError):
    """The adapter's source is outside the server's `--adapter-sources` allow-list."""


class AdapterSourceUnavailable(AdapterError):
    """The adapter's source cannot be reached now (no network, the hub offline)."""


class AdapterInUse(AdapterError):
    """The adapter is used by running sequences and the caller asked not to wait."""


class AdapterCapacityExceeded(AdapterError):
    """Residency limits are reached and every resident adapter is pinned or in use."""


PINNED = (
    "is pinned; unpin it first, or pass force to unload it anyway "
    "(`loraplex adapters unload --force`)"
)


class AdapterPinned(AdapterError):
    """Unloading was asked of a pinned adapter without force; it stays loaded and pinned."""

    def __init__(self, adapter_id: str, problem: str = PINNED) -> None:
        super().__init__(adapter_id, problem)
