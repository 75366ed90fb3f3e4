"""Plain adapter types shared by the store and the engine contract (no torch, no server)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class AdapterRef:
    """The adapter a sequence runs with, pinned to the version it started with."""

    adapter_id: str
    version: int
    scale: float = 1.0


@dataclass(frozen=True)
class AdapterInfo:
    """What the server knows about one adapter."""

    adapter_id: str
    version: int  # increases each time a newer copy is loaded under the same id
    peft_type: str  # "LORA" or "VERA"
    rank: int
    target_modules: tuple[str, ...]
    nbytes: int
    resident: bool
    pinned: bool
    in_use: int  # running sequences holding this adapter (any version)
    path: str


class StoreEvents(Protocol):
    """Hears what the store does: the server's metrics count loads and evictions."""

    def adapter_loaded(self, adapter_id: str, seconds: float) -> None: ...

    def adapter_evicted(self, adapter_id: str) -> None: ...
