"""The llama-cpp-python reload baseline of the load benchmark answers as loraplex's own GGUF
engine does, and reloads the model only when the adapter changes."""

from __future__ import annotations

import shutil
import threading
from pathlib import Path

import pytest
from engine_driver import run

from loraplex.adapters.trainer.defaults import DEFAULTS_DIR
from loraplex.bench.baseline_server import build
from loraplex.bench.llama_reload import LlamaReloadEngine
from loraplex.server.engine.api import AdapterAdmin, Engine, SamplingParams, SequenceRequest
from loraplex.server.engine.gguf_runtime import RuntimeConfig
from loraplex.server.engine.gguf_serving import AdapterLimits, build_gguf_backend
from loraplex.server.models import ModelSource
from loraplex.server.serve import ServeConfig

pytestmark = [pytest.mark.integration, pytest.mark.gguf]

PROMPTS = {
    "date-iso": "Date: March 3rd, 1999\nStamp:",
    "json-extract": "Text: Ana Lima, 34, lives in Porto.\nJSON:",
}


def reload_baseline(model: ModelSource, tmp_path: Path) -> tuple[LlamaReloadEngine, AdapterAdmin]:
    """The baseline as `loraplex bench` builds it, over the PROMPTS adapters in tmp_path."""
    root = tmp_path / "adapters"
    for adapter_id in PROMPTS:
        shutil.copytree(DEFAULTS_DIR / adapter_id, root / adapter_id)
    config = ServeConfig(model=str(model.path), adapter_roots=[root],
                         cache_dir=tmp_path / "cache")  # fmt: skip
    baseline, store = build("llama-reload", config, rows=1)
    assert isinstance(baseline, LlamaReloadEngine)
    return baseline, store


def test_reload_baseline_matches_the_gguf_engine(real_model: ModelSource, tmp_path: Path) -> None:
    baseline, baseline_store = reload_baseline(real_model, tmp_path)
    root = tmp_path / "adapters"
    limits = AdapterLimits([root], max_rank=64, max_resident=8, max_resident_bytes=1 << 30)
    runtime = RuntimeConfig(n_ctx_per_seq=256, n_seq_max=4)
    ours, our_store = build_gguf_backend(
        real_model.path, real_model.sha256, limits, runtime, tmp_path / "cache"
    )
    try:
        order = ["date-iso", "date-iso", "json-extract", None, "date-iso"]
        expected = answers(ours, our_store, order)
        assert answers(baseline, baseline_store, order) == expected
        assert expected[0] != expected[3]  # the adapter really changes the answer
        assert baseline.reloads == 4  # base -> date-iso -> json-extract -> base -> date-iso
    finally:
        ours.close()


def test_reload_baseline_tokenizes_while_it_reloads(
    real_model: ModelSource, tmp_path: Path
) -> None:
    """The server encodes prompts on its request threads while the engine's thread swaps
    models; this once freed the model under the tokenizer (SIGSEGV)."""
    baseline, store = reload_baseline(real_model, tmp_path)
    text = PROMPTS["json-extract"]
    expected = baseline.encode(text)
    encoded: list[list[int]] = []
    done = threading.Event()

    def encode_until_done() -> None:
        while not done.is_set():
            encoded.append(baseline.encode(text))

    thread = threading.Thread(target=encode_until_done)
    thread.start()
    try:
        answers(baseline, store, ["date-iso", "json-extract", None, "json-extract", "date-iso"])
    finally:
        done.set()
        thread.join()
    assert baseline.reloads == 5
    assert encoded and all(ids == expected for ids in encoded)


def answers(engine: Engine, store: AdapterAdmin, order: list[str | None]) -> list[str]:
    """Each prompt alone, one after another, greedy."""
    texts = []
    for i, adapter_id in enumerate(order):
        ref = store.acquire(adapter_id) if adapter_id else None
        prompt = engine.encode(PROMPTS[adapter_id or "date-iso"])
        request = SequenceRequest(f"r{i}", prompt, SamplingParams(max_new_tokens=16), ref)
        texts.append(run(engine, {0: [request]})[f"r{i}"].text)
        if ref:
            store.release(ref)
    return texts
