"""Device slots of the stacked adapter tensors: which adapter version sits in which slot.

Slot 0 means "no adapter". A slot held by running rows is never reused. A new adapter
version takes the lowest slot that is free or idle, so the slots a batch uses stay low and
grouped forwards read slots 1..k of the stacks in place (routing.py); an idle adapter evicted
from a low slot costs one reinstall, a copy of its weights, if it comes back.
"""

from __future__ import annotations

import torch

from loraplex.adapters.errors import AdapterCapacityExceeded
from loraplex.adapters.weights import LoadedAdapter, LoraWeights, VeraProjection, VeraWeights
from loraplex.server.engine.multi_linear import MultiAdapterLinear

SlotKey = tuple[str, int]  # (adapter id, version)


class SlotsBusy(Exception):
    """The adapter cannot be installed while the running sequences hold what it conflicts
    with; the request should wait for them, not fail."""


class AdapterSlots:
    def __init__(self, layers: dict[str, MultiAdapterLinear], num_slots: int) -> None:
        self.layers = layers
        self.num_slots = num_slots  # usable slots: 1..num_slots
        self._slots: dict[SlotKey, int] = {}
        self._holders: dict[int, int] = {}
        self._ranks: dict[int, int] = {}
        self._vera_projection: VeraProjection | None = None
        self._vera_slots: set[int] = set()

    def hold(self, adapter: LoadedAdapter) -> int:
        """The slot holding this adapter version (installed if needed), held until `drop`."""
        key = (adapter.adapter_id, adapter.version)
        slot = self._slots.get(key)
        if slot is None:
            slot = self._free_slot(adapter.adapter_id)
            self._install(slot, adapter)
            self._slots[key] = slot
        self._holders[slot] = self._holders.get(slot, 0) + 1
        return slot

    def drop(self, slot: int) -> None:
        if slot:
            self._holders[slot] -= 1

    def holds(self) -> int:
        """Sequences holding a slot right now (0 when idle: anything else is a leak)."""
        return sum(self._holders.values())

    def rank(self, slots: set[int]) -> int:
        return max((self._ranks.get(s, 0) for s in slots), default=0)

    def _free_slot(self, adapter_id: str) -> int:
        installed = {slot: key for key, slot in self._slots.items()}
        for slot in range(1, self.num_slots + 1):
            if slot not in installed:
                return slot
            if not self._holders.get(slot):
                del self._slots[installed[slot]]
                self._clear(slot)
                return slot
        raise AdapterCapacityExceeded(
            adapter_id, f"all {self.num_slots} adapter slots are used by running sequences"
        )

    def _clear(self, slot: int) -> None:
        for layer in self.layers.values():
            layer.clear_slot(slot)
        self._ranks.pop(slot, None)
        self._vera_slots.discard(slot)
        if not self._vera_slots:
            self._vera_projection = None

    def _install(self, slot: int, adapter: LoadedAdapter) -> None:
        weights = adapter.weights
        if isinstance(weights, LoraWeights):
            for name, lora in weights.modules.items():
                self.layers[name].set_lora(slot, lora)
            self._ranks[slot] = weights.rank
        elif isinstance(weights, VeraWeights):
            self._adopt_projection(weights.projection)
            for name, vera in weights.modules.items():
                self.layers[name].set_vera(slot, vera, weights.projection)
            self._vera_slots.add(slot)

    def _adopt_projection(self, projection: VeraProjection) -> None:
        """Installed VeRA adapters share one projection, as in PEFT itself. Idle ones made
        with another projection are evicted; running ones make the newcomer wait."""
        current = self._vera_projection
        if current is not None and not _same_projection(current, projection):
            if any(self._holders.get(slot) for slot in self._vera_slots):
                raise SlotsBusy("running VeRA adapters use another projection")
            for key, slot in [(k, s) for k, s in self._slots.items() if s in self._vera_slots]:
                del self._slots[key]
                self._clear(slot)
        self._vera_projection = projection


def _same_projection(one: VeraProjection, other: VeraProjection) -> bool:
    return (
        one.a.shape == other.a.shape and one.b.shape == other.b.shape
        and torch.equal(one.a, other.a) and torch.equal(one.b, other.b)
    )  # fmt: skip
