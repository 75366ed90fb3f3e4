"""Adapters written by PEFT itself (random, non-trivial weights) and PEFT reference generations."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import LoraConfig, PeftConfig, PeftModel, VeraConfig, get_peft_model
from transformers import AutoModelForCausalLM, PreTrainedModel

from loraplex.adapters.peft_format import BaseSpec

# Three LoRA flavours and a VeRA with a regenerated projection, as the oracle tests mix them.
ADAPTER_CONFIGS: dict[str, PeftConfig] = {
    "lora-qv-r4": LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    "rslora-all-r8": LoraConfig(
        r=8,
        lora_alpha=16,
        target_modules="all-linear",
        use_rslora=True,
        rank_pattern={"o_proj": 4},
        alpha_pattern={"down_proj": 4},
    ),
    "vera-r16": VeraConfig(
        r=16, target_modules=["q_proj", "v_proj", "up_proj", "down_proj"], save_projection=False
    ),
}


def randomize_adapter(model: torch.nn.Module, seed: int, std: float) -> None:
    """Trainable adapter tensors get random values so every adapter changes the output."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.requires_grad:
                noise = torch.randn(param.shape, generator=generator) * std
                param.copy_(noise.to(param.device, param.dtype))
                assert "lora_" in name or "vera_lambda" in name


def save_adapter(
    base: PreTrainedModel, config: PeftConfig, out_dir: Path, seed: int, std: float = 0.3
) -> Path:
    model = get_peft_model(base, copy.deepcopy(config))  # PEFT mutates the config it is given
    randomize_adapter(model, seed, std)
    model.save_pretrained(out_dir)
    model.unload()  # gives the base back unchanged for the next adapter
    return out_dir


def linear_spec(model: torch.nn.Module, max_rank: int = 16) -> BaseSpec:
    """What an AdapterStore validates this model's adapters against: its layers' Linears."""
    shapes = {
        name: (m.in_features, m.out_features)
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and ".layers." in name
    }
    return BaseSpec(str(model.config.model_type), shapes, max_rank)


@dataclass
class Reference:
    tokens: list[int]
    logprobs: list[float]  # log-probability of each chosen token


def load_reference(
    checkpoint: Path, adapter_dir: Path | None, fused_4bit: bool = True, **kwargs: object
) -> PreTrainedModel:
    """PEFT over the base; `fused_4bit=False` keeps bitsandbytes' 4-bit weights in the plain
    layout (dequantize, then multiply), as an engine that does not take the fused CPU kernel."""
    base = AutoModelForCausalLM.from_pretrained(checkpoint, **kwargs).eval()
    if not fused_4bit:
        for module in base.modules():
            if type(module).__name__ == "Linear4bit":
                module.support_avx512bf16_for_cpu = False
    return PeftModel.from_pretrained(base, adapter_dir).eval() if adapter_dir else base


def greedy_reference(model: PreTrainedModel, prompt: list[int], max_new_tokens: int) -> Reference:
    """What PEFT/transformers generate for this request alone."""
    device = next(model.parameters()).device
    out = model.generate(
        input_ids=torch.tensor([prompt], device=device),
        attention_mask=torch.ones(1, len(prompt), dtype=torch.long, device=device),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        output_logits=True,
        return_dict_in_generate=True,
    )
    tokens = out.sequences[0, len(prompt) :].tolist()
    logprobs = [
        float(torch.log_softmax(step[0].float(), -1)[token])
        for step, token in zip(out.logits, tokens, strict=False)
    ]
    return Reference(tokens, logprobs)
