"""What the engine is measured against: random PEFT adapters, and PEFT serving them itself."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from loraplex.server.engine.config import EngineConfig
from loraplex.server.engine.hf_model import OUTPUT_HEAD_CALIBRATION, quantization_kwargs
from loraplex.server.engine.output_head import quantize_output_head


def make_adapters(checkpoint: Path, root: Path, count: int) -> list[str]:
    """`count` rank-16 all-linear LoRAs with random (non-zero) A and B, written by PEFT."""
    base = AutoModelForCausalLM.from_pretrained(checkpoint)
    names = []
    for i in range(count):
        config = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear")
        model = get_peft_model(base, config)
        generator = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for param in model.parameters():
                if param.requires_grad:
                    param.copy_(torch.randn(param.shape, generator=generator) * 0.02)
        model.save_pretrained(str(root / f"lora-{i}"))
        base = model.unload()  # type: ignore[assignment]
        names.append(f"lora-{i}")
    return names


def peft_model(checkpoint: Path, root: Path, names: list[str], config: EngineConfig) -> PeftModel:
    """The same quantized base as the engine's, with PEFT's own LoRA layers."""
    kwargs = quantization_kwargs(config, torch.device("cpu"))
    base = AutoModelForCausalLM.from_pretrained(checkpoint, **kwargs).eval()
    model = PeftModel.from_pretrained(base, root / names[0], adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(root / name, adapter_name=name)
    if config.output_head == "int8":  # the same output head as the engine's
        tokenizer = AutoTokenizer.from_pretrained(checkpoint)
        calibration = tokenizer(OUTPUT_HEAD_CALIBRATION, return_tensors="pt").input_ids
        quantize_output_head(model.get_base_model(), calibration)
    return model.eval()


def peft_naive(model: PeftModel, prompts: list[list[int]], adapters: list[str], n: int) -> int:
    """One request at a time: set_adapter, then generate."""
    tokens = 0
    for prompt, adapter in zip(prompts, adapters, strict=True):
        model.set_adapter(adapter)
        out = model.generate(input_ids=torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n,
                             do_sample=False)  # fmt: skip
        tokens += out.shape[1] - len(prompt)
    return tokens


def peft_static(model: PeftModel, prompts: list[list[int]], adapters: list[str], n: int) -> int:
    """One left-padded batch with a per-row adapter (PEFT's mixed-batch forward)."""
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    out = model.generate(input_ids=ids, attention_mask=mask, adapter_names=adapters,
                         max_new_tokens=n, min_new_tokens=n, do_sample=False)  # fmt: skip
    return int((out.shape[1] - width) * len(prompts))


if __name__ == "__main__":  # CHECKPOINT ROOT COUNT: write the adapters (used in a child process)
    make_adapters(Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]))
