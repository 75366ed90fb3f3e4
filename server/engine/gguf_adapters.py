"""GGUF-LoRA adapters resident in llama.cpp: lazy loads, use counts, and frees.

An adapter version is loaded on first use (`llama_adapter_lora_init`) and counted per running
sequence. A version nobody uses stays loaded while it is among the `max_idle` most recently
used idle ones, so a returning adapter costs no reload; it is freed when it falls out of that
window, when a newer version of the same id is loaded, or when `retire` drops the id. A version
in use is never freed: retiring it only marks it, and its last release frees it.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import llama_cpp.llama_cpp as llama

from loraplex.adapters.errors import AdapterNotFound, InvalidAdapter
from loraplex.server.engine.api import AdapterRef

Key = tuple[str, int]  # (adapter id, version)
GGUF_MAGIC = b"GGUF"


class AdapterFileResolver(Protocol):
    """Maps an adapter version to a GGUF-LoRA file, raising AdapterNotFound if it has none."""

    def __call__(self, ref: AdapterRef) -> Path: ...


class AdapterFiles:
    """A resolver over GGUF-LoRA files registered by id; re-registering bumps the version."""

    def __init__(self) -> None:
        self._files: dict[Key, Path] = {}
        self._latest: dict[str, int] = {}
        self._lock = threading.Lock()

    def add(self, adapter_id: str, path: Path) -> AdapterRef:
        with self._lock:
            version = self._latest.get(adapter_id, 0) + 1
            self._latest[adapter_id] = version
            self._files[(adapter_id, version)] = Path(path)
        return AdapterRef(adapter_id, version)

    def __call__(self, ref: AdapterRef) -> Path:
        with self._lock:
            path = self._files.get((ref.adapter_id, ref.version))
        if path is None:
            raise AdapterNotFound(
                ref.adapter_id, f"has no GGUF-LoRA file for version {ref.version}"
            )
        return path


@dataclass
class _Resident:
    handle: Any  # llama_adapter_lora_p
    users: int = 0
    retired: bool = False


class GGUFAdapterPool:
    """Loaded GGUF-LoRA handles for one llama.cpp model; used from the engine thread only."""

    def __init__(
        self,
        model: Any,
        resolve: AdapterFileResolver,
        before_free: Callable[[Any], None],
        max_idle: int = 16,
    ) -> None:
        self._model = model
        self._resolve = resolve
        self._before_free = before_free  # lets the engine detach a handle from its context
        self._max_idle = max_idle
        self._resident: OrderedDict[Key, _Resident] = OrderedDict()  # LRU order, oldest first

    def check(self, ref: AdapterRef) -> None:
        """Load the adapter if needed, raising AdapterNotFound or InvalidAdapter."""
        self._load(ref)

    def acquire(self, ref: AdapterRef) -> Any:
        """The llama.cpp handle for `ref`, counted as used until `release(ref)`."""
        resident = self._load(ref)
        resident.users += 1
        return resident.handle

    def release(self, ref: AdapterRef) -> None:
        key = (ref.adapter_id, ref.version)
        resident = self._resident[key]
        resident.users -= 1
        if resident.users == 0:
            self._resident.move_to_end(key)
            self._free_idle()

    def retire(self, adapter_id: str) -> None:
        """Free every version of `adapter_id` now, or at its last release if in use."""
        for key, resident in list(self._resident.items()):
            if key[0] == adapter_id:
                resident.retired = True
        self._free_idle()

    def users(self, ref: AdapterRef) -> int:
        resident = self._resident.get((ref.adapter_id, ref.version))
        return 0 if resident is None else resident.users

    def holds(self) -> int:
        """Acquisitions not yet released, over all handles."""
        return sum(r.users for r in self._resident.values())

    def loaded(self) -> list[Key]:
        return list(self._resident)

    def close(self) -> None:
        for key in list(self._resident):
            self._free(key)

    def _load(self, ref: AdapterRef) -> _Resident:
        key = (ref.adapter_id, ref.version)
        resident = self._resident.get(key)
        if resident is None:
            handle = self._init_handle(ref.adapter_id, self._resolve(ref))
            resident = self._resident[key] = _Resident(handle)
            self._retire_older_versions(ref)
        self._resident.move_to_end(key)
        return resident

    def _init_handle(self, adapter_id: str, path: Path) -> Any:
        if not path.is_file():
            raise AdapterNotFound(adapter_id, f"GGUF-LoRA file {path} does not exist")
        with path.open("rb") as f:
            if f.read(4) != GGUF_MAGIC:
                raise InvalidAdapter(adapter_id, f"{path} is not a GGUF file (bad magic bytes)")
        handle = llama.llama_adapter_lora_init(self._model, str(path).encode())
        if not handle:
            raise InvalidAdapter(
                adapter_id,
                f"llama.cpp could not load {path}: corrupt, not a LoRA, or made for another base",
            )
        return handle

    def _retire_older_versions(self, ref: AdapterRef) -> None:
        for key, resident in self._resident.items():
            if key[0] == ref.adapter_id and key[1] < ref.version:
                resident.retired = True

    def _free_idle(self) -> None:
        idle = [key for key, r in self._resident.items() if r.users == 0]
        for key in idle:
            if self._resident[key].retired:
                self._free(key)
        idle = [key for key, r in self._resident.items() if r.users == 0]
        for key in idle[: max(0, len(idle) - self._max_idle)]:
            self._free(key)

    def _free(self, key: Key) -> None:
        resident = self._resident.pop(key)
        self._before_free(resident.handle)
        llama.llama_adapter_lora_free(resident.handle)
