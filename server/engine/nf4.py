"""The CPU forwards of a bitsandbytes 4-bit linear: its fused kernel where the CPU has one,
dequantize-and-multiply minus one op per call, or both, chosen per call by its row count.

On CPUs with AVX512-BF16, bitsandbytes' `Linear4bit.forward` repacks the weight in place (bf16
scales, a tiled layout) on its first call and then runs a fused kernel that multiplies row by
row: fast for a few decode rows, slow for prefill. Which forward a base uses is the engine's
choice (`nf4_forward` in hf_model.py); by default it keeps both layouts and picks per call
(`TwoLayoutNf4`). bitsandbytes cannot merge into a repacked weight, so a base that merges
keeps the plain layout alone.

Otherwise bitsandbytes computes a 4-bit matmul by dequantizing the whole weight and calling
`linear`. With double quantization it first decodes the 8-bit block scales (absmax), on every
call. Those scales are constant while the weight is, so they are decoded once here and kept
(one fp32 per 64 weights: about 10 MiB for Gemma 3 270M). Everything else is bitsandbytes' own
kernel, so outputs are bit-identical to `Linear4bit.forward`, unless the multiply runs
weight-first where that is faster (cpu_matmul.py), which changes only rounding. Profiled on
the real model (16 rows, 1 thread), the scale decoding was ~3% of a decode step.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from loraplex.server.engine.cpu_matmul import weight_first, weight_first_pays


class CachedScalesNf4:
    """Calls like the wrapped `Linear4bit`; follows weight swaps (merges) by identity.

    `bf16_scales`: round the block scales to bf16 first, as the fused kernel's layout stores
    them, so that this forward and `TwoLayoutNf4`'s fused one compute with the same weights.
    """

    def __init__(
        self, layer: nn.Module, weight_first: bool = False, bf16_scales: bool = False
    ) -> None:
        self.layer = layer
        self.weight_first = weight_first  # multiply as (W·xᵀ)ᵀ: cpu_matmul.py
        self.bf16_scales = bf16_scales
        self._weight: object = None
        self._absmax: torch.Tensor | None = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        layer: Any = self.layer
        weight = layer.weight
        state = weight.quant_state
        if repacked(weight):
            return layer(x)  # repacked for another CPU kernel: leave it to bitsandbytes
        if self._weight is not weight:
            absmax = _decoded_absmax(state)
            if self.bf16_scales:
                absmax = absmax.to(torch.bfloat16).float()
            self._absmax, self._weight = absmax, weight
        compute = layer.compute_dtype or x.dtype
        dense = torch.ops.bitsandbytes.dequantize_4bit.default(
            weight.data, self._absmax, state.blocksize, state.quant_type, state.shape, compute
        )
        if self.weight_first:
            y = weight_first(x.to(compute), dense)
            return (y if layer.bias is None else y + layer.bias.to(compute)).to(x.dtype)
        bias = None if layer.bias is None else layer.bias.to(compute)
        return F.linear(x.to(compute), dense, bias).to(x.dtype)


class TwoLayoutNf4:
    """Calls like the wrapped `Linear4bit`, with two layouts of its 4-bit weight: bitsandbytes'
    fused kernel on a repacked copy for decode forwards (one token per row), and
    dequantize-then-multiply on the plain layout for prompts.

    The fused kernel multiplies row by row, fast for decode rows and slow for a prompt; the
    dequantizing forward pays a whole-weight dequantization per call, which a prompt repays
    and a decode step does not. Whole decode steps of Gemma 3 270M (int8 head, 2 threads),
    fused against dequantizing: 73 / 91 ms at 16 rows, 128 / 150 ms at 32, 207 / 198 ms at 64;
    a 64-token prompt takes 1.3-1.45x longer fused. The choice follows the forward's kind, not
    its size, so a sequence's outputs do not depend on the batch it runs in. The copy costs
    as much memory again as the 4-bit weights (about 55 MiB for Gemma 3 270M). Both forwards
    use the same bf16-rounded block scales. A swapped weight (a merge) has no repacked copy,
    so it takes the dequantizing forward.
    """

    def __init__(self, layer: nn.Module, weight_first: bool = False) -> None:
        self.layer = layer
        self.dequantized = CachedScalesNf4(layer, weight_first, bf16_scales=True)
        self._weight = layer.weight
        self.packed, self.packed_state = _repacked_copy(layer.weight)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        layer: Any = self.layer
        decoding = x.dim() == 3 and x.shape[1] == 1  # [rows, tokens, features]
        if not decoding or layer.weight is not self._weight:
            return self.dequantized(x)
        import bitsandbytes as bnb  # only present where quantized bases are used

        compute = layer.compute_dtype or x.dtype  # as Linear4bit.forward: equal outputs
        y = bnb.functional.gemv_4bit(x.to(compute), self.packed, state=self.packed_state)
        if layer.bias is not None:
            y += layer.bias.to(compute)
        return y.to(x.dtype)


def _repacked_copy(weight: Any) -> tuple[torch.Tensor, Any]:
    """The weight and its quantization state in the fused kernel's layout, leaving `weight`
    as it is (the conversion bitsandbytes' `Linear4bit.forward` applies in place)."""
    from bitsandbytes.functional import _convert_weight_packed_for_cpu

    state = copy.deepcopy(weight.quant_state)
    packed, state = _convert_weight_packed_for_cpu(weight.data, state)
    return packed, state


def _decoded_absmax(state: Any) -> torch.Tensor:
    if not state.nested:
        return state.absmax.float()
    import bitsandbytes as bnb  # only present where quantized bases are used

    absmax = bnb.functional.dequantize_blockwise(state.absmax, state.state2) + state.offset
    return absmax.float()


def has_fused_kernel(layer: nn.Module) -> bool:
    """bitsandbytes has a fused CPU kernel for this 4-bit layer (AVX512-BF16 CPUs)."""
    bnb_layer: Any = layer
    fused = getattr(bnb_layer, "support_avx512bf16_for_cpu", False)
    return type(layer).__name__ == "Linear4bit" and fused and bnb_layer.weight.device.type == "cpu"


def use_fused_kernel(layer: nn.Module) -> bool:
    """Let bitsandbytes repack a CPU 4-bit weight for its fused kernel now, rather than on the
    first request; True when it did (AVX512-BF16 CPUs), and `layer` is then its own fastest
    forward."""
    if not has_fused_kernel(layer):
        return False
    bnb_layer: Any = layer
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
