"""The GGUF backend as `loraplex serve` runs it: the base's adaptable layers, PEFT adapters
converted to GGUF-LoRA files as they load into the shared adapter store, and ready GGUF-LoRA
files (adapter_model.gguf) checked and used as they are.

The adapter store (ids, roots, versions, validation, residency) is the hf backend's own; only
the weights' destination differs: its `prepare` hook hands each new version's file to the
engine's handles (gguf_convert exports it once per content and base), and its `on_drop` hook
frees them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from loraplex.adapters.errors import InvalidAdapter
from loraplex.adapters.gguf_export import BaseLayout
from loraplex.adapters.gguf_lora import read_gguf_lora
from loraplex.adapters.peft_format import BaseSpec, read_adapter
from loraplex.adapters.store import AdapterReader, AdapterStore
from loraplex.adapters.weights import AdapterWeights, LoadedAdapter
from loraplex.server.engine.gguf import GGUFEngine
from loraplex.server.engine.gguf_convert import gguf_lora_file, ready_file
from loraplex.server.engine.gguf_runtime import RuntimeConfig
from loraplex.server.errors import ModelUnavailable

# transformers' names for the all-linear set of llama-style blocks (Gemma, Llama, Mistral,
# Qwen), and Phi-3's fused ones (one GGUF tensor each: attn_qkv, and ffn_up holding gate and up)
PROJECTIONS = (
    "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
    "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj", "self_attn.qkv_proj", "mlp.gate_up_proj",
)  # fmt: skip


def gguf_base_spec(model_path: Path, max_rank: int) -> tuple[BaseSpec, dict[str, str]]:
    """What adapters must fit on this GGUF base, named as PEFT names the layers, and the PEFT
    module name of each adaptable GGUF weight (blk.0.attn_q.weight)."""
    layout = BaseLayout.read(model_path)
    modules_by_tensor: dict[str, str] = {}
    shapes: dict[str, tuple[int, int]] = {}
    for block in range(layout.block_count):
        for projection in PROJECTIONS:
            module = f"model.layers.{block}.{projection}"
            try:
                name = layout.gguf_name(module)
            except InvalidAdapter:
                continue  # this architecture has no such layer
            # gguf-py maps both Phi-3's gate_up_proj and others' up_proj to ffn_up: either
            # name is accepted, and the shape decides whether an adapter fits
            modules_by_tensor.setdefault(name, module)
            shapes[module] = layout.shapes[name]
    if not modules_by_tensor:
        raise ModelUnavailable(
            f"{model_path}: no adaptable layers found for architecture {layout.architecture!r}"
        )
    return BaseSpec(layout.architecture, shapes, max_rank), modules_by_tensor


def adapter_reader(modules_by_tensor: dict[str, str]) -> AdapterReader:
    """Reads PEFT adapter directories, and ready GGUF-LoRA ones as they are."""

    def read(adapter_id: str, path: Path, base: BaseSpec) -> AdapterWeights:
        if ready_file(path) is not None:
            return read_gguf_lora(adapter_id, path, base, modules_by_tensor)
        return read_adapter(adapter_id, path, base)

    return read


@dataclass(frozen=True)
class AdapterLimits:
    roots: list[Path]
    max_rank: int
    max_resident: int
    max_resident_bytes: int


def build_gguf_backend(
    model_path: Path,
    model_sha256: str | None,
    adapters: AdapterLimits,
    runtime: RuntimeConfig,
    cache_dir: Path,
) -> tuple[GGUFEngine, AdapterStore]:
    """A GGUF engine and the adapter store whose loads feed it GGUF-LoRA files."""
    stat = model_path.stat()
    identity = model_sha256 or f"{model_path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
    engine = GGUFEngine(model_path, runtime, max_lora_rank=adapters.max_rank)
    base, modules_by_tensor = gguf_base_spec(model_path, adapters.max_rank)

    def prepare(adapter: LoadedAdapter) -> None:
        """Export the new version, so an adapter that cannot become a GGUF-LoRA is refused at
        load rather than failing a step."""
        source = Path(adapter.path)
        file = gguf_lora_file(adapter.adapter_id, source, model_path, identity, cache_dir)
        engine.adapters.add(adapter.adapter_id, adapter.version, file)

    store = AdapterStore(
        adapters.roots,
        max_resident=adapters.max_resident,
        max_resident_bytes=adapters.max_resident_bytes,
        base=base,
        prepare=prepare,
        on_drop=engine.adapters.drop,
        read=adapter_reader(modules_by_tensor),
    )
    return engine, store
