"""PEFT adapter (LoRA or VeRA) → llama.cpp GGUF-LoRA file.

llama.cpp scales every layer of a GGUF-LoRA by user_scale × alpha / rank. PEFT's own
scale differs per layer under rsLoRA (alpha / sqrt(r)) and `alpha_pattern`, so each layer's
true scale is folded into its B matrix and the file says alpha = rank (scale 1). A VeRA
layer, Λb·B·Λd·A with B and A the shared projections sliced to the layer's shape, is the
exact LoRA B_eff = Λb·B, A_eff = Λd·A of the same rank.

Tensor names follow llama.cpp: `blk.N.attn_q.weight.lora_a` holds A (rank × in) and
`.lora_b` holds B (out × rank), named through gguf-py's own map for the base's architecture.
Each architecture's weights are laid out as llama.cpp's convert_hf_to_gguf.py lays them out:
for `llama` (Llama and Mistral checkpoints) it permutes the rows of q and k for its rotary
embedding, so B's rows are permuted alike (A, which meets the input, is not); Qwen 2/3,
Phi-3 (fused qkv and gate-up, targeted as they are) and Gemma 2/3 keep transformers' layout.
"""

from __future__ import annotations

import functools
import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file
from tqdm import tqdm

from loraplex.adapters.errors import InvalidAdapter

SUPPORTED_ARCHITECTURES = {"llama", "qwen2", "qwen3", "phi3", "gemma2", "gemma3"}
ROTARY_PERMUTED = {"llama"}  # convert_hf_to_gguf.py's LlamaModel.permute on q and k
_LAYER_KEY = re.compile(
    r"^base_model\.model\.(?P<module>.+)\."
    r"(?P<kind>lora_A\.weight|lora_B\.weight|vera_lambda_b|vera_lambda_d)$"
)


@dataclass(frozen=True)
class LoraPair:
    """One target layer as an exact, already-scaled LoRA: delta W = b @ a."""

    module: str  # the transformers module name, e.g. model.layers.0.self_attn.q_proj
    a: torch.Tensor  # rank × in
    b: torch.Tensor  # out × rank, scale folded in


def adapter_as_lora(adapter_dir: Path, in_features: Callable[[str], int]) -> list[LoraPair]:
    """Every adapted layer of a PEFT LoRA or VeRA adapter as a scale-1 LoRA pair.

    `in_features(module)` gives a layer's input width: a VeRA file does not store it.
    """
    config = _read_config(adapter_dir)
    tensors = load_file(str(adapter_dir / "adapter_model.safetensors"))
    kind = config.get("peft_type")
    if kind == "LORA":
        return _lora_pairs(config, tensors, adapter_dir.name)
    if kind == "VERA":
        return _vera_pairs(config, tensors, adapter_dir.name, in_features)
    raise InvalidAdapter(adapter_dir.name, f"cannot export a {kind} adapter to GGUF")


def _read_config(adapter_dir: Path) -> dict[str, Any]:
    path = adapter_dir / "adapter_config.json"
    if not path.is_file():
        raise InvalidAdapter(adapter_dir.name, f"{path} is missing (not a PEFT adapter)")
    config: dict[str, Any] = json.loads(path.read_text())
    if config.get("use_dora"):
        raise InvalidAdapter(
            adapter_dir.name,
            "use_dora is set: llama.cpp has no DoRA (the magnitude vector has no GGUF-LoRA "
            "form); serve this adapter with --backend hf",
        )
    if config.get("modules_to_save"):
        raise InvalidAdapter(adapter_dir.name, "modules_to_save has no GGUF-LoRA form")
    return config


def _by_module(tensors: dict[str, torch.Tensor], name: str) -> dict[str, dict[str, torch.Tensor]]:
    layers: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        match = _LAYER_KEY.match(key)
        if match:
            layers.setdefault(match["module"], {})[match["kind"]] = value.float()
        elif key not in ("base_model.vera_A", "base_model.vera_B"):
            raise InvalidAdapter(name, f"tensor {key} has no GGUF-LoRA form")
    return layers


def _lora_pairs(
    config: dict[str, Any], tensors: dict[str, torch.Tensor], name: str
) -> list[LoraPair]:
    pairs = []
    for module, parts in _by_module(tensors, name).items():
        rank = parts["lora_A.weight"].shape[0]
        alpha = _pattern_value(config.get("alpha_pattern") or {}, module, config["lora_alpha"])
        scale = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
        pairs.append(LoraPair(module, parts["lora_A.weight"], parts["lora_B.weight"] * scale))
    return pairs


def _pattern_value(pattern: dict[str, float], module: str, default: float) -> float:
    """PEFT's rule: the first pattern key that matches the end of the module name wins."""
    for key, value in pattern.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return float(value)
    return float(default)


def _vera_pairs(
    config: dict[str, Any],
    tensors: dict[str, torch.Tensor],
    name: str,
    in_features: Callable[[str], int],
) -> list[LoraPair]:
    layers = _by_module(tensors, name)
    if "base_model.vera_A" in tensors:
        shared_a = tensors["base_model.vera_A"].float()
        shared_b = tensors["base_model.vera_B"].float()
    else:  # saved without projections: draw them again from the key, as PEFT does
        from loraplex.adapters.peft_format import regenerate_projection

        in_max = max(in_features(module) for module in layers)
        out_max = max(parts["vera_lambda_b"].shape[0] for parts in layers.values())
        key, rank = int(config.get("projection_prng_key", 0)), int(config.get("r", 256))
        projection = regenerate_projection(key, rank, in_max, out_max)
        shared_a, shared_b = projection.a, projection.b
    pairs = []
    for module, parts in layers.items():
        lambda_b, lambda_d = parts["vera_lambda_b"], parts["vera_lambda_d"]
        a = lambda_d.unsqueeze(1) * shared_a[:, : in_features(module)]
        b = lambda_b.unsqueeze(1) * shared_b[: lambda_b.shape[0], :]
        pairs.append(LoraPair(module, a, b))
    return pairs


def padded_to(pair: LoraPair, rank: int) -> LoraPair:
    """The same delta at a higher rank: zero rows of A meet zero columns of B."""
    extra = rank - pair.a.shape[0]
    if extra == 0:
        return pair
    a = torch.cat([pair.a, pair.a.new_zeros(extra, pair.a.shape[1])])
    b = torch.cat([pair.b, pair.b.new_zeros(pair.b.shape[0], extra)], dim=1)
    return LoraPair(pair.module, a, b)


@dataclass
class BaseLayout:
    """What the export needs from the base GGUF: architecture, depth, weight shapes."""

    architecture: str
    block_count: int
    shapes: dict[str, tuple[int, int]]  # GGUF tensor name -> (in, out)
    heads: tuple[int, int] = (0, 0)  # attention heads, key-value heads

    @classmethod
    def read(cls, base_gguf: Path) -> BaseLayout:
        stat = base_gguf.stat()
        return _read_layout(base_gguf.resolve(), stat.st_size, stat.st_mtime_ns)

    @classmethod
    def parse(cls, base_gguf: Path) -> BaseLayout:
        from gguf import GGUFReader

        reader = GGUFReader(base_gguf)
        arch = str(reader.get_field("general.architecture").contents())  # type: ignore[union-attr]
        blocks = int(reader.get_field(f"{arch}.block_count").contents())  # type: ignore[union-attr]
        shapes = {
            t.name: (int(t.shape[0]), int(t.shape[1])) for t in reader.tensors if len(t.shape) == 2
        }
        heads = [
            reader.get_field(f"{arch}.attention.{key}") for key in ("head_count", "head_count_kv")
        ]
        n_head, n_kv = (int(f.contents()) if f is not None else 0 for f in heads)
        return cls(arch, blocks, shapes, (n_head, n_kv or n_head))

    @functools.cached_property
    def _name_map(self) -> Any:
        import gguf  # building the map is slow: once per layout, not once per layer

        arch = next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == self.architecture)
        return gguf.get_tensor_name_map(arch, self.block_count)

    def gguf_name(self, module: str) -> str:
        name = self._name_map.get_name(module)
        if name is None or f"{name}.weight" not in self.shapes:
            raise InvalidAdapter(module, f"no {self.architecture} GGUF tensor matches this layer")
        return f"{name}.weight"

    def in_features(self, module: str) -> int:
        return self.shapes[self.gguf_name(module)][0]

    def lora_b(self, name: str, b: torch.Tensor) -> torch.Tensor:
        """B's rows in the order the base's tensor `name` keeps its output rows."""
        if self.architecture not in ROTARY_PERMUTED:
            return b
        n_head, n_kv = self.heads
        if name.endswith("attn_q.weight"):
            return _rotary_permute(b, n_head)
        if name.endswith("attn_k.weight"):
            return _rotary_permute(b, n_kv)
        return b


def _rotary_permute(rows: torch.Tensor, n_head: int) -> torch.Tensor:
    """convert_hf_to_gguf.py's LlamaModel.permute: each head's two rotary halves
    interleaved, as llama.cpp's rope expects."""
    shape = rows.shape
    return (
        rows.reshape(n_head, 2, shape[0] // n_head // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)
    )


@functools.lru_cache(maxsize=4)
def _read_layout(base_gguf: Path, size: int, mtime_ns: int) -> BaseLayout:
    """BaseLayout.parse, once per base file version: GGUFReader walks every metadata field,
    and a 262k-token vocabulary makes that take tens of seconds on each export."""
    return BaseLayout.parse(base_gguf)


def export_gguf(
    adapter_dir: Path, base_gguf: Path, out_file: Path, dtype: str = "f32", progress: bool = True
) -> Path:
    """Write `adapter_dir` as a GGUF-LoRA for the base in `base_gguf`; returns the file."""
    layout = BaseLayout.read(base_gguf)
    if layout.architecture not in SUPPORTED_ARCHITECTURES:
        supported = sorted(SUPPORTED_ARCHITECTURES)
        raise InvalidAdapter(
            adapter_dir.name, f"GGUF export supports {supported} bases, not {layout.architecture}"
        )
    pairs = adapter_as_lora(adapter_dir, layout.in_features)
    # one GGUF alpha covers every layer; the scale is already in B, so pad lower ranks
    rank = max(pair.a.shape[0] for pair in pairs)
    pairs = [padded_to(pair, rank) for pair in pairs]
    _write(out_file, layout, pairs, rank, np.float16 if dtype == "f16" else np.float32, progress)
    return out_file


def _write(
    out_file: Path, layout: BaseLayout, pairs: list[LoraPair], rank: int, dtype: Any, progress: bool
) -> None:
    import gguf

    scratch = out_file.with_name(f".{out_file.name}.tmp")
    writer = gguf.GGUFWriter(scratch, layout.architecture)
    writer.add_string("general.type", "adapter")
    writer.add_string("adapter.type", "lora")
    writer.add_float32("adapter.lora.alpha", float(rank))  # alpha / rank = 1: scale is in B
    for pair in tqdm(pairs, desc="GGUF-LoRA tensors", disable=not progress):
        name = layout.gguf_name(pair.module)
        _check_shape(name, pair, layout.shapes[name])
        writer.add_tensor(f"{name}.lora_a", pair.a.numpy().astype(dtype))
        writer.add_tensor(f"{name}.lora_b", layout.lora_b(name, pair.b).numpy().astype(dtype))
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        scratch.replace(out_file)
    finally:
        scratch.unlink(missing_ok=True)


def _check_shape(name: str, pair: LoraPair, in_out: tuple[int, int]) -> None:
    got = (pair.a.shape[1], pair.b.shape[0])
    if got != in_out:
        raise InvalidAdapter(
            pair.module, f"shape (in, out) {got} does not fit base {name} {in_out}"
        )
