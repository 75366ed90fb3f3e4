"""Load the base model and tokenizer for training or scoring, quantized as asked.

The server's model provisioning is used lazily, inside functions: `adapters/` must not
depend on `server/` at import time.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from loraplex.adapters.trainer.config import BaseModelConfig, Quantization


@dataclass(frozen=True)
class BaseInfo:
    """What an adapter records about the base it was trained on."""

    spec: str
    checkpoint: Path
    sha256: str


def resolve_base(config: BaseModelConfig) -> BaseInfo:
    """The transformers checkpoint for the config's model spec, and a checksum naming it."""
    from loraplex.server import models

    source = models.resolve(config.model, config.cache_dir)
    checkpoint = models.hf_checkpoint(source, config.cache_dir)
    return BaseInfo(config.model, checkpoint, source.sha256 or _checkpoint_sha256(checkpoint))


def _checkpoint_sha256(checkpoint: Path) -> str:
    """A GGUF-derived checkpoint records its source's hash; otherwise hash the weights."""
    from loraplex.server.models import sha256_file

    recorded = checkpoint / "loraplex-source.json"
    if recorded.is_file():
        return str(json.loads(recorded.read_text())["sha256"])
    weights = sorted(checkpoint.glob("*.safetensors"))
    return ",".join(sha256_file(w) for w in weights) if weights else "unknown"


def pick_device(name: str) -> torch.device:
    from loraplex.server.device import pick_device as server_pick_device

    return server_pick_device(name)


def compute_dtype(device: torch.device) -> torch.dtype:
    """bf16 compute where the device runs it natively (CUDA), fp32 on the CPU."""
    from loraplex.server.device import compute_dtype as server_compute_dtype

    return server_compute_dtype(device)


def quantization_config(quantization: Quantization, dtype: torch.dtype) -> Any:
    from transformers import BitsAndBytesConfig

    if quantization == "nf4":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
        )
    if quantization == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return None


def load_base(
    checkpoint: Path, quantization: Quantization, device: torch.device
) -> PreTrainedModel:
    dtype = compute_dtype(device)
    model = AutoModelForCausalLM.from_pretrained(
        checkpoint,
        dtype=dtype,
        quantization_config=quantization_config(quantization, dtype),
        device_map={"": device},
        # Eager attention is what Gemma 3 recommends for training; it also pads safely.
        attn_implementation="eager",
    )
    return model


def load_tokenizer(checkpoint: Path) -> Any:
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
