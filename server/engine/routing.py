"""Which adapter slot and scale each row of the current forward pass uses.

The engine sets one `Routing` on the shared `RoutingContext` before a forward; every
wrapped linear layer reads it. Nothing lives in module globals.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Decode steps whose highest used slot + 1 is at most this many times the row count apply
# LoRA as one dense matmul over the slots in use instead of per-row gathers (multi_linear.py).
# `loraplex bench lora` (Gemma 3 270M shapes, rank 16, bf16, 2 threads), dense against
# gathered per step: 16 rows over 9 slot blocks 32 against 52 ms, 32 over 9 48 against 88,
# 16 over 17 54 against 62; 4 over 9 37 against 32, 2 over 5 35 against 31; prefill of
# 8 rows x 20 tokens 85 against 63.
DENSE_SLOTS_PER_ROW = 2.0


@dataclass(frozen=True)
class Routing:
    slots: torch.Tensor  # [rows] long: slot per row, 0 = no adapter
    scales: torch.Tensor | None  # [rows, 1, 1]: each row's adapter scale; None: all 1.0
    used_slots: frozenset[int]  # nonzero slots present in this forward
    rank: int  # largest LoRA rank among the used slots (stacks are sliced to it)
    # Decode only: [rows, 1, (span - 1) * rank], each row's scale over its own slot's block
    # of `rank` columns among slots 1..span-1; span = highest used slot + 1. None: gather.
    block_mask: torch.Tensor | None = None

    @property
    def span(self) -> int:
        return max(self.used_slots) + 1


class RoutingContext:
    """Holds the routing of the forward pass in progress (None: base model only)."""

    def __init__(self, dense_slots_per_row: float = DENSE_SLOTS_PER_ROW) -> None:
        self.current: Routing | None = None
        self.dense_slots_per_row = dense_slots_per_row  # 0: always gather (benchmarks)

    def set(
        self,
        slots: list[int],
        scales: list[float],
        rank: int,
        device: torch.device,
        *,
        tokens_per_row: int = 1,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        used = frozenset(s for s in slots if s)
        if not used:
            self.current = None
            return
        slot_tensor = torch.tensor(slots, dtype=torch.long, device=device)
        span = max(used) + 1
        dense = tokens_per_row == 1 and rank > 0 and span <= self.dense_slots_per_row * len(slots)
        self.current = Routing(
            slots=slot_tensor,
            scales=None
            if all(s == 1.0 for s in scales)
            else torch.tensor(scales, dtype=torch.float32, device=device).view(-1, 1, 1),
            used_slots=used,
            rank=rank,
            block_mask=block_mask(slot_tensor, scales, span, rank, dtype) if dense else None,
        )

    def clear(self) -> None:
        self.current = None


def block_mask(
    slots: torch.Tensor, scales: list[float], span: int, rank: int, dtype: torch.dtype
) -> torch.Tensor:
    """[rows, 1, (span - 1) * rank]: each row's scale over the `rank` columns of its slot
    among slots 1..span-1, zero elsewhere (all zero for a base row)."""
    rows = len(scales)
    mask = torch.zeros((rows, span, rank), dtype=dtype, device=slots.device)
    values = torch.tensor(scales, dtype=dtype, device=slots.device)[:, None]
    mask[torch.arange(rows, device=slots.device), slots] = values.expand(rows, rank)
    return mask[:, 1:].reshape(rows, 1, (span - 1) * rank)  # slot 0, the base, has no block
