"""Per-sequence LoRA in llama.cpp: adapter slots that every sequence of one decode picks from.

Stock llama.cpp applies one adapter set to a whole context, so a batch mixing adapters takes
one decode call per adapter. loraplex's patch (patches/llama.cpp/per-sequence-lora.patch,
applied by scripts/setup.sh) adds a pool of slots per adaptable weight and four C functions:
a slot holds one adapter's A and B, each sequence names its slot and scale, and the graph adds
each token's own delta through ggml_mul_mat_id. This module binds those functions when the
library has them and keeps the slot table: which adapter handle each slot holds, which slots
running sequences hold, and which idle slot to reuse first.
"""

from __future__ import annotations

import ctypes
import logging
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)
POOL_FUNCTIONS = (
    "llama_lora_pool_init",
    "llama_lora_pool_set_slot",
    "llama_lora_pool_clear_slot",
    "llama_lora_pool_set_seq",
)
FIRST_RANK = 16  # the pool's rank until an adapter needs more (it doubles, up to the limit)


class PoolError(RuntimeError):
    """llama.cpp refused a pool call."""


class SlotsFull(RuntimeError):
    """Every slot is held by running sequences; the request waits for one."""


@dataclass(frozen=True)
class PoolApi:
    """The patch's C functions, typed."""

    init: Any
    set_slot: Any
    clear_slot: Any
    set_seq: Any


def bind(lib: Any) -> PoolApi | None:
    """The pool functions of a llama.cpp library, or None for a stock build without them."""
    if not all(hasattr(lib, name) for name in POOL_FUNCTIONS):
        return None
    ctx, i32, f32 = ctypes.c_void_p, ctypes.c_int32, ctypes.c_float
    signatures = {
        "llama_lora_pool_init": [ctx, i32, i32],
        "llama_lora_pool_set_slot": [ctx, i32, ctypes.c_void_p],
        "llama_lora_pool_clear_slot": [ctx, i32],
        "llama_lora_pool_set_seq": [ctx, i32, i32, f32],
    }
    functions = []
    for name, argtypes in signatures.items():
        function = getattr(lib, name)
        function.argtypes, function.restype = argtypes, i32
        functions.append(function)
    return PoolApi(*functions)


@dataclass
class _Slot:
    handle: Any = None  # the llama.cpp handle of the adapter version it holds
    holds: int = 0


class LoraSlots:
    """The slot table of one llama.cpp context; the engine thread only.

    Slot 0 is the base. The pool is created at the first adapter, so a server that serves only
    the base runs llama.cpp's own graph; its rank starts at FIRST_RANK and doubles (a new pool,
    refilled from the handles) when an adapter needs more, up to `max_rank`.
    """

    def __init__(self, api: PoolApi, ctx: Any, n_slots: int, max_rank: int) -> None:
        self._api, self._ctx = api, ctx
        self._slots = [_Slot() for _ in range(n_slots)]  # index 0 unused: the base
        self._idle: OrderedDict[int, None] = OrderedDict()  # idle slots, least recent first
        # seq -> (slot, scale), set again on each new pool
        self._sequences: dict[int, tuple[int, float]] = {}
        self.max_rank = max_rank
        self.rank = 0  # 0: no pool yet

    def hold(self, handle: Any) -> int:
        """A slot holding `handle`'s weights (written now unless a slot already holds them)."""
        slot = next((i for i, s in enumerate(self._slots) if i and s.handle == handle), None)
        if slot is None:
            slot = self._free_slot()
            self._write(slot, handle)
            self._slots[slot].handle = handle
        self._slots[slot].holds += 1
        self._idle.pop(slot, None)
        return slot

    def release(self, slot: int) -> None:
        entry = self._slots[slot]
        entry.holds -= 1
        if entry.holds == 0:
            self._idle[slot] = None

    def forget(self, handle: Any) -> None:
        """Clear the idle slot holding `handle`, which is about to be freed."""
        for slot, entry in enumerate(self._slots):
            if slot and entry.handle == handle and entry.holds == 0:
                self._call(self._api.clear_slot, slot)
                self._slots[slot] = _Slot()
                self._idle.pop(slot, None)

    def assign(self, seq: int, slot: int, scale: float) -> None:
        """Sequence `seq` uses `slot` at `scale` from the next decode on (slot 0: the base)."""
        self._sequences[seq] = (slot, scale if slot else 0.0)
        if self.rank:
            self._call(self._api.set_seq, seq, *self._sequences[seq])

    def holds(self) -> int:
        return sum(s.holds for s in self._slots)

    def _free_slot(self) -> int:
        never_used = next((i for i, s in enumerate(self._slots) if i and s.handle is None), None)
        if never_used is not None:
            return never_used
        if not self._idle:
            raise SlotsFull(f"all {len(self._slots) - 1} adapter slots are held")
        slot, _ = self._idle.popitem(last=False)
        self._slots[slot] = _Slot()
        return slot

    def _write(self, slot: int, handle: Any) -> None:
        if not self.rank:
            self._new_pool(FIRST_RANK)
        while self._api.set_slot(self._ctx, slot, handle) != 0:
            if self.rank >= self.max_rank:  # refused for another reason than its rank
                raise PoolError(f"llama.cpp refused adapter slot {slot}")
            self._new_pool(min(2 * self.rank, self.max_rank))

    def _new_pool(self, rank: int) -> None:
        """A pool of `rank`, refilled with the adapters the old one held."""
        self._call(self._api.init, len(self._slots), rank)
        self.rank = rank
        log.info("per-sequence LoRA pool: %d slots of rank %d", len(self._slots) - 1, rank)
        for slot, entry in enumerate(self._slots):
            if slot and entry.handle is not None:
                self._call(self._api.set_slot, slot, entry.handle)
        for seq, (slot, scale) in self._sequences.items():
            self._call(self._api.set_seq, seq, slot, scale)

    def _call(self, function: Any, *args: Any) -> None:
        if function(self._ctx, *args) != 0:
            raise PoolError(f"llama.cpp refused {function.__name__}{args}")
