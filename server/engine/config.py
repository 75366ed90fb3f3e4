"""Typed settings of the transformers ("hf") engine; the serve command embeds this model."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

Quantization = Literal["nf4", "int8", "bf16", "fp32"]
AdapterMode = Literal["batched", "merged", "auto"]
OutputHead = Literal["auto", "full", "int8"]
Nf4Kernel = Literal["auto", "fused", "dequantize"]


class EngineConfig(BaseModel):
    """How the resident base is loaded and how adapters are applied to it."""

    model_config = ConfigDict(extra="forbid")

    checkpoint: Path = Field(description="transformers checkpoint directory of the base model")
    quantization: Quantization = Field(
        default="nf4", description="resident base weights: nf4 (double quant), int8, bf16 or fp32"
    )
    device: str = Field(default="auto", description="torch device; auto picks CUDA when present")
    adapter_mode: AdapterMode = Field(
        default="auto",
        description="batched: per-row deltas; merged: W+s·BA while one adapter owns the batch; "
        "auto: batched, but merged once one adapter has owned the whole batch for a few "
        "forward passes, on unquantized bases only (measured: bench/engine_bench.py)",
    )
    output_head: OutputHead = Field(
        default="full",
        description="full: the model's own lm_head; int8: fbgemm dynamic int8 (CPU only), "
        "a faster vocabulary projection, greedy tokens may differ on near ties; auto: int8 "
        "where it times faster than full at max_batch_size rows at start",
    )
    nf4_kernel: Nf4Kernel = Field(
        default="auto",
        description="4-bit matmul on CPUs with AVX512-BF16: auto (prompts dequantize, then a "
        "bf16 matmul; decode steps run loraplex's NF4 kernel: nf4.DecodeKernelNf4), "
        "dequantize (for both), fused (bitsandbytes' repacked kernel, slower prefill)",
    )
    threads: int | None = Field(
        default=None, ge=1, le=1024, description="torch CPU threads; default: torch's choice"
    )
    decode_threads: int | None = Field(
        default=None,
        ge=1,
        le=1024,
        description="torch CPU threads for decode forwards; default: as many as threads",
    )
    max_lora_rank: int = Field(default=64, ge=1, le=1024, description="largest adapter rank")
    adapter_slots: int = Field(
        default=16, ge=1, le=4096, description="distinct adapters the running batch can hold"
    )
    max_batch_size: int = Field(default=64, ge=1, description="sequences running at once")
    max_context: int | None = Field(
        default=None, ge=8, description="context limit; default: the model's own"
    )
    adapter_roots: list[Path] = Field(default_factory=list, description="adapter directories")
    max_resident_adapters: int = Field(default=64, ge=1, description="adapters kept loaded")
    max_resident_bytes: int = Field(
        default=4 << 30, ge=1, description="bytes of adapter weights kept loaded"
    )
