"""Merged mode: W' = W + s·ΔW while one adapter owns the whole batch; undone by restoring W.

Unquantized bases add in place of the weight; NF4 bases dequantize, add and requantize
(rounding changes outputs slightly); int8 bases are not merged.
"""

from __future__ import annotations

from typing import Any, cast

import torch
from torch import nn

from loraplex.adapters.types import AdapterRef
from loraplex.adapters.weights import LoadedAdapter, LoraModule, VeraWeights
from loraplex.server.engine.multi_linear import MultiAdapterLinear
from loraplex.server.engine.nf4 import repacked
from loraplex.server.errors import LoraplexError


def is_4bit(layer: nn.Module) -> bool:
    return type(layer).__name__ == "Linear4bit"


def can_merge(layer: nn.Module) -> bool:
    return type(layer) is nn.Linear or (is_4bit(layer) and not repacked(layer.weight))


class MergeState:
    def __init__(self, layers: dict[str, MultiAdapterLinear]) -> None:
        self.layers = layers
        self.merged: AdapterRef | None = None
        self._originals: dict[str, nn.Parameter] = {}

    def merge(self, ref: AdapterRef, adapter: LoadedAdapter) -> None:
        if self.merged == ref:
            return
        self.unmerge()
        weights = adapter.weights
        for name, module in weights.modules.items():
            if isinstance(module, LoraModule):
                delta = module.delta_weight()
            else:
                assert isinstance(weights, VeraWeights)
                delta = module.delta_weight(weights.projection, self.layers[name].in_features)
            self._merge_layer(name, delta * ref.scale)
        self.merged = ref

    def unmerge(self) -> None:
        for name, original in self._originals.items():
            self.layers[name].base_layer.weight = original
        self._originals.clear()
        self.merged = None

    def _merge_layer(self, name: str, delta: torch.Tensor) -> None:
        base = self.layers[name].base_layer
        original = base.weight
        assert isinstance(original, nn.Parameter)
        self._originals[name] = original
        if is_4bit(base):
            base.weight = _requantized(original, delta)
        else:
            merged = original.data + delta.to(original.device, original.dtype)
            base.weight = nn.Parameter(merged, requires_grad=False)


def _requantized(weight: nn.Parameter, delta: torch.Tensor) -> nn.Parameter:
    """Dequantize an NF4 weight, add the delta and quantize again (as PEFT's merge does)."""
    import bitsandbytes as bnb  # only present where quantized bases are used

    if repacked(weight):  # a base loaded for merged mode keeps the plain layout
        raise LoraplexError("bitsandbytes repacked this weight for its CPU kernel; cannot merge")
    dense = bnb.functional.dequantize_4bit(weight.data, weight.quant_state)  # type: ignore[attr-defined]
    merged = (dense.float() + delta.to(dense.device).float()).to(dense.dtype)
    kwargs = {k: v for k, v in weight.__dict__.items() if not k.startswith("_")}
    kwargs.update(requires_grad=False, bnb_quantized=False)
    kwargs.pop("data", None)
    kwargs.pop("quant_state", None)
    fresh: Any = bnb.nn.Params4bit(merged.to("cpu"), **kwargs)
    return cast(nn.Parameter, fresh.to(weight.device))  # moving to the device quantizes
