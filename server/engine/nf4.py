"""The CPU forwards of a bitsandbytes 4-bit linear: dequantize-and-multiply minus one op per
call for prompts, and for decode steps loraplex's NF4 kernel where the CPU runs it.

By default (`nf4_forward` in hf_model.py) a 4-bit layer takes `DecodeKernelNf4`: decode
forwards run nf4_kernel.py's kernel on the plain layout, prompts dequantize. On CPUs with
AVX512-BF16, bitsandbytes' `Linear4bit.forward` can instead repack the weight in place (bf16
scales, a tiled layout) for its own fused kernel, which multiplies row by row: fast for a
few decode rows, slow for prefill (`--nf4-kernel fused`). bitsandbytes cannot merge into a
repacked weight; the plain layout merges.

Otherwise bitsandbytes computes a 4-bit matmul by dequantizing the whole weight and calling
`linear`. With double quantization it first decodes the 8-bit block scales (absmax), on every
call. Those scales are constant while the weight is, so they are decoded once here and kept
(one fp32 per 64 weights: about 10 MiB for Gemma 3 270M). Everything else is bitsandbytes' own
kernel, so outputs are bit-identical to `Linear4bit.forward`, unless the multiply runs
weight-first where that is faster (cpu_matmul.py), which changes only rounding. Decoding the
scales on every call was a visible share of a decode step (docs/measurements.md).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from loraplex.server.engine import nf4_kernel
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
        absmax = self._scales(weight)
        compute = layer.compute_dtype or x.dtype
        dense = torch.ops.bitsandbytes.dequantize_4bit.default(
            weight.data, absmax, state.blocksize, state.quant_type, state.shape, compute
        )
        if self.weight_first:
            y = weight_first(x.to(compute), dense)
            return (y if layer.bias is None else y + layer.bias.to(compute)).to(x.dtype)
        bias = None if layer.bias is None else layer.bias.to(compute)
        return F.linear(x.to(compute), dense, bias).to(x.dtype)

    def _scales(self, weight: Any) -> torch.Tensor:
        """The weight's fp32 block scales, decoded once per weight."""
        if self._weight is not weight or self._absmax is None:
            self._absmax, self._weight = _decoded_absmax(weight.quant_state), weight
        return self._absmax


class DecodeKernelNf4(CachedScalesNf4):
    """CachedScalesNf4 whose decode forwards (one token per row) run loraplex's NF4 kernel
    (nf4_kernel.py) on the same plain-layout weight; prompts still dequantize.

    Both compute with the same bf16 weights, so only the order of the sums differs. The
    kernel reads the 4-bit weight once per call, where dequantizing writes and reads a whole
    bf16 copy of it and bitsandbytes' fused kernel decodes the weight again for every row:
    decode steps run at least as fast as with the fused kernel, without its repacked copy of
    the weights (figures: docs/measurements.md). The choice follows the forward's kind, not
    its size, so a row's outputs
    do not depend on the batch it runs in.
    """

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        layer: Any = self.layer
        weight = layer.weight
        if x.dim() != 3 or x.shape[1] != 1 or repacked(weight):  # [rows, tokens, features]
            return super().__call__(x)
        state = weight.quant_state
        compute = layer.compute_dtype or torch.bfloat16
        flat = x.reshape(-1, x.shape[-1]).to(torch.bfloat16).contiguous()
        y = nf4_kernel.nf4_gemm(
            flat, weight.data.reshape(-1), self._scales(weight), state.code,
            int(state.shape[0]), int(state.blocksize),
        ).to(compute)  # fmt: skip
        if layer.bias is not None:
            y = y + layer.bias.to(compute)
        return y.view(*x.shape[:-1], -1).to(x.dtype)


def decode_kernel_fits(layer: nn.Module) -> bool:
    """A CPU 4-bit NF4 layer whose shape the NF4 decode kernel takes, on a CPU that runs it."""
    bnb_layer: Any = layer
    if type(layer).__name__ != "Linear4bit" or bnb_layer.weight.device.type != "cpu":
        return False
    state = bnb_layer.weight.quant_state
    if state.quant_type != "nf4" or not nf4_kernel.fits(int(state.shape[1]), state.blocksize):
        return False
    return nf4_kernel.available()


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
