"""The per-sequence LoRA slot table, over a fake of the patched llama.cpp's four functions."""

from __future__ import annotations

from typing import Any

import pytest

from loraplex.server.engine.gguf_lora_slots import LoraSlots, PoolApi, PoolError, SlotsFull


class FakePool:
    """Records what a llama.cpp context would hold; adapters are (name, rank) handles."""

    def __init__(self) -> None:
        self.rank = 0
        self.slots: dict[int, Any] = {}
        self.sequences: dict[int, tuple[int, float]] = {}
        self.inits = 0

    def api(self) -> PoolApi:
        def init(ctx: object, n_slots: int, rank: int) -> int:
            self.rank, self.slots, self.sequences = rank, {}, {}
            self.inits += 1
            return 0

        def set_slot(ctx: object, slot: int, handle: tuple[str, int]) -> int:
            if handle[1] > self.rank:
                return -3
            self.slots[slot] = handle
            return 0

        def clear_slot(ctx: object, slot: int) -> int:
            self.slots.pop(slot, None)
            return 0

        def set_seq(ctx: object, seq: int, slot: int, scale: float) -> int:
            self.sequences[seq] = (slot, scale)
            return 0

        return PoolApi(init, set_slot, clear_slot, set_seq)


def table(n_slots: int = 3, max_rank: int = 64) -> tuple[LoraSlots, FakePool]:
    pool = FakePool()
    return LoraSlots(pool.api(), object(), n_slots, max_rank), pool


def test_no_pool_until_the_first_adapter() -> None:
    slots, pool = table()
    slots.assign(0, 0, 0.0)
    assert pool.inits == 0
    assert slots.hold(("a", 8)) == 1
    assert pool.inits == 1 and pool.rank == 16 and pool.slots == {1: ("a", 8)}


def test_one_slot_per_adapter_version_shared_by_its_sequences() -> None:
    slots, _ = table()
    first = slots.hold(("a", 8))
    assert slots.hold(("a", 8)) == first
    assert slots.hold(("b", 8)) != first
    assert slots.holds() == 3


def test_idle_slots_are_reused_least_recent_first_and_held_ones_never() -> None:
    slots, pool = table(n_slots=3)  # slots 1 and 2
    a, b = slots.hold(("a", 8)), slots.hold(("b", 8))
    with pytest.raises(SlotsFull):
        slots.hold(("c", 8))
    slots.release(b)
    slots.release(a)
    assert slots.hold(("b", 8)) == b  # still there: no write needed
    assert slots.hold(("c", 8)) == a  # a was idle longest
    assert pool.slots == {a: ("c", 8), b: ("b", 8)}


def test_a_larger_rank_makes_a_new_pool_refilled_with_slots_and_sequences() -> None:
    slots, pool = table(max_rank=64)
    a = slots.hold(("a", 8))
    slots.assign(5, a, 0.5)
    big = slots.hold(("big", 40))
    assert pool.rank == 64 and slots.rank == 64 and pool.inits == 3  # 16, 32, 64
    assert pool.slots == {a: ("a", 8), big: ("big", 40)}
    assert pool.sequences == {5: (a, 0.5)}


def test_a_rank_over_the_limit_is_refused() -> None:
    slots, _ = table(max_rank=32)
    with pytest.raises(PoolError):
        slots.hold(("huge", 48))


def test_forget_clears_only_an_idle_slot_holding_the_handle() -> None:
    slots, pool = table()
    a = slots.hold(("a", 8))
    slots.forget(("a", 8))
    assert pool.slots == {a: ("a", 8)}  # held: kept
    slots.release(a)
    slots.forget(("a", 8))
    assert pool.slots == {}
    assert slots.hold(("a", 8)) == a  # written again


def test_the_base_slot_has_no_scale() -> None:
    slots, pool = table()
    slots.hold(("a", 8))
    slots.assign(2, 0, 0.7)
    assert pool.sequences[2] == (0, 0.0)
