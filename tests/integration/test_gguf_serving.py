"""The GGUF backend as `serve` assembles it: PEFT adapters become GGUF-LoRA files when the
shared adapter store loads them, and unloading or evicting frees their llama.cpp handles."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from engine_driver import run
from gguf_oracle import N_TOKENS, oracle_greedy
from peft import LoraConfig
from peft_adapters import save_adapter
from transformers import AutoModelForCausalLM

from loraplex.adapters.errors import InvalidAdapter
from loraplex.adapters.gguf_lora import GGUF_LORA_FILE
from loraplex.adapters.trainer.defaults import DEFAULTS_DIR
from loraplex.bench.gguf_random_lora import write_random_lora
from loraplex.server.engine.api import SamplingParams, SequenceRequest
from loraplex.server.engine.gguf_runtime import RuntimeConfig
from loraplex.server.engine.gguf_serving import AdapterLimits, build_gguf_backend
from loraplex.server.models import ModelSource

pytestmark = [pytest.mark.integration, pytest.mark.gguf]


def test_load_converts_serves_and_unload_frees(
    real_model: ModelSource, real_checkpoint: Path, tmp_path: Path
) -> None:
    root = tmp_path / "adapters"
    shutil.copytree(DEFAULTS_DIR / "date-iso", root / "date-iso")
    mixed = LoraConfig(r=8, target_modules=["q_proj", "v_proj"], rank_pattern={"v_proj": 4})
    save_adapter(AutoModelForCausalLM.from_pretrained(real_checkpoint), mixed, root / "mixed", 1)
    limits = AdapterLimits([root], max_rank=64, max_resident=8, max_resident_bytes=1 << 30)
    runtime = RuntimeConfig(n_ctx_per_seq=256, n_seq_max=2)
    engine, store = build_gguf_backend(
        real_model.path, real_model.sha256, limits, runtime, tmp_path / "cache"
    )
    try:
        assert store.load("date-iso").version == 1
        assert len(list((tmp_path / "cache" / "gguf-lora").glob("date-iso-*.gguf"))) == 1
        ref = store.acquire("date-iso")
        prompt = engine.encode("Date: March 3rd, 1999\nStamp:")
        request = SequenceRequest("r", prompt, SamplingParams(max_new_tokens=12), ref)
        tokens = run(engine, {0: [request]})["r"].tokens
        assert engine.decode(tokens).strip().startswith("1999-03-03")
        store.release(ref)
        assert engine.adapters.loaded() == [("date-iso", 1)]
        store.unload("date-iso")
        assert engine.adapters.loaded() == []
        # layers of different ranks share the file's one rank: lower ones are zero-padded
        assert store.load("mixed").rank == 8
        ref = store.acquire("mixed")
        request = SequenceRequest("m", prompt, SamplingParams(max_new_tokens=4), ref)
        assert len(run(engine, {0: [request]})["m"].tokens) == 4
        store.release(ref)
    finally:
        engine.close()


def test_ready_gguf_lora_is_served_as_it_is(real_model: ModelSource, tmp_path: Path) -> None:
    """A ready adapter_model.gguf is checked, never converted, and gives the tokens raw
    llama-cpp-python gives with the same file as its lora_path."""
    root = tmp_path / "adapters"
    (root / "ready").mkdir(parents=True)
    file = write_random_lora(real_model.path, root / "ready" / GGUF_LORA_FILE, seed=5, rank=8)
    limits = AdapterLimits([root], max_rank=64, max_resident=8, max_resident_bytes=1 << 30)
    runtime = RuntimeConfig(
        n_ctx_per_seq=256, n_seq_max=2, n_threads=2, flash_attn=False
    )  # as the oracle's Llama runs: exact match
    engine, store = build_gguf_backend(
        real_model.path, real_model.sha256, limits, runtime, tmp_path / "cache"
    )
    try:
        info = store.load("ready")
        assert (info.peft_type, info.rank, len(info.target_modules)) == ("LORA", 8, 2 * 18)
        assert not (tmp_path / "cache" / "gguf-lora").exists()  # used in place
        prompt = engine.encode("The capital of France is")
        ref = store.acquire("ready")
        request = SequenceRequest("r", prompt, SamplingParams(max_new_tokens=N_TOKENS), ref)
        ours = run(engine, {0: [request]})["r"].tokens
        store.release(ref)
        assert ours == oracle_greedy(real_model.path, prompt, lora=file)
        assert ours != oracle_greedy(real_model.path, prompt)  # the adapter changes the output
        # a file over the rank limit is refused at load; the resident one keeps serving
        (root / "wide").mkdir()
        write_random_lora(real_model.path, root / "wide" / GGUF_LORA_FILE, seed=6, rank=65)
        with pytest.raises(InvalidAdapter, match=r"outside 1\.\.64"):
            store.load("wide")
        assert [a.adapter_id for a in store.list() if a.resident] == ["ready"]
    finally:
        engine.close()


def test_eviction_frees_the_handle_and_a_reload_serves_again(
    real_model: ModelSource, tmp_path: Path
) -> None:
    """The store's residency is the only LRU: evicting a version frees its llama.cpp handle."""
    root = tmp_path / "adapters"
    for seed, name in enumerate(("a", "b")):
        (root / name).mkdir(parents=True)
        write_random_lora(real_model.path, root / name / GGUF_LORA_FILE, seed=seed, rank=8)
    limits = AdapterLimits([root], max_rank=64, max_resident=1, max_resident_bytes=1 << 30)
    runtime = RuntimeConfig(n_ctx_per_seq=64, n_seq_max=2, n_threads=2)
    engine, store = build_gguf_backend(
        real_model.path, real_model.sha256, limits, runtime, tmp_path / "cache"
    )
    prompt = engine.encode("The capital of France is")

    def serve(adapter_id: str) -> list[int]:
        ref = store.acquire(adapter_id)
        request = SequenceRequest(adapter_id, prompt, SamplingParams(max_new_tokens=4), ref)
        try:
            return run(engine, {0: [request]})[adapter_id].tokens
        finally:
            store.release(ref)

    try:
        first = serve("a")
        assert engine.adapters.loaded() == [("a", 1)]
        serve("b")  # evicts a
        assert [a.adapter_id for a in store.list() if a.resident] == ["b"]
        assert engine.adapters.loaded() == [("b", 1)]
        assert serve("a") == first  # loaded again as version 2, evicting b
        assert engine.adapters.loaded() == [("a", 2)]
        assert set(engine.resources().values()) == {0}
    finally:
        engine.close()
