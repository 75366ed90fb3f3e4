"""Which adapter slot and scale each row (or, in a packed prefill, each span of tokens) of
the current forward pass uses.

The engine sets one `Routing` on the shared `RoutingContext` before a forward; every
wrapped linear layer reads it. Nothing lives in module globals.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import accumulate

import torch

# A forward groups its rows by adapter (`Groups`) when it has at least GROUPED_MIN_ROWS rows
# and the padded grid has at most GROUPED_CELLS_PER_ROW cells per row; otherwise it gathers
# each row's adapter weights. Grouping reads each adapter's stacks once, in place; with few
# rows per adapter its padding and copies cost more than gathering per row. The thresholds
# come from `loraplex bench lora` on the model's shapes (figures: docs/measurements.md).
GROUPED_MIN_ROWS = 8
GROUPED_CELLS_PER_ROW = 1.5


@dataclass(frozen=True)
class Routing:
    slots: torch.Tensor | None  # [rows] long: slot per row, 0 = no adapter; None: spans
    scales: torch.Tensor | None  # [rows, 1, 1]: each row's adapter scale; None: all 1.0
    used_slots: frozenset[int]  # nonzero slots present in this forward
    rank: int  # largest LoRA rank among the used slots (stacks are sliced to it)
    groups: Groups | None = None  # LoRA rows grouped by adapter; None: gathered per row
    spans: tuple[Span, ...] | None = None  # packed prefill: one row, prompts back to back


@dataclass(frozen=True)
class Span:
    """The tokens [start, stop) of a packed row that belong to one prompt, and its adapter."""

    slot: int
    scale: float
    start: int
    stop: int


class RoutingContext:
    """Holds the routing of the forward pass in progress (None: base model only)."""

    def __init__(self, grouped_cells_per_row: float = GROUPED_CELLS_PER_ROW) -> None:
        self.current: Routing | None = None
        self.grouped_cells_per_row = grouped_cells_per_row  # 0: always gather (benchmarks)

    def set(
        self,
        slots: list[int],
        scales: list[float],
        rank: int,
        device: torch.device,
        *,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        used = frozenset(s for s in slots if s)
        if not used:
            self.current = None
            return
        # The rule needs only the grid's size; its tensors are built when it is used.
        members = _rows_by_slot(slots)
        rows = len(slots)
        cells = len(members) * max(len(group) for group in members.values())
        grouped = rows >= GROUPED_MIN_ROWS and cells <= self.grouped_cells_per_row * rows
        self.current = Routing(
            slots=torch.tensor(slots, dtype=torch.long, device=device),
            scales=None
            if all(s == 1.0 for s in scales)
            else torch.tensor(scales, dtype=torch.float32, device=device).view(-1, 1, 1),
            used_slots=used,
            rank=rank,
            groups=_grid(members, scales, device, dtype) if grouped else None,
        )

    def set_packed(
        self, slots: list[int], scales: list[float], lengths: list[int], rank: int,
        device: torch.device,
    ) -> None:  # fmt: skip
        """Route a single row that holds several prompts back to back (`lengths` tokens each)."""
        used = frozenset(s for s in slots if s)
        if not used:
            self.current = None
            return
        stops = list(accumulate(lengths))
        spans = tuple(
            Span(slot, scale, stop - length, stop)
            for slot, scale, length, stop in zip(slots, scales, lengths, stops, strict=True)
            if slot
        )
        self.current = Routing(
            slots=None,
            scales=None,
            used_slots=used,
            rank=rank,
            spans=spans,
        )

    def clear(self) -> None:
        self.current = None


@dataclass(frozen=True)
class Groups:
    """The rows of a forward grouped by adapter, for one batched matmul over the adapters in
    use that reads their stacked weights in place (the SGMV idea of Punica, padded to a grid).

    Cell (g, m) of the [count, width] grid holds the m-th row using adapter slot `slots[g]`;
    rows are copied into the grid and the grid's deltas added back to the same rows with
    `index_add_`. Cells past a group's last row repeat its first row with scale 0: they add
    exact zeros to the row they copied and touch no other.
    """

    slots: torch.Tensor | None  # [count] long; None: the slots in use are 1..count
    rows: torch.Tensor  # [count * width] long: the row in each cell
    scales: torch.Tensor  # [count, width, 1, 1]: each cell's adapter scale, 0 for padding
    count: int
    width: int

    def take(self, stack: torch.Tensor) -> torch.Tensor:
        """The adapters in use from a [slots, ...] stack: a view when they are contiguous."""
        if self.slots is None:
            return stack[1 : self.count + 1]
        return stack.index_select(0, self.slots)


def group_rows(
    slots: list[int], scales: list[float], device: torch.device, dtype: torch.dtype
) -> Groups:
    """The grid of these rows, whatever the rule would pick (tests and benchmarks)."""
    return _grid(_rows_by_slot(slots), scales, device, dtype)


def _rows_by_slot(slots: list[int]) -> dict[int, list[int]]:
    """The rows of each nonzero slot, in row order."""
    members: dict[int, list[int]] = {}
    for row, slot in enumerate(slots):
        if slot:
            members.setdefault(slot, []).append(row)
    return members


def _grid(
    members: dict[int, list[int]], scales: list[float], device: torch.device, dtype: torch.dtype
) -> Groups:
    order = sorted(members)
    width = max(len(rows) for rows in members.values())
    cells: list[int] = []
    cell_scales: list[float] = []
    for slot in order:
        rows = members[slot]
        padding = width - len(rows)
        cells += rows + [rows[0]] * padding
        cell_scales += [scales[row] for row in rows] + [0.0] * padding
    contiguous = order == list(range(1, len(order) + 1))
    return Groups(
        slots=None if contiguous else torch.tensor(order, dtype=torch.long, device=device),
        rows=torch.tensor(cells, dtype=torch.long, device=device),
        scales=torch.tensor(cell_scales, dtype=dtype, device=device).view(len(order), width, 1, 1),
        count=len(order),
        width=width,
    )
