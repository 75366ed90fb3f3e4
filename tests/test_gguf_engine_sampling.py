"""The GGUF engine's numpy sampling and text streaming, against transformers' logits processors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers.generation.logits_process import (
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from loraplex.server.engine.api import SamplingParams
from loraplex.server.engine.gguf_sampling import TokenSampler
from loraplex.server.engine.gguf_text import TextStream

VOCAB = 5000  # above the top-p prefetch size, so both nucleus paths run


def random_logits(seed: int, spread: float = 4.0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(VOCAB) * spread).astype(np.float32)


def hf_probs(logits: np.ndarray, history: list[int], params: SamplingParams) -> np.ndarray:
    """transformers' processors in generate()'s order; probabilities over the vocabulary."""
    ids = torch.tensor([history])
    scores = torch.from_numpy(logits.copy())[None]
    scores = RepetitionPenaltyLogitsProcessor(params.repetition_penalty)(ids, scores)
    scores = TemperatureLogitsWarper(params.temperature)(ids, scores)
    if params.top_k:
        scores = TopKLogitsWarper(params.top_k)(ids, scores)
    if params.top_p < 1.0:
        scores = TopPLogitsWarper(params.top_p)(ids, scores)
    return torch.softmax(scores.double(), dim=-1)[0].numpy()


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=0.7),
        SamplingParams(temperature=1.3, top_k=40),
        SamplingParams(temperature=1.0, top_p=0.9),
        SamplingParams(temperature=0.8, top_p=0.999, repetition_penalty=1.3),  # past prefetch
        SamplingParams(temperature=1.0, top_k=100, top_p=0.5, repetition_penalty=0.8),
    ],
)
def test_distribution_matches_transformers_processors(params: SamplingParams) -> None:
    logits = random_logits(1)
    prompt = [3, 17, 17, 999, 4321]
    ids, probs = TokenSampler(params, prompt, VOCAB).distribution(logits)
    expected = hf_probs(logits, prompt, params)
    ours = np.zeros(VOCAB)
    ours[ids] = probs
    np.testing.assert_allclose(ours, expected, atol=1e-6)


def test_greedy_takes_the_argmax_of_penalized_logits() -> None:
    logits = random_logits(2)
    best = int(np.argmax(logits))
    params = SamplingParams(repetition_penalty=50.0)
    token, _ = TokenSampler(params, [best], VOCAB).choose(logits)
    expected = hf_probs(logits, [best], SamplingParams(temperature=1.0, repetition_penalty=50.0))
    assert token == int(np.argmax(expected)) != best


def test_greedy_logprob_is_the_log_softmax_of_the_choice() -> None:
    logits = random_logits(3)
    token, logprob = TokenSampler(SamplingParams(logprobs=True), [0], VOCAB).choose(logits)
    expected = torch.log_softmax(torch.from_numpy(logits).double(), -1)[token].item()
    assert logprob == pytest.approx(expected, abs=1e-6)


def test_seeded_draws_repeat_and_differ_between_seeds() -> None:
    def draws(seed: int) -> list[int]:
        sampler = TokenSampler(SamplingParams(temperature=1.0, seed=seed), [0], VOCAB)
        return [sampler.choose(random_logits(i, spread=0.5))[0] for i in range(20)]

    assert draws(7) == draws(7)
    assert draws(7) != draws(8)


def test_sampled_logprob_is_that_of_the_filtered_distribution() -> None:
    params = SamplingParams(temperature=1.0, top_k=5, seed=1, logprobs=True)
    logits = random_logits(4)
    ids, probs = TokenSampler(params, [0], VOCAB).distribution(logits)
    token, logprob = TokenSampler(params, [0], VOCAB).choose(logits)
    assert logprob == pytest.approx(float(np.log(probs[list(ids).index(token)])))


def test_text_holds_back_a_possible_stop_and_cuts_at_it() -> None:
    stream = TextStream(stop=("END",))
    assert stream.push(b"Hello E") == "Hello "
    assert stream.push(b"N") == ""
    assert stream.push(b"D and more") == ""
    assert stream.stopped


def test_text_releases_a_false_stop_prefix() -> None:
    stream = TextStream(stop=("END",))
    assert stream.push(b"an E") == "an "
    assert stream.push(b"ffort") == "Effort"
    assert not stream.stopped
    assert stream.push(b" EN") == " "
    assert stream.flush() == "EN"


def test_text_waits_for_split_utf8_characters() -> None:
    encoded = "héllo €".encode()
    stream = TextStream(stop=())
    pieces = [stream.push(encoded[i : i + 1]) for i in range(len(encoded))]
    assert "".join(pieces) == "héllo €"
    assert pieces[1] == ""  # the first byte of "é" alone is not yet text


def test_earliest_of_several_stops_wins() -> None:
    stream = TextStream(stop=("world", "lo"))
    assert stream.push(b"hello world") == "hel"
    assert stream.stopped
