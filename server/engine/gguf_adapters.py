"""llama.cpp handles of GGUF-LoRA adapter versions, keyed by (adapter id, version).

Each version's file is named by `add` (the adapter store's `prepare` hook, through the
serving assembly); its handle is made at its first use and counted per running sequence. The
store's residency is the only LRU: a handle lives until the store drops its version (`drop`,
its `on_drop` hook, or a newer version of the id) and no running sequence holds it.

Like every engine call these run on the thread that steps the engine: the server's loop runs
adapter loads and unloads between steps.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import llama_cpp.llama_cpp as llama

from loraplex.adapters.errors import AdapterNotFound, InvalidAdapter
from loraplex.server.engine.api import AdapterRef

Key = tuple[str, int]  # (adapter id, version)
GGUF_MAGIC = b"GGUF"


@dataclass
class _Version:
    path: Path
    handle: Any = None  # llama_adapter_lora_p, made at first use
    users: int = 0
    dropped: bool = False


class AdapterHandles:
    """The handles of one llama.cpp model."""

    def __init__(self, model: Any, before_free: Callable[[Any], None]) -> None:
        self._model = model
        self._before_free = before_free  # lets the engine detach a handle from its context
        # A dropped version keeps its file: a request that acquired it before the drop may
        # still start, and then makes its handle again.
        self._versions: dict[Key, _Version] = {}

    def add(self, adapter_id: str, version: int, path: Path) -> None:
        """`path` is the GGUF-LoRA file of this version; older versions of the id are dropped."""
        self._drop(lambda key: key[0] == adapter_id and key[1] < version)
        self._versions[(adapter_id, version)] = _Version(Path(path))

    def drop(self, adapter_id: str) -> None:
        """Free the id's handles now, or each at its last release if in use."""
        self._drop(lambda key: key[0] == adapter_id)

    def check(self, ref: AdapterRef) -> None:
        """Make the handle if needed, raising AdapterNotFound or InvalidAdapter."""
        version = self._loaded(ref)
        if version.dropped and not version.users:  # no sequence may come to free it
            self._free(version)

    def acquire(self, ref: AdapterRef) -> Any:
        """The llama.cpp handle for `ref`, counted as used until `release(ref)`."""
        version = self._loaded(ref)
        version.users += 1
        return version.handle

    def release(self, ref: AdapterRef) -> None:
        version = self._versions[(ref.adapter_id, ref.version)]
        version.users -= 1
        if version.dropped and not version.users:
            self._free(version)

    def users(self, ref: AdapterRef) -> int:
        version = self._versions.get((ref.adapter_id, ref.version))
        return 0 if version is None else version.users

    def holds(self) -> int:
        """Acquisitions not yet released, over all handles."""
        return sum(v.users for v in self._versions.values())

    def loaded(self) -> list[Key]:
        return [key for key, v in self._versions.items() if v.handle is not None]

    def close(self) -> None:
        for version in self._versions.values():
            self._free(version)

    def _drop(self, matches: Callable[[Key], bool]) -> None:
        for key, version in self._versions.items():
            if matches(key):
                version.dropped = True
                if not version.users:
                    self._free(version)

    def _loaded(self, ref: AdapterRef) -> _Version:
        version = self._versions.get((ref.adapter_id, ref.version))
        if version is None:
            raise AdapterNotFound(
                ref.adapter_id, f"has no GGUF-LoRA file for version {ref.version}"
            )
        if version.handle is None:
            version.handle = _init_handle(self._model, ref.adapter_id, version.path)
        return version

    def _free(self, version: _Version) -> None:
        if version.handle is not None:
            self._before_free(version.handle)
            llama.llama_adapter_lora_free(version.handle)
            version.handle = None


def _init_handle(model: Any, adapter_id: str, path: Path) -> Any:
    if not path.is_file():
        raise AdapterNotFound(adapter_id, f"GGUF-LoRA file {path} does not exist")
    with path.open("rb") as f:
        if f.read(4) != GGUF_MAGIC:
            raise InvalidAdapter(adapter_id, f"{path} is not a GGUF file (bad magic bytes)")
    handle = llama.llama_adapter_lora_init(model, str(path).encode())
    if not handle:
        raise InvalidAdapter(
            adapter_id,
            f"llama.cpp could not load {path}: corrupt, not a LoRA, or made for another base",
        )
    return handle
