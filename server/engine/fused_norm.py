"""Gemma's RMSNorm as one fused torch op.

transformers' Gemma RMSNorm runs eight small ops per call (cast, pow, mean, add, rsqrt,
two multiplies, 1 + weight); Gemma 3 270M calls it six times per layer, about 110 times
per decode step. `torch.nn.functional.rms_norm` computes the same float operations in the
same order in one op: equal outputs (tests/test_fused_norm.py compares them), at a fraction
of the cost of the eight small ops (figures: docs/measurements.md).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

# Norms that compute (x / rms(x)) * (1 + weight) in fp32, then cast back.
GEMMA_NORMS = ("GemmaRMSNorm", "Gemma2RMSNorm", "Gemma3RMSNorm")


class FusedGemmaRMSNorm(nn.Module):
    """Calls like the Gemma RMSNorm it replaces; its (1 + weight) is computed once, since
    serving never changes the base's weights."""

    scale: torch.Tensor  # a buffer, registered in __init__

    def __init__(self, norm: nn.Module) -> None:
        super().__init__()
        weight = norm.weight
        assert isinstance(weight, torch.Tensor)
        self.eps = float(norm.eps)  # type: ignore[arg-type]
        self.shape = (int(weight.shape[-1]),)
        self.register_buffer("scale", 1.0 + weight.detach().float(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x.float(), self.shape, self.scale, self.eps).type_as(x)


def fuse_gemma_norms(model: nn.Module) -> int:
    """Replace every Gemma RMSNorm in `model`; returns how many were replaced."""
    targets = [name for name, m in model.named_modules() if type(m).__name__ in GEMMA_NORMS]
    for name in targets:
        parent, _, child = name.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        setattr(owner, child, FusedGemmaRMSNorm(owner.get_submodule(child)))
    return len(targets)
