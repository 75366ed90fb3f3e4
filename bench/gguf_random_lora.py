"""Small random GGUF-LoRA files for a GGUF base (benchmarks and tests), written with `gguf`.

They are real adapter files that real llama.cpp loads: the metadata and tensor names follow
llama.cpp's converter (general.type=adapter, adapter.type=lora, adapter.lora.alpha,
blk.N.<module>.weight.lora_a with shape (rank, in) and .lora_b with shape (out, rank)).
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np
from gguf import GGUFReader, GGUFWriter

TARGETS = ("attn_q", "attn_v")


@lru_cache(maxsize=4)  # reading a base parses its whole vocabulary: seconds per call
def base_shapes(base: Path, targets: tuple[str, ...] = TARGETS) -> dict[str, tuple[int, int]]:
    """(in, out) of every targeted weight in the base, keyed by tensor name."""
    reader = GGUFReader(base)
    shapes: dict[str, tuple[int, int]] = {}
    for tensor in reader.tensors:
        parts = tensor.name.split(".")
        if len(parts) == 4 and parts[0] == "blk" and parts[2] in targets and parts[3] == "weight":
            shapes[tensor.name] = (int(tensor.shape[0]), int(tensor.shape[1]))
    return shapes


@lru_cache(maxsize=4)
def architecture(base: Path) -> str:
    field = GGUFReader(base).fields["general.architecture"]
    return bytes(field.parts[-1]).decode()


ALL_LINEAR = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")


def write_random_lora(
    base: Path,
    out: Path,
    seed: int,
    rank: int = 8,
    alpha: float = 16.0,
    std: float = 0.05,
    targets: tuple[str, ...] = TARGETS,
) -> Path:
    """A rank-`rank` LoRA on the `targets` of every block, with random A and B."""
    rng = np.random.default_rng(seed)
    writer = GGUFWriter(out, architecture(base))
    writer.add_string("general.type", "adapter")
    writer.add_string("adapter.type", "lora")
    writer.add_float32("adapter.lora.alpha", alpha)
    for name, (n_in, n_out) in sorted(base_shapes(base, targets).items()):
        lora_a = rng.normal(0.0, std, size=(rank, n_in)).astype(np.float32)
        lora_b = rng.normal(0.0, std, size=(n_out, rank)).astype(np.float32)
        writer.add_tensor(f"{name}.lora_a", lora_a)
        writer.add_tensor(f"{name}.lora_b", lora_b)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out
