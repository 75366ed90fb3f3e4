"""Random PEFT adapters (LoRA or VeRA, of the trace's ranks) written for a load benchmark."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch
from peft import LoraConfig, PeftConfig, VeraConfig, get_peft_model
from tqdm import tqdm
from transformers import AutoModelForCausalLM

from loraplex.bench.workload import AdapterSpec

VERA_TARGETS = ["q_proj", "v_proj", "up_proj"]  # VeRA's shared projection spans these widths


def peft_config(spec: AdapterSpec) -> PeftConfig:
    if spec.kind == "vera":
        return VeraConfig(r=spec.rank, target_modules=VERA_TARGETS, save_projection=True)
    return LoraConfig(r=spec.rank, lora_alpha=2 * spec.rank, target_modules="all-linear")


def write_adapters(
    checkpoint: Path, root: Path, adapters: Iterable[AdapterSpec], progress: bool = True
) -> None:
    """One directory per adapter id under `root`; ids already there are kept as they are."""
    todo = [a for a in adapters if not (root / a.adapter_id / "adapter_config.json").is_file()]
    if not todo:
        return
    base = AutoModelForCausalLM.from_pretrained(checkpoint)
    for spec in tqdm(todo, desc="writing adapters", unit="adapter", disable=not progress):
        model = get_peft_model(base, peft_config(spec))
        generator = torch.Generator().manual_seed(int(spec.adapter_id.rsplit("-", 1)[1]))
        std = 0.3 if spec.kind == "vera" else 0.02  # VeRA's effect is a product of two vectors
        with torch.no_grad():
            for param in model.parameters():
                if param.requires_grad:
                    param.copy_(torch.randn(param.shape, generator=generator) * std)
        model.save_pretrained(str(root / spec.adapter_id))
        base = model.unload()  # type: ignore[assignment]
