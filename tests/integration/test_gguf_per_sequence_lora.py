"""Per-sequence LoRA in one llama.cpp decode (loraplex's llama.cpp patch), against stock
llama.cpp running each request alone with its adapter as `lora_path`."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
from gguf_oracle import DRIFT, N_TOKENS, oracle_greedy_logprobs
from near_tie import assert_equal_until_a_near_tie

from loraplex.bench.gguf_random_lora import ALL_LINEAR, write_random_lora
from loraplex.server.engine import gguf_lora_slots
from loraplex.server.engine.api import (
    AdapterRef,
    SamplingParams,
    SequenceRequest,
    StepPlan,
    TokenEvent,
)
from loraplex.server.engine.gguf import GGUFEngine
from loraplex.server.engine.gguf_runtime import RuntimeConfig
from loraplex.server.models import ModelSource

pytestmark = [pytest.mark.integration, pytest.mark.gguf]
PROMPTS = ("The capital of France is", "def fibonacci(n):", "Once upon a time,", "Colors:")
# (rank, targets) of the adapters: mixed ranks, so the pool pads; one grows the pool's rank.
ADAPTERS = {"r4": (4, ALL_LINEAR), "r8qv": (8, ("attn_q", "attn_v")), "r32": (32, ALL_LINEAR)}
CONFIG = RuntimeConfig(n_ctx_per_seq=256, n_seq_max=8, n_threads=2, flash_attn=False)


@pytest.fixture(scope="module")
def lora_files(real_model: ModelSource, tmp_path_factory: pytest.TempPathFactory) -> dict:
    folder = tmp_path_factory.mktemp("per-seq-loras")
    return {
        name: write_random_lora(
            real_model.path, folder / f"{name}.gguf", seed, rank=rank, targets=targets
        )
        for seed, (name, (rank, targets)) in enumerate(ADAPTERS.items())
    }


def make_engine(model: Path, lora_files: dict[str, Path]) -> GGUFEngine:
    engine = GGUFEngine(model, CONFIG, max_lora_rank=64)
    for name, path in lora_files.items():
        engine.adapters.add(name, 1, path)
    return engine


@pytest.fixture(scope="module")
def engine(real_model: ModelSource, lora_files: dict[str, Path]) -> Iterator[GGUFEngine]:
    engine = make_engine(real_model.path, lora_files)
    assert engine.lora_slots is not None, "llama.cpp lacks the per-sequence LoRA patch"
    yield engine
    engine.close()


def run_together(
    engine: GGUFEngine, cases: list[tuple[str, str, AdapterRef | None]]
) -> dict[str, list[TokenEvent]]:
    params = SamplingParams(max_new_tokens=N_TOKENS, logprobs=True)
    requests = [SequenceRequest(s, engine.encode(p), params, a) for s, p, a in cases]
    events: dict[str, list[TokenEvent]] = {r.seq_id: [] for r in requests}
    plan = StepPlan(prefill=requests)
    while plan.prefill or plan.decode:
        for event in engine.step(plan):
            events[event.seq_id].append(event)
        # every prompt and every decode picks its adapter slot; the context's set never changes
        assert engine.last_step.adapter_switches == 0
        if not plan.prefill:  # a decode step: every sequence in one call, whatever its adapter
            assert engine.last_step.decode_calls == 1
        plan = StepPlan(decode=engine.running())
    return events


def assert_rows_equal_stock_alone(
    together: dict[str, list[TokenEvent]],
    cases: list[tuple[str, str, AdapterRef | None]],
    engine: GGUFEngine,
    model: Path,
    lora_files: dict[str, Path],
) -> None:
    for seq_id, prompt, ref in cases:
        lora = None if ref is None else lora_files[ref.adapter_id]
        scale = 1.0 if ref is None else ref.scale
        tokens, logprobs = oracle_greedy_logprobs(model, engine.encode(prompt), lora, scale)
        ours = together[seq_id]
        assert_equal_until_a_near_tie(
            [e.token_id for e in ours], [e.logprob for e in ours], tokens, logprobs, DRIFT
        )


def test_each_row_of_a_mixed_batch_equals_stock_llama_cpp_alone(
    engine: GGUFEngine, real_model: ModelSource, lora_files: dict[str, Path]
) -> None:
    cases = [
        ("r4", PROMPTS[0], AdapterRef("r4", 1)),
        ("r8qv", PROMPTS[1], AdapterRef("r8qv", 1)),
        ("base", PROMPTS[2], None),
        ("r4-half", PROMPTS[1], AdapterRef("r4", 1, 0.5)),
        ("r32", PROMPTS[3], AdapterRef("r32", 1, 1.5)),
        ("base-2", PROMPTS[0], None),
    ]
    together = run_together(engine, cases)
    assert_rows_equal_stock_alone(together, cases, engine, real_model.path, lora_files)
    assert engine.lora_slots is not None and engine.lora_slots.rank == 32
    assert set(engine.resources().values()) == {0}


@pytest.mark.parametrize("scales", [(1.0, 1.0), (1.0, 0.5)], ids=["unit-scales", "two-scales"])
def test_a_batch_that_one_adapter_owns_equals_stock_llama_cpp_alone(
    engine: GGUFEngine,
    real_model: ModelSource,
    lora_files: dict[str, Path],
    scales: tuple[float, float],
) -> None:
    """One adapter for every row takes the slot's plain matrices, with or without a scale
    node; the base rows alone afterwards take no pool node at all."""
    cases: list[tuple[str, str, AdapterRef | None]] = [
        (f"r8qv-{i}", prompt, AdapterRef("r8qv", 1, scale))
        for i, (prompt, scale) in enumerate(zip(PROMPTS, scales, strict=False))
    ]
    cases.append(("base-alone", PROMPTS[2], None))
    together = run_together(engine, cases[:2]) | run_together(engine, cases[2:])
    assert_rows_equal_stock_alone(together, cases, engine, real_model.path, lora_files)


def test_adapters_really_change_rows_and_leave_base_rows_alone(engine: GGUFEngine) -> None:
    base_alone = run_together(engine, [("alone", PROMPTS[0], None)])["alone"]
    mixed = run_together(
        engine, [("base", PROMPTS[0], None), ("adapted", PROMPTS[0], AdapterRef("r4", 1))]
    )
    tokens = {k: [e.token_id for e in v] for k, v in mixed.items()}
    assert tokens["base"] == [e.token_id for e in base_alone]
    assert tokens["adapted"] != tokens["base"]


def test_a_stock_build_falls_back_to_one_decode_per_adapter(
    real_model: ModelSource,
    lora_files: dict[str, Path],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setattr(gguf_lora_slots, "bind", lambda lib: None)  # as without the patch
    with caplog.at_level(logging.WARNING):
        engine = make_engine(real_model.path, lora_files)
    try:
        assert engine.lora_slots is None
        assert "lacks per-sequence LoRA" in caplog.text
        cases = [(f"s{i}", PROMPTS[i], AdapterRef(n, 1)) for i, n in enumerate(ADAPTERS)]
        params = SamplingParams(max_new_tokens=3)
        requests = [SequenceRequest(s, engine.encode(p), params, a) for s, p, a in cases]
        engine.step(StepPlan(prefill=requests))
        engine.step(StepPlan(decode=engine.running()))
        assert engine.last_step.decode_calls == len(ADAPTERS)
    finally:
        engine.close()


def test_sequences_move_down_into_freed_slots_and_carry_on_unchanged(engine: GGUFEngine) -> None:
    """Ending sequences in the middle moves the last ones down (a KV copy in llama.cpp), so
    running sequences keep slots 0..n-1 and a decode stays one ubatch; the moved ones must
    continue exactly as if nothing had happened."""
    cases: list[tuple[str, str, AdapterRef | None]] = [
        ("a", PROMPTS[0], AdapterRef("r4", 1)),
        ("b", PROMPTS[1], None),
        ("c", PROMPTS[2], AdapterRef("r8qv", 1)),
        ("d", PROMPTS[3], AdapterRef("r4", 1, 0.5)),
        ("e", PROMPTS[0], None),
    ]
    undisturbed = run_together(engine, cases)
    params = SamplingParams(max_new_tokens=N_TOKENS, logprobs=True)
    requests = [SequenceRequest(s, engine.encode(p), params, a) for s, p, a in cases]
    events: dict[str, list[TokenEvent]] = {r.seq_id: [] for r in requests}
    plan = StepPlan(prefill=requests)
    for step in range(N_TOKENS):
        for event in engine.step(plan):
            events[event.seq_id].append(event)
        release = {2: ["b"], 4: ["a", "d"]}.get(step, [])
        running = [s for s in engine.running() if s not in release]
        plan = StepPlan(decode=running, release=release)
        slots = sorted(engine._sequences[s].slot for s in engine.running())
        assert slots == list(range(len(slots)))
    for seq_id in ("c", "e"):  # c moves into b's slot, e into a's
        ours, alone = events[seq_id], undisturbed[seq_id]
        assert_equal_until_a_near_tie(
            [e.token_id for e in ours],
            [e.logprob for e in ours],
            [e.token_id for e in alone],
            [e.logprob for e in alone],
            DRIFT,
        )
    for seq_id in engine.running():
        engine.release(seq_id)
    assert set(engine.resources().values()) == {0}
