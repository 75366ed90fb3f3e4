"""Ready GGUF-LoRA adapters (`adapter_model.gguf`, as llama.cpp's convert_lora_to_gguf.py writes
them), read and checked against a GGUF base before llama.cpp ever sees them.

llama.cpp reports a bad adapter only to its log, so what it would check is checked here
first, with errors that name the problem: the file type, the architecture, every tensor
pairing with a base weight, the shapes (from the header, before any data is read) and the
rank. The weights come back as PEFT-named LoRA modules, so the adapter store accounts for
them (rank, targets, bytes) like any PEFT adapter.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from loraplex.adapters.errors import InvalidAdapter
from loraplex.adapters.peft_format import BaseSpec
from loraplex.adapters.weights import LoraModule, LoraWeights, refuse_overflowing

GGUF_LORA_FILE = "adapter_model.gguf"
SUFFIXES = (".lora_a", ".lora_b")


def read_gguf_lora(
    adapter_id: str,
    path: Path,
    base: BaseSpec,
    modules_by_tensor: Mapping[str, str],
) -> LoraWeights:
    """Read `path/adapter_model.gguf` for a GGUF base described by `base` (its model_type is
    the GGUF architecture). `modules_by_tensor` maps the base's GGUF weight names
    (blk.0.attn_q.weight) to the PEFT module names of `base.linear_shapes`."""
    reader = _open(adapter_id, path / GGUF_LORA_FILE, _largest_adapter_bytes(base))
    try:
        return _parse(adapter_id, reader, base, modules_by_tensor)
    except (ValueError, IndexError, KeyError, TypeError, OverflowError) as err:
        # gguf decodes strings and values lazily: damage inside them surfaces only here
        raise InvalidAdapter(adapter_id, f"{GGUF_LORA_FILE} is damaged: {err}") from None


def _parse(
    adapter_id: str, reader: Any, base: BaseSpec, modules_by_tensor: Mapping[str, str]
) -> LoraWeights:
    _check_header(adapter_id, reader, base.model_type)
    alpha = _float_field(reader, "adapter.lora.alpha")
    if not math.isfinite(alpha):
        raise InvalidAdapter(adapter_id, f"adapter.lora.alpha is {alpha}")
    modules = {}
    for weight_name, (a, b) in _pairs(adapter_id, reader).items():
        module = modules_by_tensor.get(weight_name)
        if module is None:
            raise InvalidAdapter(adapter_id, f"{weight_name} is not an adaptable layer of the base")
        in_out = base.linear_shapes[module]
        rank = _check_shapes(adapter_id, weight_name, _dims(a), _dims(b), in_out, base.max_rank)
        scaling = alpha / rank if alpha else 1.0  # as llama.cpp scales: alpha/r, or 1 unset
        modules[module] = LoraModule(_as_torch(a), _as_torch(b), scaling)
    if not modules:
        raise InvalidAdapter(adapter_id, f"{GGUF_LORA_FILE} holds no LoRA tensors")
    weights = LoraWeights(modules)
    refuse_overflowing(adapter_id, weights)
    return weights


def _check_shapes(
    adapter_id: str,
    weight_name: str,
    a: tuple[int, int],
    b: tuple[int, int],
    in_out: tuple[int, int],
    max_rank: int,
) -> int:
    """The pair's rank, once lora_a [r, in] and lora_b [out, r] fit the base layer; checked
    from the header, before any tensor data is read."""
    rank = a[0]
    if a[1] != in_out[0] or b != (in_out[1], rank):
        raise InvalidAdapter(
            adapter_id,
            f"{weight_name}: lora_a {a} and lora_b {b} do not fit a base layer of (in, out) "
            f"{in_out}",
        )
    if not 0 < rank <= max_rank:
        raise InvalidAdapter(adapter_id, f"{weight_name}: rank {rank} is outside 1..{max_rank}")
    return rank


def _largest_adapter_bytes(base: BaseSpec) -> int:
    """A float32 LoRA of the largest rank on every layer, plus room for metadata."""
    per_rank = sum(n_in + n_out for n_in, n_out in base.linear_shapes.values())
    return per_rank * base.max_rank * 4 + (1 << 20)


def _open(adapter_id: str, file: Path, max_bytes: int) -> Any:
    from gguf import GGUFReader  # maps the file; reads nothing until asked

    if not file.is_file():
        raise InvalidAdapter(adapter_id, f"{GGUF_LORA_FILE} is missing in {file.parent}")
    size = file.stat().st_size
    if size > max_bytes:
        raise InvalidAdapter(
            adapter_id, f"{GGUF_LORA_FILE} is {size} bytes, larger than any adapter of this base "
            f"can be ({max_bytes})"
        )  # fmt: skip
    try:
        return GGUFReader(file)
    except Exception as err:  # any parse failure of untrusted bytes means a bad file
        raise InvalidAdapter(
            adapter_id, f"{GGUF_LORA_FILE} is not a readable GGUF: {err}"
        ) from None


def _check_header(adapter_id: str, reader: Any, architecture: str) -> None:
    kinds = (_str_field(reader, "general.type"), _str_field(reader, "adapter.type"))
    if kinds != ("adapter", "lora"):
        raise InvalidAdapter(
            adapter_id, f"{GGUF_LORA_FILE} is not a GGUF-LoRA adapter (type {kinds[0]!r})"
        )
    arch = _str_field(reader, "general.architecture")
    if arch != architecture:
        raise InvalidAdapter(adapter_id, f"made for {arch!r}, but the base is {architecture!r}")


def _pairs(adapter_id: str, reader: Any) -> dict[str, tuple[Any, Any]]:
    """The (lora_a, lora_b) reader tensors per base weight name."""
    halves: dict[str, dict[str, Any]] = {}
    for tensor in reader.tensors:
        suffix = next((s for s in SUFFIXES if tensor.name.endswith(s)), None)
        if suffix is None or len(tensor.shape) != 2:
            raise InvalidAdapter(adapter_id, f"unexpected tensor {tensor.name!r}")
        halves.setdefault(tensor.name.removesuffix(suffix), {})[suffix] = tensor
    for weight_name, found in halves.items():
        if set(found) != set(SUFFIXES):
            raise InvalidAdapter(adapter_id, f"{weight_name} lacks its lora_a or lora_b half")
    return {name: (found[".lora_a"], found[".lora_b"]) for name, found in halves.items()}


def _dims(tensor: Any) -> tuple[int, int]:
    """(rows, columns) in PyTorch order: GGUF lists the inner dimension first."""
    return int(tensor.shape[1]), int(tensor.shape[0])


def _as_torch(tensor: Any) -> torch.Tensor:
    """A float32 copy: the file is mapped, and may change on disk while the adapter lives."""
    from gguf.quants import dequantize  # also handles f16/f32/bf16, and q8_0 LoRA files

    data = dequantize(tensor.data, tensor.tensor_type)
    return torch.from_numpy(np.array(data, dtype=np.float32).reshape(_dims(tensor)))


def _str_field(reader: Any, name: str) -> str | None:
    field = reader.get_field(name)
    return None if field is None else str(field.contents())


def _float_field(reader: Any, name: str) -> float:
    field = reader.get_field(name)
    return 0.0 if field is None else float(field.contents())
