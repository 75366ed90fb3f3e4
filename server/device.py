"""Run-time choice of the torch device (CUDA when present, else the CPU) and of the torch
CPU threads a piece of work runs on."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch


def pick_device(requested: str | None = None) -> torch.device:
    """Return `requested` (or $LORAPLEX_DEVICE) if given, else the best device present."""
    name = requested or os.environ.get("LORAPLEX_DEVICE") or ""
    if name and name != "auto":
        device = torch.device(name)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError(f"device {name!r} was requested but CUDA is not available here")
        return device
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def compute_dtype(device: torch.device) -> torch.dtype:
    """bf16 where the device computes it natively, fp32 elsewhere."""
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def matmul_dtype(device: torch.device) -> torch.dtype:
    """What a quantized base's weights are dequantized to and multiplied in: bf16 wherever the
    device multiplies it natively, which on the CPU means AVX512-BF16 or AMX (there a bf16
    matmul runs several times faster than fp32). Activations between layers stay in
    compute_dtype."""
    if device.type == "cpu" and cpu_has_native_bf16():
        return torch.bfloat16
    return compute_dtype(device)


def cpu_has_native_bf16() -> bool:
    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


@contextlib.contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """Run the block on `count` torch CPU threads, then put back the calling thread's setting.
    (With OpenMP the setting belongs to the calling thread; threads that start later take
    the last value set anywhere.)"""
    before = torch.get_num_threads()
    if count != before:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        if count != before:
            torch.set_num_threads(before)
