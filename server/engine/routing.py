"""Which adapter slot and scale each row of the current forward pass uses.

The engine sets one `Routing` on the shared `RoutingContext` before a forward; every
wrapped linear layer reads it. Nothing lives in module globals.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Routing:
    slots: torch.Tensor  # [rows] long: slot per row, 0 = no adapter
    scales: torch.Tensor | None  # [rows, 1, 1]: each row's adapter scale; None: all 1.0
    used_slots: frozenset[int]  # nonzero slots present in this forward
    rank: int  # largest LoRA rank among the used slots (stacks are sliced to it)


class RoutingContext:
    """Holds the routing of the forward pass in progress (None: base model only)."""

    def __init__(self) -> None:
        self.current: Routing | None = None

    def set(self, slots: list[int], scales: list[float], rank: int, device: torch.device) -> None:
        used = frozenset(s for s in slots if s)
        if not used:
            self.current = None
            return
        self.current = Routing(
            slots=torch.tensor(slots, dtype=torch.long, device=device),
            scales=None
            if all(s == 1.0 for s in scales)
            else torch.tensor(scales, dtype=torch.float32, device=device).view(-1, 1, 1),
            used_slots=used,
            rank=rank,
        )

    def clear(self) -> None:
        self.current = None
