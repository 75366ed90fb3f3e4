"""The bad-input matrix every backend must answer with the right status, and still serve."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import grpc
import torch
from peft import LoraConfig, get_peft_model
from peft_adapters import ADAPTER_CONFIGS, save_adapter
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

BAD_GENERATIONS = [
    ({"adapter": "no-such-adapter"}, grpc.StatusCode.NOT_FOUND, "no-such-adapter"),
    ({"adapter": "../lora"}, grpc.StatusCode.INVALID_ARGUMENT, "adapter_id"),
    ({"adapter": "swap/../lora"}, grpc.StatusCode.INVALID_ARGUMENT, "adapter_id"),
    ({"adapter": "/etc"}, grpc.StatusCode.INVALID_ARGUMENT, "adapter_id"),
    ({"prompt": ""}, grpc.StatusCode.INVALID_ARGUMENT, "prompt"),
    ({"prompt": "hello world " * 20_000}, grpc.StatusCode.INVALID_ARGUMENT, "prompt"),
    ({"max_new_tokens": 0}, grpc.StatusCode.INVALID_ARGUMENT, "max_new_tokens"),
    ({"max_new_tokens": 10**9}, grpc.StatusCode.INVALID_ARGUMENT, "max_new_tokens"),
    ({"temperature": -1.0}, grpc.StatusCode.INVALID_ARGUMENT, "temperature"),
    ({"top_p": 0.0}, grpc.StatusCode.INVALID_ARGUMENT, "top_p"),
    ({"top_p": 1.01}, grpc.StatusCode.INVALID_ARGUMENT, "top_p"),
    ({"adapter": "bad-shapes"}, grpc.StatusCode.FAILED_PRECONDITION, "shape"),
    ({"adapter": "bad-arch"}, grpc.StatusCode.FAILED_PRECONDITION, "bad-arch"),
    ({"adapter": "bad-pickle"}, grpc.StatusCode.FAILED_PRECONDITION, "safetensors"),
    ({"adapter": "bad-alora"}, grpc.StatusCode.FAILED_PRECONDITION, "alora_invocation_tokens"),
    ({"adapter": "bad-fp8"}, grpc.StatusCode.FAILED_PRECONDITION, "F8_E4M3"),
    ({"adapter": "bad-overflow"}, grpc.StatusCode.FAILED_PRECONDITION, "overflow"),
    ({"adapter": "bad-alpha"}, grpc.StatusCode.FAILED_PRECONDITION, "overflow"),
    ({"request_id": "x" * 257}, grpc.StatusCode.INVALID_ARGUMENT, "request_id"),
]
# Copies of a good adapter with one thing changed that loraplex must refuse, not serve.
EDITED_COPIES = ["bad-alora", "bad-fp8", "bad-overflow", "bad-alpha"]


def write_bad_adapters(root: Path, good: Path) -> None:
    """bad-shapes, bad-arch and bad-pickle (a copy of the good adapter `good`, as a pickle)."""
    # Wrong shapes: the same module names on a narrower llama.
    narrow = LlamaConfig(
        vocab_size=320, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8,
    )  # fmt: skip
    save_adapter(LlamaForCausalLM(narrow), ADAPTER_CONFIGS["lora-qv-r4"], root / "bad-shapes", 5)
    # Another architecture: GPT-2's fused attention projection.
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=320, n_embd=64, n_layer=2, n_head=4))
    other = get_peft_model(gpt2, LoraConfig(r=4, target_modules=["c_attn"], fan_in_fan_out=True))
    other.save_pretrained(root / "bad-arch")
    # Only a pickle file holding the weights.
    pickled = root / "bad-pickle"
    shutil.copytree(good, pickled)
    from safetensors.torch import load_file

    torch.save(load_file(pickled / "adapter_model.safetensors"), pickled / "adapter_model.bin")
    (pickled / "adapter_model.safetensors").unlink()
    write_edited_copies(root, good)


def write_edited_copies(root: Path, good: Path) -> None:
    """An aLoRA config, float8 weights, weights x 1e18, and lora_alpha 1e38."""
    from safetensors.torch import load_file, save_file

    def copy(name: str, config: dict | None = None, edit: Callable | None = None) -> None:
        target = root / name
        shutil.copytree(good, target)
        if config:
            path = target / "adapter_config.json"
            path.write_text(json.dumps({**json.loads(path.read_text()), **config}))
        if edit:
            weights = target / "adapter_model.safetensors"
            save_file({k: edit(k, t) for k, t in load_file(weights).items()}, weights)

    copy("bad-alora", {"alora_invocation_tokens": [2, 3]})
    copy("bad-fp8", edit=lambda k, t: t.to(torch.float8_e4m3fn) if "lora_B" in k else t)
    copy("bad-overflow", edit=lambda k, t: t * 1e18)
    copy("bad-alpha", {"lora_alpha": 1e38})
