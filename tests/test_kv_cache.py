"""The batch KV cache through random joins, decodes and leaves, against what each sequence
wrote: every live row must see exactly its own tokens, at their positions, and its masks
must allow exactly its causal window."""

from __future__ import annotations

import random
from itertools import accumulate

import pytest
import torch
import torch.nn.functional as F

from loraplex.server.engine.kv_cache import (
    NO_TOKEN,
    BatchKVCache,
    packed_attention_mask,
    packed_positions,
)

LAYERS, HEADS, DIM = 2, 1, 3


def _cache() -> BatchKVCache:
    return BatchKVCache(LAYERS, HEADS, DIM, torch.device("cpu"), torch.float32)


def _value(seq: int, position: int, layer: int) -> float:
    return float(seq * 1000 + position * 10 + layer)


def _forward(cache: BatchKVCache, owners: list[list[int]], positions: list[list[int]]) -> None:
    """What a model forward does to the cache: begin, one update per layer, commit.
    owners[i][j] is the sequence whose token goes into column j of row i."""
    pos = torch.tensor(positions, dtype=torch.long)
    cache.begin(pos)
    for layer in range(LAYERS):
        key = torch.tensor(
            [[[_value(s, p, layer) if p != NO_TOKEN else -7.0] for s, p in zip(o, row, strict=True)]
             for o, row in zip(owners, positions, strict=True)]
        )  # fmt: skip
        key = key[:, None].expand(-1, HEADS, -1, DIM).clone()
        seen_keys, seen_values = cache.update(key, -key, layer)
        assert seen_keys.shape[0] == len(owners)
        assert seen_keys.shape[2] == seen_values.shape[2] == cache.length + pos.shape[1]
    cache.commit(pos.shape[1])


def _prefill(cache: BatchKVCache, seqs: list[int], lengths: dict[int, int]) -> None:
    """The engine's prefill: the prompts packed back to back in one fresh row."""
    packed = [lengths[s] for s in seqs]
    fresh = _cache()
    fresh.add_rows(1)
    owners = [s for s in seqs for _ in range(lengths[s])]
    _forward(fresh, [owners], packed_positions(packed, torch.device("cpu")).tolist())
    cache.extend(fresh, packed)


def _check(cache: BatchKVCache, rows: list[int], lengths: dict[int, int]) -> None:
    assert cache.rows == len(rows)
    if not rows:
        return
    pos = cache.pos[:, : cache.length]
    for i, seq in enumerate(rows):
        columns = (pos[i] != NO_TOKEN).nonzero().flatten()
        positions = pos[i, columns].tolist()
        assert sorted(positions) == list(range(lengths[seq])), (seq, positions)
        for layer in range(LAYERS):
            keys = cache.keys[layer][i, 0, columns, 0].tolist()
            values = cache.values[layer][i, 0, columns, 0].tolist()
            assert keys == [_value(seq, p, layer) for p in positions]
            assert values == [-k for k in keys]
        for store in (cache.keys, cache.values):  # what forwards read: masked, but finite
            assert all(torch.isfinite(store[layer][i, :, : cache.length]).all()
                       for layer in range(LAYERS))  # fmt: skip
    # A decode query at each row's next position may see exactly that row's tokens. It is
    # reserved and never committed, as by a forward that failed; later steps must cope.
    query = torch.tensor([[lengths[s]] for s in rows], dtype=torch.long)
    cache.begin(query)
    mask = cache.attention_mask(query, None, torch.float32)[:, 0, 0]
    allowed = mask == 0
    for i, seq in enumerate(rows):
        seen = cache.pos[i, : cache.length + 1][allowed[i]].tolist()
        assert sorted(seen) == list(range(lengths[seq] + 1))


def _poison_fresh_storage(monkeypatch: pytest.MonkeyPatch) -> None:
    """Storage that grows comes uninitialized; here it holds the worst it could: NaN."""

    def nan_filled(self: BatchKVCache, rows: int, columns: int) -> torch.Tensor:
        shape = (rows, self.kv_heads, columns, self.head_dim)
        return torch.full(shape, float("nan"), dtype=self.dtype)

    monkeypatch.setattr(BatchKVCache, "_empty", nan_filled)


@pytest.mark.parametrize("seed", range(6))
def test_rows_see_only_their_own_tokens_through_joins_decodes_and_leaves(
    seed: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    _poison_fresh_storage(monkeypatch)
    rng = random.Random(seed)
    cache = _cache()
    rows: list[int] = []  # the sequence held by each row
    lengths: dict[int, int] = {}
    next_seq = 1
    for _ in range(60):
        action = rng.random()
        if action < 0.3 or not rows:
            joining = list(range(next_seq, next_seq + rng.randint(1, 3)))
            next_seq += len(joining)
            lengths.update({s: rng.randint(1, 9) for s in joining})
            _prefill(cache, joining, lengths)
            rows += joining
        elif action < 0.5:
            kept = sorted(rng.sample(range(len(rows)), rng.randint(0, len(rows))))
            order = cache.keep_rows(kept)
            assert sorted(order) == kept
            rows = [rows[i] for i in order]
        else:  # decode; some rows may sit this step out
            active = [rng.random() < 0.8 for _ in rows]
            positions = [[lengths[s] if a else NO_TOKEN] for s, a in zip(rows, active, strict=True)]
            _forward(cache, [[s] for s in rows], positions)
            for s, a in zip(rows, active, strict=True):
                lengths[s] += a
        _check(cache, rows, lengths)


def test_keeping_rows_moves_only_those_past_the_end_into_the_holes() -> None:
    cache = _cache()
    lengths = {s: 2 for s in range(1, 7)}
    _prefill(cache, list(range(1, 7)), lengths)
    order = cache.keep_rows([0, 2, 4, 5])
    assert order == [0, 4, 2, 5]
    _check(cache, [1, 5, 3, 6], lengths)


def test_an_empty_batch_gives_its_storage_back() -> None:
    cache = _cache()
    lengths = {1: 30, 2: 5}
    _prefill(cache, [1, 2], lengths)
    cache.keep_rows([])
    assert (cache.rows, cache.length, cache.capacity) == (0, 0, 0)
    assert all(k.numel() == 0 for k in cache.keys + cache.values)
    _prefill(cache, [2], lengths)
    _check(cache, [2], lengths)


def test_columns_no_live_row_uses_are_squeezed_out() -> None:
    cache = _cache()
    lengths = {1: 8, 2: 2}
    _prefill(cache, [1], lengths)
    _prefill(cache, [2], lengths)
    for _ in range(3):
        _forward(cache, [[1], [2]], [[lengths[1]], [lengths[2]]])
        lengths = {s: n + 1 for s, n in lengths.items()}
    assert cache.length == 8 + 3
    cache.keep_rows([1])  # the long row leaves: 6 of 11 columns fall out of use
    assert cache.length == lengths[2]
    _check(cache, [2], lengths)


@pytest.mark.parametrize("window", [None, 3])
def test_packed_prompts_attend_as_if_each_were_alone(window: int | None) -> None:
    """Attention over prompts packed in one row, against each prompt alone with torch's own
    causal (and banded, for a sliding window) attention."""
    lengths = [4, 1, 6, 3]
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, sum(lengths), 5, generator=gen) for _ in range(3))
    mask = packed_attention_mask(lengths, window, torch.float32, torch.device("cpu"))
    got = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    starts = [0, *accumulate(lengths[:-1])]
    for start, length in zip(starts, lengths, strict=True):
        span = slice(start, start + length)
        alone = torch.ones(length, length, dtype=torch.bool).tril()
        if window is not None:
            alone = alone.triu(-(window - 1))
        want = F.scaled_dot_product_attention(q[:, :, span], k[:, :, span], v[:, :, span],
                                              attn_mask=alone)  # fmt: skip
        torch.testing.assert_close(got[:, :, span], want)
