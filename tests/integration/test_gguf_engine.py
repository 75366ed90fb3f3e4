"""The GGUF engine on the real default base, against raw llama-cpp-python as the oracle."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from gguf_oracle import DRIFT, N_TOKENS, oracle_greedy, oracle_greedy_logprobs
from near_tie import assert_equal_until_a_near_tie

from loraplex.bench.gguf_random_lora import write_random_lora
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

PROMPTS = (
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village,",
    "The three primary colors are",
)


@pytest.fixture(scope="module")
def lora_files(real_model: ModelSource, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    folder = tmp_path_factory.mktemp("gguf-loras")
    return [write_random_lora(real_model.path, folder / f"lora{i}.gguf", seed=i) for i in range(3)]


@pytest.fixture(scope="module")
def engine(real_model: ModelSource, lora_files: list[Path]) -> Iterator[GGUFEngine]:
    # flash attention off and plain weights, as in the high-level Llama oracle, so the two
    # compute alike
    config = RuntimeConfig(n_ctx_per_seq=256, n_seq_max=8, n_threads=2, flash_attn=False)
    engine = GGUFEngine(real_model.path, config)
    for i, path in enumerate(lora_files):
        engine.adapters.add(f"lora{i}", 1, path)
    yield engine
    engine.close()


def run_to_end(engine: GGUFEngine, requests: list[SequenceRequest]) -> dict[str, list[TokenEvent]]:
    """Start all requests in one step and decode them together until each finishes."""
    events: dict[str, list[TokenEvent]] = {r.seq_id: [] for r in requests}
    plan = StepPlan(prefill=requests)
    while plan.prefill or plan.decode:
        for event in engine.step(plan):
            events[event.seq_id].append(event)
        plan = StepPlan(decode=[s for s, evs in events.items() if evs[-1].finish is None])
    return events


def greedy(
    engine: GGUFEngine, seq_id: str, prompt: str, adapter: AdapterRef | None = None
) -> list[int]:
    request = SequenceRequest(
        seq_id, engine.encode(prompt), SamplingParams(max_new_tokens=N_TOKENS), adapter
    )
    return [e.token_id for e in run_to_end(engine, [request])[seq_id] if e.token_id is not None]


def test_greedy_without_adapter_matches_llama_cpp(
    engine: GGUFEngine, real_model: ModelSource
) -> None:
    prompt = PROMPTS[0]
    assert greedy(engine, "base", prompt) == oracle_greedy(real_model.path, engine.encode(prompt))


@pytest.mark.parametrize("scale", [1.0, 0.5])
def test_greedy_with_adapter_matches_llama_cpp_lora_path(
    engine: GGUFEngine, real_model: ModelSource, lora_files: list[Path], scale: float
) -> None:
    prompt = PROMPTS[1]
    params = SamplingParams(max_new_tokens=N_TOKENS, logprobs=True)
    request = SequenceRequest("lora", engine.encode(prompt), params, AdapterRef("lora0", 1, scale))
    ours = run_to_end(engine, [request])["lora"]
    tokens, logprobs = oracle_greedy_logprobs(
        real_model.path, engine.encode(prompt), lora_files[0], scale
    )
    assert_equal_until_a_near_tie(
        [e.token_id for e in ours], [e.logprob for e in ours], tokens, logprobs, DRIFT
    )
    # the adapter really moves the output (at 0.5 this small one may leave the tokens as
    # they are, but not their probabilities)
    base = SequenceRequest("base", engine.encode(prompt), params)
    base_logprob = run_to_end(engine, [base])["base"][0].logprob
    assert ours[0].logprob is not None and base_logprob is not None
    assert abs(ours[0].logprob - base_logprob) > 1e-3


def test_adapter_request_leaves_no_trace_on_the_base(engine: GGUFEngine) -> None:
    before = greedy(engine, "before", PROMPTS[2])
    with_adapter = greedy(engine, "adapted", PROMPTS[2], AdapterRef("lora1", 1))
    after = greedy(engine, "after", PROMPTS[2])
    assert with_adapter != before
    assert after == before


def greedy_events(
    engine: GGUFEngine, cases: list[tuple[str, str, AdapterRef | None]]
) -> dict[str, list[TokenEvent]]:
    """Run the cases together in one batch, with the logprob of every chosen token."""
    params = SamplingParams(max_new_tokens=N_TOKENS, logprobs=True)
    return run_to_end(
        engine, [SequenceRequest(s, engine.encode(p), params, a) for s, p, a in cases]
    )


def test_base_sequences_in_one_batch_match_their_solo_runs(engine: GGUFEngine) -> None:
    cases = [(f"b{i}", PROMPTS[i % 4] + " " * (i // 4), None) for i in range(8)]
    together = greedy_events(engine, cases)
    assert engine.last_step.decode_calls == 1
    for seq_id, prompt, adapter in cases:
        alone = greedy_events(engine, [(seq_id, prompt, adapter)])[seq_id]
        assert_events_equal_until_a_near_tie(together[seq_id], alone)


def test_mixed_adapter_batch_matches_solo_runs(engine: GGUFEngine) -> None:
    adapters = [None, AdapterRef("lora0", 1), AdapterRef("lora1", 1), AdapterRef("lora2", 1, 0.7)]
    cases = [(f"s{i}", PROMPTS[i % 4], adapters[(i // 2) % 4]) for i in range(8)]
    together = greedy_events(engine, cases)
    assert engine.last_step.decode_calls == 1  # per-sequence adapters: one call for all
    assert engine.running() == [] and set(engine.resources().values()) == {0}
    for seq_id, prompt, adapter in cases:
        alone = greedy_events(engine, [(seq_id, prompt, adapter)])[seq_id]
        assert_events_equal_until_a_near_tie(together[seq_id], alone)


def assert_events_equal_until_a_near_tie(ours: list[TokenEvent], alone: list[TokenEvent]) -> None:
    def tokens(events: list[TokenEvent]) -> list[int]:
        return [e.token_id for e in events if e.token_id is not None]

    def logprobs(events: list[TokenEvent]) -> list[float]:
        return [e.logprob for e in events if e.logprob is not None]

    assert_equal_until_a_near_tie(
        tokens(ours), logprobs(ours), tokens(alone), logprobs(alone), DRIFT
    )


def test_sequences_joining_a_running_batch_match_solo_runs(engine: GGUFEngine) -> None:
    first = SequenceRequest(
        "early", engine.encode(PROMPTS[0]), SamplingParams(max_new_tokens=N_TOKENS)
    )
    late = SequenceRequest(
        "late",
        engine.encode(PROMPTS[3]),
        SamplingParams(max_new_tokens=N_TOKENS),
        AdapterRef("lora2", 1),
    )
    tokens: dict[str, list[int]] = {"early": [], "late": []}
    plans = [StepPlan(prefill=[first]), StepPlan(prefill=[late], decode=["early"])]
    while plans or engine.running():
        plan = plans.pop(0) if plans else StepPlan(decode=engine.running())
        for event in engine.step(plan):
            tokens[event.seq_id].append(event.token_id)
    assert tokens["early"] == greedy(engine, "e", PROMPTS[0])
    assert tokens["late"] == greedy(engine, "l", PROMPTS[3], AdapterRef("lora2", 1))
