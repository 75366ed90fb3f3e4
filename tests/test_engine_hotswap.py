"""Loading, reloading and evicting adapters while sequences run leaves those sequences alone."""

from __future__ import annotations

import shutil
from collections import Counter
from pathlib import Path

import pytest
from engine_driver import run
from peft import LoraConfig, VeraConfig
from peft_adapters import greedy_reference, load_reference, save_adapter
from transformers import AutoModelForCausalLM

from loraplex.adapters.errors import AdapterInUse
from loraplex.adapters.store import AdapterStore
from loraplex.server.engine.api import SamplingParams, SequenceRequest, StepPlan
from loraplex.server.engine.config import EngineConfig
from loraplex.server.engine.hf import HFEngine

NEW_TOKENS = 16


@pytest.fixture
def swap_root(tiny_checkpoints: dict[str, Path], tmp_path: Path) -> Path:
    base = AutoModelForCausalLM.from_pretrained(tiny_checkpoints["gemma3"])
    for i in range(5):
        save_adapter(base, LoraConfig(r=4, target_modules="all-linear"), tmp_path / f"s{i}", seed=i)
    return tmp_path


def engine_over(checkpoint: Path, root: Path) -> HFEngine:
    config = EngineConfig(checkpoint=checkpoint, quantization="fp32", adapter_slots=3)
    return HFEngine.from_config(config, AdapterStore([root], max_resident=3))


def start(engine: HFEngine, prompt: list[int]) -> dict[int, list[SequenceRequest]]:
    params = SamplingParams(max_new_tokens=NEW_TOKENS, logprobs=True)
    requests = [
        SequenceRequest(f"q{i}", prompt, params, engine.store.acquire(f"s{i}")) for i in range(2)
    ]
    return {0: [*requests, SequenceRequest("base", prompt, params)]}


def test_load_reload_evict_while_running(
    tiny_checkpoints: dict[str, Path], swap_root: Path
) -> None:
    checkpoint = tiny_checkpoints["gemma3"]
    quiet = engine_over(checkpoint, swap_root)
    prompt = quiet.encode("The quick brown fox")
    undisturbed = run(quiet, start(quiet, prompt))

    engine = engine_over(checkpoint, swap_root)
    store = engine.store

    def disturb(step: int) -> None:
        if step == 2:  # a newer s0 replaces the running one's files, then is loaded
            shutil.rmtree(swap_root / "s0")
            shutil.copytree(swap_root / "s4", swap_root / "s0")
            assert store.load("s0").version == 2
        if step == 3:  # loading two more evicts the idle ones, never the running versions
            store.load("s2")
            store.load("s3")
        if step == 4:
            with pytest.raises(AdapterInUse):
                store.unload("s1", wait=False)

    disturbed = run(engine, start(engine, prompt), on_step=disturb)
    for seq_id, result in undisturbed.items():
        assert disturbed[seq_id].tokens == result.tokens, seq_id
        assert disturbed[seq_id].logprobs == pytest.approx(result.logprobs, abs=1e-5), seq_id
    # A new sequence on s0 now runs the new version, which answers differently.
    params = SamplingParams(max_new_tokens=NEW_TOKENS, logprobs=True)
    fresh = run(engine, {0: [SequenceRequest("new", prompt, params, store.acquire("s0"))]})
    assert fresh["new"].logprobs != pytest.approx(undisturbed["q0"].logprobs, abs=1e-3)


def test_bad_requests_get_error_events_and_others_continue(
    tiny_checkpoints: dict[str, Path], swap_root: Path
) -> None:
    engine = engine_over(tiny_checkpoints["llama"], swap_root)
    good = SequenceRequest("good", engine.encode("hello"), SamplingParams(max_new_tokens=3))
    empty = SequenceRequest("empty", [], SamplingParams())
    events = engine.step(StepPlan(prefill=[good, empty]))
    errors = {e.seq_id: e for e in events if e.error}
    assert set(errors) == {"empty"} and "prompt_ids" in (errors["empty"].error or "")
    assert engine.running() == ["good"]


def test_vera_adapters_with_different_projections_take_turns(
    tiny_checkpoints: dict[str, Path], tmp_path: Path
) -> None:
    """Installed VeRA adapters share one projection; one made with another key or rank waits
    for the running ones (deferred, never failed) and then evicts the idle ones."""
    checkpoint = tiny_checkpoints["gemma3"]
    base = AutoModelForCausalLM.from_pretrained(checkpoint)
    for name, key, rank in (("v1", 1, 8), ("v2", 2, 8), ("v3", 3, 4)):
        config = VeraConfig(r=rank, target_modules=["q_proj", "v_proj"], projection_prng_key=key,
                            save_projection=False)  # fmt: skip
        save_adapter(base, config, tmp_path / name, seed=key)
    engine = engine_over(checkpoint, tmp_path)
    prompt = engine.encode("The quick brown fox")
    params = SamplingParams(max_new_tokens=NEW_TOKENS)
    requests = [
        SequenceRequest(seq_id, prompt, params, engine.store.acquire(adapter_id))
        for seq_id, adapter_id in (("v1", "v1"), ("v2", "v2"), ("v1-again", "v1"))
    ]
    results, deferrals = drive_with_deferrals(engine, requests)
    assert deferrals["v2"] >= NEW_TOKENS - 1 and "v1-again" not in deferrals
    late = SequenceRequest("v3", prompt, params, engine.store.acquire("v3"))
    results |= drive_with_deferrals(engine, [late])[0]  # v1 and v2 idle: evicted for v3
    for name in ("v1", "v2", "v3"):
        expected = greedy_reference(load_reference(checkpoint, tmp_path / name), prompt, NEW_TOKENS)
        assert results[name] == expected.tokens, name
    assert results["v1-again"] == results["v1"]
    assert engine.resources() == {"sequences": 0, "kv_cache_rows": 0, "adapter_slot_holds": 0}


def drive_with_deferrals(
    engine: HFEngine, requests: list[SequenceRequest]
) -> tuple[dict[str, list[int]], Counter[str]]:
    """Run the requests to the end as the scheduler does, planning deferred ones again."""
    tokens: dict[str, list[int]] = {r.seq_id: [] for r in requests}
    deferrals: Counter[str] = Counter()
    pending = list(requests)
    for _ in range(10 * NEW_TOKENS):
        plan = StepPlan(prefill=pending, decode=engine.running())
        pending = []
        for event in engine.step(plan):
            assert event.error is None, event.error
            if event.deferred:
                deferrals[event.seq_id] += 1
                pending += [r for r in plan.prefill if r.seq_id == event.seq_id]
            elif event.token_id is not None:
                tokens[event.seq_id].append(event.token_id)
        if not pending and not engine.running():
            return tokens, deferrals
    raise AssertionError("sequences did not finish")
