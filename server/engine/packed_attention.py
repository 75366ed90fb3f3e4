"""Attention that keeps the prompts of a packed prefill apart.

A packed prefill lays several prompts back to back in one row. One attention over the whole
row with a block-diagonal mask would still let one prompt's values reach another's: a masked
score is the dot product plus the mask, so an infinite key makes it +inf or NaN, and a zero
attention weight times a NaN value is NaN. So each prompt's queries meet only its own keys and
values, in one SDPA call per prompt; every other forward is plain SDPA.

The engine passes the prompts' lengths as the model forward's `packed_lengths` keyword, which
transformers hands to every attention call.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

NAME = "loraplex_packed_sdpa"


def packed_sdpa(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    packed_lengths: list[int] | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """SDPA per packed prompt ([batch, heads, tokens, dim] in; [batch, tokens, heads, dim]
    out, as transformers' attention functions return it)."""
    if not packed_lengths or len(packed_lengths) == 1:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    outputs = []
    start = 0
    for length in packed_lengths:
        span = slice(start, start + length)
        mask = None if attention_mask is None else attention_mask[..., span, span]
        out, _ = sdpa_attention_forward(
            module, query[:, :, span], key[:, :, span], value[:, :, span], mask, **kwargs
        )
        outputs.append(out)
        start += length
    return torch.cat(outputs, dim=1), None


def register() -> str:
    """Make the attention known to transformers; returns the `attn_implementation` name."""
    AttentionInterface.register(NAME, packed_sdpa)
    return NAME
