"""The running batch's KV cache, written in place, with per-column token positions.

Column j of row i holds the token at position pos[i, j] (-1: empty). Attention masks are
built from these positions, not from column indices, so rows may join, leave or pause
freely and still see exactly their own causal (and, per layer type, sliding) window.
"""

from __future__ import annotations

from typing import Any

import torch

NO_TOKEN = -1


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
        self.rows = 0
        self.length = 0  # columns in use
        self.pos = torch.full((0, 0), NO_TOKEN, dtype=torch.long, device=device)
        self.keys: list[torch.Tensor] = [self._empty(0, 0) for _ in range(num_layers)]
        self.values: list[torch.Tensor] = [self._empty(0, 0) for _ in range(num_layers)]

    def _empty(self, rows: int, capacity: int) -> torch.Tensor:
        shape = (rows, self.kv_heads, capacity, self.head_dim)
        return torch.zeros(shape, dtype=self.dtype, device=self.device)

    @property
    def capacity(self) -> int:
        return int(self.pos.shape[1])

    def add_rows(self, count: int) -> None:
        """Append empty rows (used before their first forward)."""
        self._reshape(self.rows + count, self.capacity, list(range(self.rows)))

    def keep_rows(self, rows: list[int]) -> None:
        """Keep only these rows (in this order), then drop columns no row uses any more."""
        self._reshape(len(rows), self.capacity, rows)
        self._compact()

    def extend(self, other: BatchKVCache) -> None:
        """Append the rows of `other` (a freshly prefilled batch) after this cache's rows."""
        length = max(self.length, other.length)
        first = self.rows
        self._reshape(self.rows + other.rows, max(self.capacity, length), list(range(self.rows)))
        rows = slice(first, first + other.rows)
        for layer in range(self.num_layers):
            self.keys[layer][rows, :, : other.length] = other.keys[layer][:, :, : other.length]
            self.values[layer][rows, :, : other.length] = other.values[layer][:, :, : other.length]
        self.pos[rows, : other.length] = other.pos[:, : other.length]
        self.length = length

    def begin(self, positions: torch.Tensor) -> None:
        """Reserve columns for the next forward's tokens; positions: [rows, L], -1 for padding."""
        needed = self.length + positions.shape[1]
        if needed > self.capacity:
            capacity = max(needed, 2 * self.capacity, 16)
            self._reshape(self.rows, capacity, list(range(self.rows)))
        self.pos[:, self.length : needed] = positions

    def update(
        self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        end = self.length + key.shape[2]
        self.keys[layer_idx][:, :, self.length : end] = key
        self.values[layer_idx][:, :, self.length : end] = value
        return self.keys[layer_idx][:, :, :end], self.values[layer_idx][:, :, :end]

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
        mask = torch.zeros(allowed.shape, dtype=dtype, device=self.device)
        mask.masked_fill_(~allowed, torch.finfo(dtype).min)
        return mask[:, None]

    def _reshape(self, rows: int, capacity: int, source_rows: list[int]) -> None:
        index = torch.tensor(source_rows, dtype=torch.long, device=self.device)
        n, used = len(source_rows), self.length
        for layer in range(self.num_layers):
            for store in (self.keys, self.values):
                fresh = self._empty(rows, capacity)
                fresh[:n, :, :used] = store[layer].index_select(0, index)[:, :, :used]
                store[layer] = fresh
        pos = torch.full((rows, capacity), NO_TOKEN, dtype=torch.long, device=self.device)
        pos[:n, :used] = self.pos.index_select(0, index)[:, :used]
        self.pos, self.rows = pos, rows

    def _compact(self) -> None:
        used_cols = (self.pos[:, : self.length] != NO_TOKEN).any(0).nonzero().flatten()
        if used_cols.numel() == self.length:
            return
        for layer in range(self.num_layers):
            self.keys[layer][:, :, : used_cols.numel()] = self.keys[layer][:, :, used_cols]
            self.values[layer][:, :, : used_cols.numel()] = self.values[layer][:, :, used_cols]
        kept = self.pos[:, used_cols]
        self.pos.fill_(NO_TOKEN)
        self.pos[:, : used_cols.numel()] = kept
        self.length = int(used_cols.numel())
