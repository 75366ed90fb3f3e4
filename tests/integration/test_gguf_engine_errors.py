"""The GGUF engine's typed errors, adapter lifetimes, and finish reasons on the real base."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from gguf_oracle import DRIFT
from near_tie import assert_equal_until_a_near_tie

from loraplex.bench.gguf_random_lora import write_random_lora
from loraplex.server.engine.api import (
    AdapterRef,
    FinishReason,
    SamplingParams,
    SequenceRequest,
    StepPlan,
    TokenEvent,
)
from loraplex.server.engine.gguf import GGUFEngine
from loraplex.server.engine.gguf_runtime import RuntimeConfig
from loraplex.server.models import ModelSource

pytestmark = [pytest.mark.integration, pytest.mark.gguf]
PROMPT = "The capital of France is"
CONTEXT = 64  # llama.cpp may round it up; engine.max_context is what it gave


@pytest.fixture(scope="module")
def files(real_model: ModelSource, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("gguf-lora-errors")
    good = write_random_lora(real_model.path, folder / "good.gguf", seed=0)
    truncated = folder / "truncated.gguf"
    truncated.write_bytes(good.read_bytes()[:5000])
    not_gguf = folder / "adapter_model.safetensors"
    not_gguf.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    return {
        "good": good,
        "truncated": truncated,
        "not-gguf": not_gguf,
        "missing": folder / "missing.gguf",
        "a-model": real_model.path,  # a model, not an adapter
    }


@pytest.fixture(scope="module")
def engine(real_model: ModelSource, files: dict[str, Path]) -> Iterator[GGUFEngine]:
    config = RuntimeConfig(n_ctx_per_seq=CONTEXT, n_seq_max=4, n_threads=2)
    engine = GGUFEngine(real_model.path, config)
    for adapter_id, path in files.items():
        engine.adapters.add(adapter_id, 1, path)
    yield engine
    engine.close()


def request(
    engine: GGUFEngine, seq_id: str, adapter: AdapterRef | None = None, **sampling: object
) -> SequenceRequest:
    return SequenceRequest(
        seq_id,
        engine.encode(PROMPT),
        SamplingParams(**sampling),
        adapter,  # type: ignore[arg-type]
    )


def drain(engine: GGUFEngine, first: list[TokenEvent]) -> list[TokenEvent]:
    events = list(first)
    while engine.running():
        events += engine.step(StepPlan(decode=engine.running()))
    return events


def refused(engine: GGUFEngine, plan: StepPlan) -> dict[str, str]:
    """Run a step whose new sequences all fail; their error per sequence id."""
    events = engine.step(plan)
    assert all(e.finish is FinishReason.ERROR and e.token_id is None for e in events)
    assert engine.running() == []
    return {e.seq_id: e.error or "" for e in events}


@pytest.mark.parametrize("adapter_id", ["unknown", "missing", "truncated", "not-gguf", "a-model"])
def test_a_bad_adapter_ends_alone_beside_a_good_prefill(
    engine: GGUFEngine, adapter_id: str
) -> None:
    solo = drain(engine, engine.step(StepPlan(prefill=[request(engine, "good", max_new_tokens=4)])))
    running = engine.step(StepPlan(prefill=[request(engine, "ok", max_new_tokens=3)]))
    plan = StepPlan(
        prefill=[
            request(engine, "bad", AdapterRef(adapter_id, 1)),
            request(engine, "good", max_new_tokens=4),
        ],
        decode=["ok"],
    )
    events = drain(engine, running + engine.step(plan))
    bad = [e for e in events if e.seq_id == "bad"]
    assert len(bad) == 1 and bad[0].finish is FinishReason.ERROR and bad[0].token_id is None
    assert adapter_id in (bad[0].error or "")
    good = [e.token_id for e in events if e.seq_id == "good"]
    assert good == [e.token_id for e in solo]
    assert [e.finish for e in events if e.seq_id == "ok"][-1] is FinishReason.LENGTH
    assert set(engine.resources().values()) == {0}


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"temperature": -1.0}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"stop": ("",)}, "stop"),
    ],
)
def test_bad_sampling_is_refused(engine: GGUFEngine, change: dict[str, object], field: str) -> None:
    errors = refused(engine, StepPlan(prefill=[request(engine, "bad", **change)]))
    assert errors["bad"].startswith(f"{field}:")


def test_bad_prompts_and_unknown_sequences_are_refused(engine: GGUFEngine) -> None:
    too_long = SequenceRequest("long", [2] * engine.max_context)  # no room for a new token
    bad = [SequenceRequest("empty", []), too_long, SequenceRequest("oov", [2, 10**9])]
    errors = refused(engine, StepPlan(prefill=bad, decode=["nobody"]))
    assert all(errors[r.seq_id].startswith("prompt_ids:") for r in bad)
    assert "not running" in errors["nobody"]


def test_adapter_is_freed_only_after_its_last_sequence(engine: GGUFEngine) -> None:
    ref = AdapterRef("good", 1)
    first = engine.step(StepPlan(prefill=[request(engine, "a", ref), request(engine, "b", ref)]))
    assert engine.adapters.users(ref) == 2
    assert engine.resources() == {"sequences": 2, "kv_cache_slots": 2, "adapter_holds": 2}
    engine.adapters.drop("good")
    assert ("good", 1) in engine.adapters.loaded()  # in use: dropping only marks it
    engine.release("a")
    assert ("good", 1) in engine.adapters.loaded()
    drain(engine, first)
    assert ("good", 1) not in engine.adapters.loaded()
    assert engine.running() == []
    assert set(engine.resources().values()) == {0}
    # a request that acquired the version before the drop still starts, and frees it at its end
    drain(engine, engine.step(StepPlan(prefill=[request(engine, "late", ref, max_new_tokens=2)])))
    assert ("good", 1) not in engine.adapters.loaded()


def test_a_new_version_serves_new_sequences_while_the_old_one_finishes(
    engine: GGUFEngine, files: dict[str, Path]
) -> None:
    """Hot swap: the old version's handle stays until its last sequence ends."""
    old, new = AdapterRef("swap", 1), AdapterRef("swap", 2)
    engine.adapters.add("swap", 1, files["good"])
    on_old = engine.step(StepPlan(prefill=[request(engine, "old", old, max_new_tokens=4)]))
    engine.adapters.add("swap", 2, files["good"])
    on_new = engine.step(
        StepPlan(prefill=[request(engine, "new", new, max_new_tokens=2)], decode=["old"])
    )
    assert {("swap", 1), ("swap", 2)} <= set(engine.adapters.loaded())
    events = drain(engine, on_old + on_new)
    assert {e.seq_id for e in events if e.finish is FinishReason.LENGTH} == {"old", "new"}
    assert ("swap", 1) not in engine.adapters.loaded()  # dropped by the newer version
    assert ("swap", 2) in engine.adapters.loaded()  # current: kept for the next request
    engine.adapters.drop("swap")
    assert ("swap", 2) not in engine.adapters.loaded()


def test_finish_reasons(engine: GGUFEngine) -> None:
    events = drain(engine, engine.step(StepPlan(prefill=[request(engine, "n", max_new_tokens=4)])))
    assert [e.finish for e in events] == [None, None, None, FinishReason.LENGTH]
    text = "".join(e.text for e in events)
    assert text == engine.decode([e.token_id for e in events if e.token_id is not None])

    stop = text.strip()[:3]
    stopped = drain(engine, engine.step(StepPlan(prefill=[request(engine, "s", stop=(stop,))])))
    assert stopped[-1].finish is FinishReason.STOP
    assert stop not in "".join(e.text for e in stopped)

    words = engine.encode(PROMPT)[1:]
    prompt = (engine.encode(PROMPT) + words * engine.max_context)[: engine.max_context - 4]
    full = SequenceRequest("c", prompt, SamplingParams(max_new_tokens=1000))
    filled = drain(engine, engine.step(StepPlan(prefill=[full])))
    assert filled[-1].finish in (FinishReason.CONTEXT, FinishReason.EOS)
    if filled[-1].finish is FinishReason.CONTEXT:  # prompt and output fill the context
        assert len(prompt) + len(filled) == engine.max_context


def test_logprobs_and_seeded_sampling(engine: GGUFEngine) -> None:
    def sampled(seq_id: str, seed: int) -> list[TokenEvent]:
        first = engine.step(
            StepPlan(
                prefill=[
                    request(
                        engine,
                        seq_id,
                        temperature=1.0,
                        top_k=50,
                        seed=seed,
                        logprobs=True,
                        max_new_tokens=8,
                    )
                ]
            )
        )
        return drain(engine, first)

    runs = [sampled("x", 1), sampled("y", 1), sampled("z", 2)]
    tokens = [[e.token_id for e in run] for run in runs]
    assert tokens[0] == tokens[1] != tokens[2]
    logprobs = np.array([e.logprob for e in runs[0]], dtype=float)
    assert np.all(np.isfinite(logprobs)) and np.all(logprobs <= 0)


def token_logprobs(events: list[TokenEvent], seq_id: str) -> tuple[list[int], list[float]]:
    mine = [e for e in events if e.seq_id == seq_id and e.token_id is not None]
    return [e.token_id for e in mine], [e.logprob for e in mine]  # type: ignore[misc]


def tokens_by_sequence(events: list[TokenEvent]) -> dict[str, list[int]]:
    tokens: dict[str, list[int]] = {}
    for event in events:
        tokens.setdefault(event.seq_id, [])
        if event.token_id is not None:
            tokens[event.seq_id].append(event.token_id)
    return tokens


def test_extreme_sampling_values_and_an_overflowing_row_end_alone(engine: GGUFEngine) -> None:
    """Every value validation accepts is sampled safely, and a row whose logits are not
    finite ends with a clear error while its batch mates match their solo runs."""
    solo = drain(engine, engine.step(
        StepPlan(prefill=[request(engine, "healthy", max_new_tokens=6, logprobs=True)])
    ))  # fmt: skip
    mixed = [
        request(engine, "healthy", max_new_tokens=6, logprobs=True),
        request(engine, "tiny-t", temperature=1e-38, max_new_tokens=6, logprobs=True),
        request(engine, "tiny-penalty", temperature=1.0, repetition_penalty=1e-38, seed=1),
        request(engine, "overflow", AdapterRef("good", 1, 1e30), max_new_tokens=6),
    ]
    events = drain(engine, engine.step(StepPlan(prefill=mixed)))
    finish = {e.seq_id: e for e in events if e.finish is not None}
    # batched rows round otherwise than a solo row, so a near tie may part them (near_tie.py)
    alone = token_logprobs(solo, "healthy")
    assert_equal_until_a_near_tie(*token_logprobs(events, "healthy"), *alone, DRIFT)
    # a temperature that small samples the argmax
    assert_equal_until_a_near_tie(*token_logprobs(events, "tiny-t"), *alone, DRIFT)
    assert finish["tiny-penalty"].finish is FinishReason.LENGTH
    assert finish["overflow"].finish is FinishReason.ERROR
    assert "not finite" in (finish["overflow"].error or "")
    assert set(engine.resources().values()) == {0}
