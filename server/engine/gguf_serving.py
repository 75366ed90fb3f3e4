"""The GGUF backend as `loraplex serve` runs it: the base's adaptable layers, PEFT adapters
converted to GGUF-LoRA files as they load into the shared adapter store, and ready GGUF-LoRA
files (adapter_model.gguf) checked and used as they are.

The adapter store (ids, roots, versions, validation, residency) is the hf backend's own; only
the weights' destination differs. Each new adapter version is exported once per content and
base (gguf_convert names the file by a digest), so reloading an unchanged adapter costs a
hash, not an export.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

from loraplex.adapters.errors import AdapterNotFound, InvalidAdapter
from loraplex.adapters.gguf_export import BaseLayout
from loraplex.adapters.gguf_lora import GGUF_LORA_FILE, read_gguf_lora
from loraplex.adapters.peft_format import CONFIG_FILE, BaseSpec, read_adapter
from loraplex.adapters.store import AdapterReader, AdapterStore
from loraplex.adapters.weights import AdapterWeights, LoadedAdapter
from loraplex.server.engine.api import AdapterRef
from loraplex.server.engine.gguf import GGUFEngine
from loraplex.server.engine.gguf_convert import ConvertingResolver
from loraplex.server.engine.gguf_runtime import RuntimeConfig
from loraplex.server.errors import ModelUnavailable

# transformers' names for the all-linear set of llama-style blocks (Gemma, Llama, Mistral...)
PROJECTIONS = (
    "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
    "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj",
)  # fmt: skip


def gguf_base_spec(model_path: Path, max_rank: int) -> tuple[BaseSpec, dict[str, str]]:
    """What adapters must fit on this GGUF base, named as PEFT names the layers, and the PEFT
    module name of each adaptable GGUF weight (blk.0.attn_q.weight)."""
    layout = BaseLayout.read(model_path)
    modules_by_tensor: dict[str, str] = {}
    for block in range(layout.block_count):
        for projection in PROJECTIONS:
            module = f"model.layers.{block}.{projection}"
            try:
                modules_by_tensor[layout.gguf_name(module)] = module
            except InvalidAdapter:
                continue  # this architecture has no such layer
    if not modules_by_tensor:
        raise ModelUnavailable(
            f"{model_path}: no adaptable layers found for architecture {layout.architecture!r}"
        )
    shapes = {module: layout.shapes[name] for name, module in modules_by_tensor.items()}
    return BaseSpec(layout.architecture, shapes, max_rank), modules_by_tensor


def adapter_reader(modules_by_tensor: dict[str, str]) -> AdapterReader:
    """Reads PEFT adapter directories, and ready GGUF-LoRA ones as they are."""

    def read(adapter_id: str, path: Path, base: BaseSpec) -> AdapterWeights:
        if (path / GGUF_LORA_FILE).is_file() and not (path / CONFIG_FILE).is_file():
            return read_gguf_lora(adapter_id, path, base, modules_by_tensor)
        return read_adapter(adapter_id, path, base)

    return read


class PreparedAdapterFiles:
    """Converts each adapter version as the store loads it, so an adapter that cannot become
    a GGUF-LoRA is refused at load rather than failing a step; then resolves versions."""

    def __init__(self, base_gguf: Path, base_identity: str, cache_dir: Path) -> None:
        self._sources: dict[tuple[str, int], Path] = {}
        self._files: dict[tuple[str, int], Path] = {}
        self._lock = threading.Lock()
        self._convert = ConvertingResolver(self._source, base_gguf, base_identity, cache_dir)

    def prepare(self, adapter: LoadedAdapter) -> None:
        """The store's `prepare` hook: raises InvalidAdapter when the export is impossible."""
        key = (adapter.adapter_id, adapter.version)
        with self._lock:
            self._sources[key] = Path(adapter.path)
        path = self._convert(AdapterRef(*key))
        with self._lock:
            self._files[key] = path

    def __call__(self, ref: AdapterRef) -> Path:
        with self._lock:
            path = self._files.get((ref.adapter_id, ref.version))
        if path is None:
            raise AdapterNotFound(ref.adapter_id, f"version {ref.version} was never loaded")
        return path

    def _source(self, ref: AdapterRef) -> Path:
        with self._lock:
            return self._sources[(ref.adapter_id, ref.version)]


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
    files = PreparedAdapterFiles(model_path, identity, cache_dir)
    engine = GGUFEngine(model_path, runtime, adapter_files=files, max_lora_rank=adapters.max_rank)
    base, modules_by_tensor = gguf_base_spec(model_path, adapters.max_rank)
    store = AdapterStore(
        adapters.roots,
        max_resident=adapters.max_resident,
        max_resident_bytes=adapters.max_resident_bytes,
        base=base,
        prepare=files.prepare,
        on_drop=engine.retire_later,
        read=adapter_reader(modules_by_tensor),
    )
    return engine, store
