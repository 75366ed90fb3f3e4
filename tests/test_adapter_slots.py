"""Device slot allocation: held slots are never reused, new adapters take the lowest free or
idle slot (so dense decode spans stay short), and an evicted slot keeps no stale weights."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from loraplex.adapters.errors import AdapterCapacityExceeded
from loraplex.adapters.weights import LoadedAdapter, LoraModule, LoraWeights
from loraplex.server.engine.multi_linear import MultiAdapterLinear
from loraplex.server.engine.routing import RoutingContext
from loraplex.server.engine.slots import AdapterSlots

IN, OUT, SLOTS = 6, 5, 4


def _slots() -> AdapterSlots:
    routing = RoutingContext()
    layers = {
        name: MultiAdapterLinear(
            nn.Linear(IN, OUT), (IN, OUT), routing, SLOTS + 1, 4, torch.float32
        )
        for name in ("q", "v")
    }
    return AdapterSlots(layers, SLOTS)


def _adapter(name: str, targets: tuple[str, ...] = ("q", "v"), version: int = 1) -> LoadedAdapter:
    modules = {t: LoraModule(torch.ones(2, IN), torch.ones(OUT, 2), 1.0) for t in targets}
    return LoadedAdapter(name, version, f"/adapters/{name}", LoraWeights(modules))


def test_new_adapters_take_the_lowest_free_or_idle_slot() -> None:
    slots = _slots()
    held = {name: slots.hold(_adapter(name)) for name in "abc"}
    assert held == {"a": 1, "b": 2, "c": 3}
    slots.drop(held["a"])
    assert slots.hold(_adapter("d")) == 1  # a sat idle in slot 1, below the free slot 4
    assert slots.hold(_adapter("a")) == 4  # a was evicted: installed again, in the next slot
    assert slots.hold(_adapter("b")) == 2  # an installed version is reused where it is
    assert slots.holds() == 5


def test_held_slots_are_never_reused() -> None:
    slots = _slots()
    for name in "abcd":
        slots.hold(_adapter(name))
    with pytest.raises(AdapterCapacityExceeded):
        slots.hold(_adapter("e"))
    with pytest.raises(AdapterCapacityExceeded):
        slots.hold(_adapter("a", version=2))  # a newer version needs a slot of its own


def test_an_evicted_slot_keeps_no_weights_of_the_adapter_it_held() -> None:
    slots = _slots()
    slots.drop(slots.hold(_adapter("a", targets=("q", "v"))))
    assert slots.hold(_adapter("b", targets=("q",))) == 1
    v = slots.layers["v"]
    assert not v.lora_a[1].any() and not v.lora_b[1].any() and 1 not in v.lora_slots
