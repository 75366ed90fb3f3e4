"""Per-request sampling through the engine, checked against transformers on the same weights."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from engine_driver import Result, run
from transformers import AutoModelForCausalLM, PreTrainedModel

from loraplex.adapters.store import AdapterStore
from loraplex.server.engine.api import FinishReason, SamplingParams, SequenceRequest
from loraplex.server.engine.config import EngineConfig
from loraplex.server.engine.hf import HFEngine

NEW_TOKENS = 16
PROMPT = "The quick brown fox"


@pytest.fixture(scope="module")
def checkpoint(tiny_checkpoints: dict[str, Path]) -> Path:
    return tiny_checkpoints["gemma3"]


@pytest.fixture(scope="module")
def engine(checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> HFEngine:
    config = EngineConfig(checkpoint=checkpoint, quantization="fp32")
    return HFEngine.from_config(config, AdapterStore([tmp_path_factory.mktemp("no-adapters")]))


@pytest.fixture(scope="module")
def hf_model(checkpoint: Path) -> PreTrainedModel:
    return AutoModelForCausalLM.from_pretrained(checkpoint).eval()


def generate(engine: HFEngine, **params: object) -> Result:
    sampling = SamplingParams(**{"max_new_tokens": NEW_TOKENS, **params})  # type: ignore[arg-type]
    request = SequenceRequest("s", engine.encode(PROMPT), sampling)
    return run(engine, {0: [request]})["s"]


def hf_greedy(hf_model: PreTrainedModel, prompt: list[int], n: int) -> list[int]:
    """transformers' own greedy continuation, with EOS ignored so it always has n tokens."""
    out = hf_model.generate(
        input_ids=torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n, do_sample=False
    )
    return list(out[0, len(prompt) :].tolist())


def test_same_seed_same_tokens_other_seed_other_tokens(engine: HFEngine) -> None:
    first = generate(engine, temperature=1.5, seed=7)
    again = generate(engine, temperature=1.5, seed=7)
    other = generate(engine, temperature=1.5, seed=8)
    assert first.tokens == again.tokens
    assert first.tokens != other.tokens


def test_top_k_one_and_tiny_top_p_are_greedy(engine: HFEngine, hf_model: PreTrainedModel) -> None:
    greedy = generate(engine)
    top_k = generate(engine, temperature=1.5, top_k=1, seed=1)
    top_p = generate(engine, temperature=1.5, top_p=1e-6, seed=2)
    sampled = generate(engine, temperature=1.5, seed=1)
    reference = hf_greedy(hf_model, engine.encode(PROMPT), len(greedy.tokens))
    assert greedy.tokens == reference
    assert top_k.tokens == greedy.tokens
    assert top_p.tokens == greedy.tokens
    assert sampled.tokens != greedy.tokens  # the filters, not the temperature, made it greedy


def test_max_new_tokens_finishes_with_length(engine: HFEngine, hf_model: PreTrainedModel) -> None:
    reference = hf_greedy(hf_model, engine.encode(PROMPT), 5)
    assert not set(reference) & engine.eos_ids  # otherwise EOS would end it first
    result = generate(engine, max_new_tokens=5)
    assert result.tokens == reference
    assert result.finish is FinishReason.LENGTH


def test_stop_sequence_cuts_the_text_and_is_not_emitted(
    engine: HFEngine, hf_model: PreTrainedModel
) -> None:
    tokens = hf_greedy(hf_model, engine.encode(PROMPT), NEW_TOKENS)
    full = engine.decode(tokens)
    stop = full[len(full) // 2 : len(full) // 2 + 3]  # a piece from the middle of the answer
    assert stop.strip(), f"need a visible stop string, got {stop!r} from {full!r}"
    result = generate(engine, stop=(stop,))
    assert result.finish is FinishReason.STOP
    assert result.text == full[: full.index(stop)]
    assert stop not in result.text
    assert len(result.tokens) < NEW_TOKENS


def test_logprobs_match_log_softmax_of_hf_logits(
    engine: HFEngine, hf_model: PreTrainedModel
) -> None:
    result = generate(engine, temperature=1.2, top_k=50, seed=3, logprobs=True)
    prompt = engine.encode(PROMPT)
    assert len(result.logprobs) == len(result.tokens) == NEW_TOKENS
    with torch.no_grad():
        logits = hf_model(torch.tensor([prompt + result.tokens])).logits[0].float()
    # The logits at position t predict token t+1: the generated tokens start after the prompt.
    predicting = torch.log_softmax(logits[len(prompt) - 1 : -1], -1)
    expected = predicting.gather(1, torch.tensor(result.tokens)[:, None])[:, 0].tolist()
    assert result.logprobs == pytest.approx(expected, abs=1e-4)


def test_no_logprobs_unless_asked(engine: HFEngine) -> None:
    assert generate(engine, max_new_tokens=3).logprobs == []


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("temperature", -0.5),
        ("top_k", -1),
        ("top_p", 0.0),
        ("repetition_penalty", 0.0),
        ("max_new_tokens", 0),
        ("stop", ("",)),
    ],
)
def test_invalid_values_are_refused_naming_the_field(
    engine: HFEngine, field: str, value: object
) -> None:
    result = generate(engine, **{field: value})
    assert result.finish is FinishReason.ERROR
    assert result.tokens == []
    assert result.error is not None and result.error.startswith(f"{field}:")
