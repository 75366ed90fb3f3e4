"""Load the resident base with transformers (+ bitsandbytes) and wrap its adaptable linears."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, PreTrainedModel
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from loraplex.adapters.peft_format import BaseSpec
from loraplex.server.device import compute_dtype, matmul_dtype
from loraplex.server.engine import packed_attention
from loraplex.server.engine.config import EngineConfig
from loraplex.server.engine.cpu_matmul import faster_output_head, weight_first_pays
from loraplex.server.engine.fused_norm import fuse_gemma_norms
from loraplex.server.engine.multi_linear import MultiAdapterLinear
from loraplex.server.engine.nf4 import (
    DecodeKernelNf4,
    decode_kernel_fits,
    use_fused_kernel,
)
from loraplex.server.engine.output_head import (
    int8_head_pays,
    int8_head_possible,
    quantize_output_head,
)
from loraplex.server.engine.routing import RoutingContext

log = logging.getLogger(__name__)
LINEAR_TYPES = ("Linear", "Linear4bit", "Linear8bitLt")
# Ordinary prose whose forward shows which hidden channels run large (output_head=int8).
OUTPUT_HEAD_CALIBRATION = (
    "A library lends books, music and films to anyone with a card. Most branches open at "
    "nine in the morning; on Sundays they close early. Ask at the desk for help finding a "
    "title, printing a page or booking a study room."
)


@dataclass
class LoadedBase:
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    layers: dict[str, MultiAdapterLinear]
    spec: BaseSpec
    dtype: torch.dtype  # activations / adapter stacks


# bitsandbytes (>= 0.50) logs this through `logging` on every int8 matmul whose input is not
# fp16, so Python's once-per-location warning filter never sees it: one record per layer per
# forward. The cast is LLM.int8()'s design, not a fault; the engine keeps fp32/bf16
# activations because casting them to fp16 first changes the outputs (the outlier columns
# and the result are computed in the input's dtype, and the bias is recast in place).
INT8_CAST_LOGGER = "bitsandbytes.autograd._functions"
INT8_CAST_MESSAGE = "MatMul8bitLt: inputs will be cast from"


class _DropInt8InputCast(logging.Filter):
    """Drops exactly bitsandbytes' per-call int8 input-cast notice; its other records pass."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(INT8_CAST_MESSAGE)


_INT8_CAST_FILTER = _DropInt8InputCast()


def quiet_int8_input_cast() -> None:
    """Install the filter on bitsandbytes' logger (idempotent: a logger holds a filter once)."""
    logging.getLogger(INT8_CAST_LOGGER).addFilter(_INT8_CAST_FILTER)


def quantization_kwargs(config: EngineConfig, device: torch.device) -> dict[str, object]:
    dtype = compute_dtype(device)
    if config.quantization == "nf4":
        quant = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=matmul_dtype(device),
        )
        return {"quantization_config": quant, "dtype": dtype}
    if config.quantization == "int8":
        return {"quantization_config": BitsAndBytesConfig(load_in_8bit=True), "dtype": dtype}
    return {"dtype": torch.bfloat16 if config.quantization == "bf16" else torch.float32}


def load_base(config: EngineConfig, device: torch.device, routing: RoutingContext) -> LoadedBase:
    if config.quantization == "int8":
        quiet_int8_input_cast()
    model = AutoModelForCausalLM.from_pretrained(
        config.checkpoint,
        device_map={"": device},
        attn_implementation=packed_attention.register(),
        **quantization_kwargs(config, device),
    )
    return prepare_base(model, AutoTokenizer.from_pretrained(config.checkpoint), config, routing)


def prepare_base(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    config: EngineConfig,
    routing: RoutingContext,
) -> LoadedBase:
    """Make a loaded model the engine's base: its decoder linears wrapped for per-row adapters
    and the fast forwards installed, in new modules over the same weight tensors."""
    model.eval().requires_grad_(False)
    dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
    layers = wrap_linears(model, routing, config.adapter_slots + 1, config.max_lora_rank, dtype)
    for layer in layers.values():
        layer.base_forward = nf4_forward(config, layer.base_layer, layer.base_forward)
    fuse_gemma_norms(model)
    install_output_head(config, model, tokenizer)
    shapes = {name: (layer.in_features, layer.out_features) for name, layer in layers.items()}
    model_type = str(getattr(model.config, "model_type", "unknown"))
    embeddings: Any = model.get_input_embeddings()
    hidden = int(embeddings.embedding_dim)
    spec = BaseSpec(model_type, shapes, config.max_lora_rank, hidden_size=hidden)
    return LoadedBase(model, tokenizer, layers, spec, dtype)


def install_output_head(
    config: EngineConfig, model: nn.Module, tokenizer: PreTrainedTokenizerBase
) -> None:
    """The int8 head when asked; with auto, where it times faster than the full head at a
    full batch; otherwise the full head, weight-first where that is faster.

    After wrapping the linears: a merging base's calibration forward then runs through the
    engine's own 4-bit forward (nf4.py), so bitsandbytes' does not repack its weights in place.
    """
    full = model.get_submodule("lm_head")
    auto = config.output_head == "auto"
    if config.output_head == "int8" or (auto and int8_head_possible(model)):
        calibration = tokenizer(OUTPUT_HEAD_CALIBRATION, return_tensors="pt").input_ids
        quantize_output_head(model, calibration)
        if not auto:
            return
        assert isinstance(full, nn.Linear)  # int8_head_possible
        if int8_head_pays(full, model.get_submodule("lm_head"), config.max_batch_size):
            log.info("output head: int8 (output_head=auto: faster than full here)")
            return
        model.lm_head = full
    log.info("output head: full")
    faster_output_head(model)


def uses_fused_kernel(config: EngineConfig) -> bool:
    """Whether 4-bit layers repack for bitsandbytes' fused CPU kernel (where the CPU has one).
    A base that merges keeps the plain layout: bitsandbytes cannot merge into a repacked
    weight."""
    return config.adapter_mode != "merged" and config.nf4_kernel == "fused"


def nf4_forward(config: EngineConfig, layer: nn.Module, plain: Callable[..., Any]) -> Any:
    """The 4-bit layer's forward: bitsandbytes' own, repacked (fused); dequantizing prompts and
    loraplex's NF4 kernel for decode steps (auto, where it runs); else `plain`."""
    if uses_fused_kernel(config):
        return layer if use_fused_kernel(layer) else plain
    if config.nf4_kernel == "auto" and decode_kernel_fits(layer):
        return DecodeKernelNf4(layer, weight_first_pays())
    return plain


def wrap_linears(
    model: nn.Module, routing: RoutingContext, num_slots: int, max_rank: int, dtype: torch.dtype
) -> dict[str, MultiAdapterLinear]:
    """Replace every linear layer of the decoder blocks (the all-linear set, lm_head excluded)."""
    targets = [
        (name, module)
        for name, module in model.named_modules()
        if type(module).__name__ in LINEAR_TYPES and ".layers." in f".{name}"
    ]
    wrapped: dict[str, MultiAdapterLinear] = {}
    for name, module in targets:
        shape = (int(module.in_features), int(module.out_features))  # type: ignore[arg-type]
        layer = MultiAdapterLinear(module, shape, routing, num_slots, max_rank, dtype)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, layer)
        wrapped[name] = layer
    return wrapped
