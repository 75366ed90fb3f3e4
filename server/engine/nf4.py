"""The CPU forward of a bitsandbytes 4-bit linear: its fused kernel where the CPU has one,
else dequantize-and-multiply minus one op per call.

On CPUs with AVX512-BF16, bitsandbytes' `Linear4bit.forward` repacks the weight in place (bf16
scales, a tiled layout) on its first call and then runs a fused kernel that multiplies row by
row: fast for a few decode rows, slow for prefill. Which of the two a base uses is the
engine's choice (`wants_fused_kernel` in hf_model.py, with its measurements); bitsandbytes
cannot merge into a repacked weight, so a base that merges keeps the plain layout.

Otherwise bitsandbytes computes a 4-bit matmul by dequantizing the whole weight and calling
`linear`. With double quantization it first decodes the 8-bit block scales (absmax), on every
call. Those scales are constant while the weight is, so they are decoded once here and kept
(one fp32 per 64 weights: about 10 MiB for Gemma 3 270M). Everything else is bitsandbytes' own
kernel, so outputs are bit-identical to `Linear4bit.forward`, unless the multiply runs
weight-first where that is faster (cpu_matmul.py), which changes only rounding. Profiled on
the real model (16 rows, 1 thread), the scale decoding was ~3% of a decode step.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from loraplex.server.engine.cpu_matmul import weight_first, weight_first_pays


class CachedScalesNf4:
    """Calls like the wrapped `Linear4bit`; follows weight swaps (merges) by identity."""

    def __init__(self, layer: nn.Module, weight_first: bool = False) -> None:
        self.layer = layer
        self.weight_first = weight_first  # multiply as (W·xᵀ)ᵀ: cpu_matmul.py
        self._weight: object = None
        self._absmax: torch.Tensor | None = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        layer: Any = self.layer
        weight = layer.weight
        state = weight.quant_state
        if repacked(weight):
            return layer(x)  # repacked for another CPU kernel: leave it to bitsandbytes
        if self._weight is not weight:
            self._absmax, self._weight = _decoded_absmax(state), weight
        compute = layer.compute_dtype or x.dtype
        dense = torch.ops.bitsandbytes.dequantize_4bit.default(
            weight.data, self._absmax, state.blocksize, state.quant_type, state.shape, compute
        )
        if self.weight_first:
            y = weight_first(x.to(compute), dense)
            return (y if layer.bias is None else y + layer.bias.to(compute)).to(x.dtype)
        bias = None if layer.bias is None else layer.bias.to(compute)
        return F.linear(x.to(compute), dense, bias).to(x.dtype)


def _decoded_absmax(state: Any) -> torch.Tensor:
    if not state.nested:
        return state.absmax.float()
    import bitsandbytes as bnb  # only present where quantized bases are used

    absmax = bnb.functional.dequantize_blockwise(state.absmax, state.state2) + state.offset
    return absmax.float()


def use_fused_kernel(layer: nn.Module) -> bool:
    """Let bitsandbytes repack a CPU 4-bit weight for its fused kernel now, rather than on the
    first request; True when it did (AVX512-BF16 CPUs), and `layer` is then its own fastest
    forward."""
    bnb_layer: Any = layer
    fused = getattr(bnb_layer, "support_avx512bf16_for_cpu", False)
    if type(layer).__name__ != "Linear4bit" or not fused or bnb_layer.weight.device.type != "cpu":
        return False
    dtype = bnb_layer.compute_dtype or torch.bfloat16  # the fused kernel computes in bf16
    with torch.no_grad():
        layer(torch.zeros(1, int(bnb_layer.weight.quant_state.shape[1]), dtype=dtype))
    return repacked(bnb_layer.weight)


def repacked(weight: object) -> bool:
    """bitsandbytes repacked this 4-bit weight for its fused CPU kernel."""
    return bool(getattr(getattr(weight, "quant_state", None), "packing_format_for_cpu", False))


def base_forward(layer: nn.Module, device: torch.device) -> Any:
    """The fastest exact forward for this base layer on this device."""
    if type(layer).__name__ == "Linear4bit" and device.type == "cpu":
        return CachedScalesNf4(layer, weight_first_pays())
    return layer  # CUDA has real 4-bit kernels; other layers have nothing to cache
