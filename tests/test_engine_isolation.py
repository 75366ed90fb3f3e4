"""One request's values never reach another's: a request whose activations overflow, or whose
sampling fails, ends alone with a clear error, and its batch mates' tokens equal their solo
runs (the oracle: the same engine running each request by itself)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from engine_driver import Result, run
from transformers import AutoTokenizer

from loraplex.adapters.store import AdapterStore
from loraplex.server.engine import sampling
from loraplex.server.engine.api import (
    NOT_FINITE_LOGITS,
    FinishReason,
    SamplingParams,
    SequenceRequest,
)
from loraplex.server.engine.config import EngineConfig
from loraplex.server.engine.hf import HFEngine
from loraplex.server.engine.output_head import SplitInt8Head

NEW_TOKENS = 10
OVERFLOWING_SCALE = 1e30  # finite, so it passes the request checks; the activations are not
HEALTHY = [  # (seq id, prompt, adapter)
    ("lora", "The capital of France is", "lora-qv-r4"),
    ("base", "hello world, HELLO", None),
    ("vera", "Question: what is two plus", "vera-r16"),
    ("rslora", "The quick brown fox", "rslora-all-r8"),
]


@pytest.fixture(scope="module", params=["fp32", "nf4"])
def engine(
    request: pytest.FixtureRequest,
    tiny_checkpoints: dict[str, Path],
    tiny_adapter_roots: dict[str, Path],
) -> HFEngine:
    config = EngineConfig(
        checkpoint=tiny_checkpoints["gemma3"], quantization=request.param, max_lora_rank=16
    )
    return HFEngine.from_config(config, AdapterStore([tiny_adapter_roots["gemma3"]]))


def make_request(
    engine: HFEngine, seq_id: str, text: str, adapter: str | None, scale: float = 1.0, **sampling
) -> SequenceRequest:
    ref = engine.store.acquire(adapter, scale) if adapter else None
    params = SamplingParams(max_new_tokens=NEW_TOKENS, logprobs=True, **sampling)
    tokenizer = AutoTokenizer.from_pretrained(engine.config.checkpoint)
    return SequenceRequest(seq_id, tokenizer.encode(text), params, ref)


def solo_runs(engine: HFEngine) -> dict[str, Result]:
    return {
        seq_id: run(engine, {0: [make_request(engine, seq_id, text, adapter)]})[seq_id]
        for seq_id, text, adapter in HEALTHY
    }


def assert_equal_to_solo(results: dict[str, Result], solo: dict[str, Result]) -> None:
    for seq_id, alone in solo.items():
        together = results[seq_id]
        assert together.finish is not FinishReason.ERROR, (seq_id, together.error)
        assert together.tokens == alone.tokens, seq_id
        assert torch.allclose(
            torch.tensor(together.logprobs), torch.tensor(alone.logprobs), atol=3e-3
        ), seq_id


def test_an_overflowing_request_in_a_packed_prefill_ends_alone(engine: HFEngine) -> None:
    solo = solo_runs(engine)
    overflow = make_request(
        engine, "overflow", "Some text to blow up", "rslora-all-r8", OVERFLOWING_SCALE
    )
    healthy = [make_request(engine, *case) for case in HEALTHY]
    # The overflowing prompt sits between healthy ones in the same packed row.
    results = run(engine, {0: [healthy[0], overflow, *healthy[1:]]})
    assert results["overflow"].finish is FinishReason.ERROR
    assert results["overflow"].error == NOT_FINITE_LOGITS
    assert results["overflow"].tokens == []
    assert_equal_to_solo(results, solo)
    assert engine.resources() == {"sequences": 0, "kv_cache_rows": 0, "adapter_slot_holds": 0}


def test_an_overflowing_request_joining_running_rows_ends_alone(engine: HFEngine) -> None:
    solo = solo_runs(engine)
    healthy = [make_request(engine, *case) for case in HEALTHY]
    overflow = make_request(engine, "overflow", "Blow up later", "rslora-all-r8", OVERFLOWING_SCALE)
    results = run(engine, {0: healthy, 2: [overflow]})
    assert results["overflow"].finish is FinishReason.ERROR
    assert_equal_to_solo(results, solo)


@pytest.mark.parametrize(
    "sampling",
    [{"temperature": 1e-38}, {"repetition_penalty": 1e-38, "temperature": 1.0},
     {"repetition_penalty": 3e38, "temperature": 1.0}, {"temperature": 3e38, "top_p": 1e-30}],
)  # fmt: skip
def test_extreme_sampling_values_are_served(engine: HFEngine, sampling: dict) -> None:
    solo = solo_runs(engine)
    extreme = make_request(engine, "extreme", "Extreme values", None, seed=3, **sampling)
    healthy = [make_request(engine, *case) for case in HEALTHY]
    results = run(engine, {0: [extreme, *healthy]})
    assert results["extreme"].finish is FinishReason.LENGTH, results["extreme"].error
    assert len(results["extreme"].tokens) == NEW_TOKENS
    assert all(lp == lp and lp <= 0 for lp in results["extreme"].logprobs)  # no NaN
    assert_equal_to_solo(results, solo)


def test_a_tiny_temperature_samples_the_argmax(engine: HFEngine) -> None:
    greedy = run(engine, {0: [make_request(engine, "g", "Ties aside", None)]})["g"]
    tiny = run(engine, {0: [make_request(engine, "t", "Ties aside", None, temperature=1e-38)]})
    assert tiny["t"].tokens == greedy.tokens


def test_requests_that_cannot_be_served_end_alone_in_their_prefill(engine: HFEngine) -> None:
    solo = solo_runs(engine)
    too_long = SequenceRequest("too-long", [1] * engine.max_context)
    unknown_token = SequenceRequest("unknown-token", [1, 10**9])
    healthy = [make_request(engine, *case) for case in HEALTHY]
    results = run(engine, {0: [too_long, healthy[0], unknown_token, *healthy[1:]]})
    for bad in ("too-long", "unknown-token"):
        assert results[bad].finish is FinishReason.ERROR and results[bad].tokens == []
        assert (results[bad].error or "").startswith("prompt_ids:")
    assert_equal_to_solo(results, solo)


def test_a_sampling_failure_ends_only_its_row(
    engine: HFEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    solo = solo_runs(engine)
    doomed = make_request(engine, "doomed", "This one fails", None, temperature=0.7, seed=1)
    healthy = [make_request(engine, *case) for case in HEALTHY]

    def failing(probs: torch.Tensor, generator: torch.Generator) -> int:
        raise RuntimeError("probability tensor contains either inf, nan or element < 0")

    monkeypatch.setattr(sampling, "draw", failing)  # only the sampled row draws
    results = run(engine, {0: [doomed, *healthy]})
    monkeypatch.undo()
    assert results["doomed"].finish is FinishReason.ERROR
    assert "sampling failed" in (results["doomed"].error or "")
    assert_equal_to_solo(results, solo)


def test_the_int8_output_head_keeps_rows_apart() -> None:
    """A huge or non-finite row leaves its batch mates' logits as accurate as alone (int8
    rounding aside), and gets non-finite logits itself when its input is not finite."""
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(500, 64, generator=generator) * 0.05
    head = SplitInt8Head(weight, torch.tensor([3, 17]))
    rows = torch.randn(3, 64, generator=generator)
    exact = rows @ weight.T
    alone_error = (torch.cat([head(row[None]) for row in rows]) - exact).abs().max()
    for poison in (1e30, float("nan"), float("inf")):
        out = head(torch.cat([rows, torch.full((1, 64), poison)]))
        assert (out[:3] - exact).abs().max() <= 2 * alone_error, poison
        finite = poison == 1e30
        assert bool(torch.isfinite(out[3]).all()) == finite, poison  # NaN in, NaN out
