"""The running batch's KV cache, written in place, with per-column token positions.

Column j of row i holds the token at position pos[i, j] (-1: empty). Attention masks are
built from these positions, not from column indices, so rows may join, leave or pause
freely and still see exactly their own causal (and, per layer type, sliding) window.

Storage has spare rows and columns, grown by doubling, so a step that adds or drops a row
copies only the rows that join or move, not the whole cache. Grown storage is left
uninitialized: zero-filling it touches every page at once, which stalls the step that grows
the cache (figures: docs/measurements.md). So every cell a
forward reads (live rows, columns up to the end of its own tokens) is written first: by a
forward, by a copy of live cells, or by zeros where a joining row has no tokens. Masked-out
cells must still be finite, because a NaN times a zero attention weight is NaN.
"""

from __future__ import annotations

from itertools import accumulate
from typing import Any

import torch

NO_TOKEN = -1
# Columns no live row uses any more are squeezed out once they are this share of the
# length: each squeeze copies the whole cache, so it is done rarely, at little attention cost.
COMPACT_UNUSED_SHARE = 0.5


class BatchKVCache:
    """Duck-types the `update(key, value, layer_idx)` hook of transformers' Cache."""

    def __init__(
        self,
        num_layers: int,
        kv_heads: int,
        head_dim: int,
        device: torch.device,
        dtype: torch.dtype,
    ) -> None:
        self.num_layers, self.kv_heads, self.head_dim = num_layers, kv_heads, head_dim
        self.device, self.dtype = device, dtype
        self.rows = 0  # live rows: the first `rows` rows of the storage
        self._clear()

    def _clear(self) -> None:
        """No storage at all; only valid with no live rows."""
        self.length = 0  # columns in use
        self._pos = torch.full((0, 0), NO_TOKEN, dtype=torch.long, device=self.device)
        self.keys: list[torch.Tensor] = [self._empty(0, 0) for _ in range(self.num_layers)]
        self.values: list[torch.Tensor] = [self._empty(0, 0) for _ in range(self.num_layers)]

    def _empty(self, rows: int, columns: int) -> torch.Tensor:
        shape = (rows, self.kv_heads, columns, self.head_dim)
        return torch.empty(shape, dtype=self.dtype, device=self.device)  # see the module doc

    def _zero(self, rows: slice, columns: slice) -> None:
        if rows.start >= rows.stop or columns.start >= columns.stop:
            return  # most calls: a fresh cache's first row, a prompt no longer than the rest
        for store in (self.keys, self.values):
            for layer in range(self.num_layers):
                store[layer][rows, :, columns] = 0

    @property
    def pos(self) -> torch.Tensor:
        """Token positions of the live rows [rows, capacity]."""
        return self._pos[: self.rows]

    @property
    def capacity(self) -> int:
        return int(self._pos.shape[1])

    def add_rows(self, count: int) -> None:
        """Append empty rows (used before their first forward)."""
        self._reserve(self.rows + count, self.capacity)
        self._pos[self.rows : self.rows + count] = NO_TOKEN
        self._zero(slice(self.rows, self.rows + count), slice(0, self.length))
        self.rows += count

    def keep_rows(self, rows: list[int]) -> list[int]:
        """Keep only these rows, moving as few as possible; returns the new row order as old
        row indices (new row i is old row order[i])."""
        order = _settled_order(rows)
        if not order:  # an idle batch gives its storage back
            self.rows = 0
            self._clear()
            return order
        moves = [(new, old) for new, old in enumerate(order) if new != old]
        if moves:
            to = torch.tensor([new for new, _ in moves], dtype=torch.long, device=self.device)
            source = torch.tensor([old for _, old in moves], dtype=torch.long, device=self.device)
            for store in (self.keys, self.values):
                for layer in range(self.num_layers):
                    store[layer][to] = store[layer][source]
            self._pos[to] = self._pos[source]
        self.rows = len(order)
        self._compact()
        return order

    def extend(self, packed: BatchKVCache, lengths: list[int]) -> None:
        """Append one row per prompt of `packed`, a freshly prefilled single row that holds
        the prompts back to back (`lengths` tokens each), each moved to its row's start."""
        first, width = self.rows, max(lengths)
        self.add_rows(len(lengths))
        self._reserve(self.rows, width)
        # The columns a longer prompt adds: empty in every other row.
        self._zero(slice(0, self.rows), slice(self.length, width))
        starts = [0, *accumulate(lengths[:-1])]
        for row, (start, length) in enumerate(zip(starts, lengths, strict=True), start=first):
            span = slice(start, start + length)
            for layer in range(self.num_layers):
                self.keys[layer][row, :, :length] = packed.keys[layer][0, :, span]
                self.values[layer][row, :, :length] = packed.values[layer][0, :, span]
            self._pos[row, :length] = packed.pos[0, span]
        self._pos[:first, self.length : width] = NO_TOKEN  # reserved by a forward that failed
        self.length = max(self.length, width)

    def begin(self, positions: torch.Tensor) -> None:
        """Reserve columns for the next forward's tokens; positions: [rows, L], -1 for padding."""
        needed = self.length + positions.shape[1]
        self._reserve(self.rows, needed)
        self._pos[: self.rows, self.length : needed] = positions

    def update(
        self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        end = self.length + key.shape[2]
        keys, values = self.keys[layer_idx][: self.rows], self.values[layer_idx][: self.rows]
        keys[:, :, self.length : end] = key
        values[:, :, self.length : end] = value
        return keys[:, :, :end], values[:, :, :end]

    def commit(self, tokens: int) -> None:
        self.length += tokens

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.length

    def attention_mask(
        self, query_pos: torch.Tensor, window: int | None, dtype: torch.dtype
    ) -> torch.Tensor:
        """Additive mask [rows, 1, L, length+L] for the tokens reserved by `begin`."""
        end = self.length + query_pos.shape[1]
        key_pos = self.pos[:, :end][:, None, :]  # [rows, 1, K]
        q = query_pos[:, :, None]  # [rows, L, 1]
        allowed = (key_pos != NO_TOKEN) & (key_pos <= q)
        if window is not None:
            allowed &= q - key_pos < window
        # A padding query attends to its own column only, so no row of the softmax is empty.
        own = torch.zeros_like(allowed)
        own[:, :, self.length : end] = torch.eye(
            query_pos.shape[1], dtype=torch.bool, device=self.device
        )
        allowed |= own & (q == NO_TOKEN)
        return _additive(allowed, dtype)[:, None]

    def _reserve(self, rows: int, columns: int) -> None:
        """Make room for `rows` rows of `columns` columns, doubling what runs short."""
        row_room, column_room = int(self._pos.shape[0]), self.capacity
        if rows <= row_room and columns <= column_room:
            return
        if rows > row_room:
            row_room = max(rows, 2 * row_room, 4)
        if columns > column_room:
            column_room = max(columns, 2 * column_room, 16)
        live, used = self.rows, self.length
        for store in (self.keys, self.values):
            for layer in range(self.num_layers):
                fresh = self._empty(row_room, column_room)
                fresh[:live, :, :used] = store[layer][:live, :, :used]
                store[layer] = fresh
        pos = torch.full((row_room, column_room), NO_TOKEN, dtype=torch.long, device=self.device)
        pos[:live, :used] = self._pos[:live, :used]
        self._pos = pos

    def _compact(self) -> None:
        """Squeeze out the columns no live row uses, once they are a large enough share."""
        used_cols = (self.pos[:, : self.length] != NO_TOKEN).any(0).nonzero().flatten()
        kept = int(used_cols.numel())
        if self.length - kept <= COMPACT_UNUSED_SHARE * self.length:
            return
        live = self.rows
        for store in (self.keys, self.values):
            for layer in range(self.num_layers):
                store[layer][:live, :, :kept] = store[layer][:live, :, used_cols]
        positions = self._pos[:live, used_cols]
        self._pos[:live] = NO_TOKEN
        self._pos[:live, :kept] = positions
        self.length = kept


def packed_positions(lengths: list[int], device: torch.device) -> torch.Tensor:
    """Token positions [1, sum(lengths)] of prompts packed back to back in one row."""
    return torch.cat([torch.arange(n, device=device) for n in lengths])[None]


def packed_attention_mask(
    lengths: list[int], window: int | None, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """Additive mask [1, 1, T, T] for the first forward of a fresh row packed as
    `packed_positions` lays it out: each token sees its own prompt's tokens up to itself."""
    prompt = torch.repeat_interleave(torch.arange(len(lengths), device=device),
                                     torch.tensor(lengths, device=device))  # fmt: skip
    q = k = packed_positions(lengths, device)[0]
    allowed = (prompt[:, None] == prompt[None, :]) & (k[None, :] <= q[:, None])
    if window is not None:
        allowed &= q[:, None] - k[None, :] < window
    return _additive(allowed, dtype)[None, None]


def _additive(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """0 where attention is allowed, the dtype's minimum elsewhere."""
    mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    return mask.masked_fill_(~allowed, torch.finfo(dtype).min)


def _settled_order(rows: list[int]) -> list[int]:
    """`rows` reordered so that those already inside the kept range stay where they are and
    the others fill its holes."""
    count = len(rows)
    staying = {row for row in rows if row < count}
    movers = iter(row for row in rows if row >= count)
    return [row if row in staying else next(movers) for row in range(count)]
