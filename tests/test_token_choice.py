"""The shared sampler and text stream against independent oracles: transformers' logits
processors, torch's log_softmax, and tokenizer.decode of all the tokens at once."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from tiny import build_tokenizer
from tokenizers import Tokenizer, decoders, models, normalizers
from transformers import PreTrainedTokenizerFast
from transformers.generation.logits_process import (
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from loraplex.server.engine.api import SamplingParams
from loraplex.server.engine.sampling import (
    NUCLEUS_PREFETCH,
    TokenSampler,
    apply_repetition_penalty,
    argmax_of,
    distribution,
    draw,
    largest,
)
from loraplex.server.engine.text import TextStream

VOCAB = 2 * NUCLEUS_PREFETCH  # so that top-p runs both on the prefetched head and past it
CPU = torch.device("cpu")


def random_logits(seed: int, spread: float = 4.0) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).standard_normal(VOCAB) * spread).float()


def hf_probs(logits: torch.Tensor, history: list[int], params: SamplingParams) -> torch.Tensor:
    """transformers' processors in generate()'s order; probabilities over the vocabulary."""
    ids = torch.tensor([history])
    scores = RepetitionPenaltyLogitsProcessor(params.repetition_penalty)(ids, logits[None])
    scores = TemperatureLogitsWarper(params.temperature)(ids, scores)
    if params.top_k:
        scores = TopKLogitsWarper(params.top_k)(ids, scores)
    if params.top_p < 1.0:
        scores = TopPLogitsWarper(params.top_p)(ids, scores)
    if params.min_p > 0.0:
        scores = MinPLogitsWarper(params.min_p)(ids, scores)
    return torch.softmax(scores.double(), dim=-1)[0]


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=0.7),
        SamplingParams(temperature=1.3, top_k=40),
        SamplingParams(temperature=1.0, top_p=0.9),
        SamplingParams(temperature=3.0, top_p=0.999, repetition_penalty=1.3),  # past prefetch
        SamplingParams(temperature=1.0, top_k=100, top_p=0.5, repetition_penalty=0.8),
        SamplingParams(temperature=1.0, min_p=0.05),
        SamplingParams(temperature=0.5, min_p=0.3),
        SamplingParams(temperature=3.0, min_p=0.01),  # a wide cut, past the prefetch
        SamplingParams(temperature=1.0, min_p=1.0),  # only the top token
        SamplingParams(temperature=2.0, top_k=50, min_p=0.2),
        SamplingParams(temperature=3.0, top_p=0.9, min_p=0.1, repetition_penalty=1.3),
        SamplingParams(temperature=1.5, top_k=200, top_p=0.95, min_p=0.02),
    ],
)
def test_distribution_matches_transformers_processors(params: SamplingParams) -> None:
    logits = random_logits(1)
    history = [3, 17, 17, 999, 4321]
    scores = apply_repetition_penalty(logits, torch.tensor(history), params.repetition_penalty)
    ids, probs = distribution(scores, params.temperature, params.top_k, params.top_p, params.min_p)
    ours = torch.zeros(VOCAB, dtype=torch.float64)
    ours[slice(None) if ids is None else ids] = probs.double() / probs.sum()
    torch.testing.assert_close(ours, hf_probs(logits, history, params), atol=1e-6, rtol=0)


def test_draws_follow_the_distribution_and_never_pick_a_zero() -> None:
    probs = torch.tensor([0.5, 0.0, 0.25, 0.125, 0.0, 0.125]) * 3  # unnormalized is fine
    generator = torch.Generator().manual_seed(0)
    counts = np.bincount([draw(probs, generator) for _ in range(20000)], minlength=6)
    assert counts[1] == counts[4] == 0
    np.testing.assert_allclose(counts / 20000, (probs / probs.sum()).numpy(), atol=0.015)


@pytest.mark.parametrize("min_p", [0.1, 0.5])
def test_min_p_keeps_what_transformers_keeps_and_the_sampler_draws_only_those(
    min_p: float,
) -> None:
    logits = random_logits(4, spread=1.0)
    ids = torch.tensor([[0]])
    scaled = TemperatureLogitsWarper(2.0)(ids, logits[None])
    kept = MinPLogitsWarper(min_p)(ids, scaled)[0] > float("-inf")
    _, probs = distribution(logits, 2.0, 0, 1.0, min_p)
    assert torch.equal(probs > 0, kept)
    assert 1 < int(kept.sum()) < VOCAB  # the cut does something, and keeps a choice
    sampler = TokenSampler(SamplingParams(temperature=2.0, min_p=min_p, seed=5), [0], CPU)
    drawn = {sampler.choose(logits).token for _ in range(300)}
    assert drawn <= set(kept.nonzero()[:, 0].tolist())
    assert len(drawn) > 1


def test_sampler_draws_only_tokens_top_k_keeps() -> None:
    logits = random_logits(5)
    top5 = set(torch.topk(logits, 5).indices.tolist())
    sampler = TokenSampler(SamplingParams(temperature=5.0, top_k=5, seed=1), [0], CPU)
    assert {sampler.choose(logits)[0] for _ in range(200)} == top5


def test_greedy_takes_the_argmax_of_penalized_logits() -> None:
    logits = random_logits(2)
    best = int(torch.argmax(logits))
    params = SamplingParams(repetition_penalty=50.0)
    token = TokenSampler(params, [best], CPU).choose(logits).token
    expected = hf_probs(logits, [best], SamplingParams(temperature=1.0, repetition_penalty=50.0))
    assert token == int(torch.argmax(expected)) != best


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(logprobs=True, repetition_penalty=1.5),
        SamplingParams(temperature=0.5, top_k=5, seed=1, logprobs=True, repetition_penalty=1.2),
    ],
)
def test_logprob_is_the_log_softmax_of_the_model_logits(params: SamplingParams) -> None:
    logits = random_logits(3)
    sampler = TokenSampler(params, [0, 1], CPU)
    for _ in range(5):
        token, logprob, _ = sampler.choose(logits)
        assert logprob == pytest.approx(float(torch.log_softmax(logits, -1)[token]), abs=1e-5)


def test_seeded_draws_repeat_and_differ_between_seeds() -> None:
    def draws(seed: int) -> list[int]:
        sampler = TokenSampler(SamplingParams(temperature=1.0, seed=seed), [0], CPU)
        return [sampler.choose(random_logits(i, spread=0.5))[0] for i in range(20)]

    assert draws(7) == draws(7)
    assert draws(7) != draws(8)


def test_numpy_rows_are_read_in_place_and_sample_as_tensors_do() -> None:
    row = random_logits(6).numpy()
    before = row.copy()
    params = SamplingParams(temperature=0.9, top_p=0.8, repetition_penalty=1.4, seed=3)
    viewed = TokenSampler(params, [1, 2], CPU)
    copied = TokenSampler(params, [1, 2], CPU)
    picks = [viewed.choose(torch.from_numpy(row))[0] for _ in range(10)]
    assert picks == [copied.choose(torch.tensor(before))[0] for _ in range(10)]
    np.testing.assert_array_equal(row, before)


def test_top_k_keeps_ties_with_the_kth_as_transformers_does() -> None:
    scores = torch.tensor([0.5, 2.0, 1.0, 3.0, 1.0, -1.0, 1.0])
    kept = TopKLogitsWarper(3)(torch.tensor([[0]]), scores[None])[0] > float("-inf")
    ids, _ = distribution(scores, 1.0, 3, 1.0)
    assert ids is not None and sorted(ids.tolist()) == kept.nonzero()[:, 0].tolist()
    ids, _ = distribution(scores, 1.0, 2, 1.0)
    assert ids is not None and sorted(ids.tolist()) == [1, 3]


def test_cpu_shortcuts_agree_with_torch() -> None:
    values = torch.tensor([1.0, 5.0, 3.0, 5.0, -2.0, 4.0])
    assert argmax_of(values) == int(torch.argmax(values)) == 1  # the first of a tie
    assert set(largest(values, 3).tolist()) == {1, 3, 5}


# ---- text ---------------------------------------------------------------------------------


def byte_stream(pieces: list[bytes], stop: tuple[str, ...] = ()) -> TextStream:
    """A stream over a vocabulary whose tokens are these byte strings, as llama.cpp's are."""
    return TextStream(lambda ids: b"".join(pieces[i] for i in ids).decode("utf-8", "replace"), stop)


def test_text_holds_back_a_possible_stop_and_cuts_at_it() -> None:
    stream = byte_stream([b"Hello E", b"N", b"D and more"], stop=("END",))
    assert stream.push(0) == "Hello "
    assert stream.push(1) == ""
    assert stream.push(2) == ""
    assert stream.stopped


def test_text_releases_a_false_stop_prefix() -> None:
    stream = byte_stream([b"an E", b"ffort", b" EN"], stop=("END",))
    assert stream.push(0) == "an "
    assert stream.push(1) == "Effort"
    assert not stream.stopped
    assert stream.push(2) == " "
    assert stream.flush() == "EN"


def test_text_waits_for_split_utf8_characters() -> None:
    encoded = "héllo €".encode()
    stream = byte_stream([encoded[i : i + 1] for i in range(len(encoded))])
    pieces = [stream.push(i) for i in range(len(encoded))]
    assert "".join(pieces) == "héllo €"
    assert pieces[1] == ""  # the first byte of "é" alone is not yet text


def test_earliest_of_several_stops_wins() -> None:
    stream = byte_stream([b"hello world"], stop=("world", "lo"))
    assert stream.push(0) == "hel"
    assert stream.stopped


WORDS = ["the", "quick", "fox", "café", "naïve", "€5", "日本語", "😀", "straße", "don't", "a.b",
         " ", "\n", "END", "EN", "!", "über", "𠜎𠜱", "ꙮ"]  # fmt: skip


def sentencepiece_tokenizer(strip_first_space: bool) -> PreTrainedTokenizerFast:
    """A byte-fallback sentencepiece-style tokenizer: Gemma's decoder, or Llama's, which also
    drops a text's leading space. Characters outside its vocabulary become byte tokens."""
    pieces = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    pieces += ["▁", "▁the", "▁quick", "▁fox", "é", "ï", "日本", "ü", ".", "'", "!", "END"]
    pieces += list("abcdefghijklmnopqrstuvwxyz")
    tokenizer = Tokenizer(models.Unigram([(p, -1.0) for p in pieces], 0, byte_fallback=True))
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    prepend = [normalizers.Prepend("▁")] if strip_first_space else []
    tokenizer.normalizer = normalizers.Sequence([*prepend, normalizers.Replace(" ", "▁")])
    tokenizer.decoder = decoders.Sequence(steps + [decoders.Strip(" ", 1, 0)] * strip_first_space)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )


def random_ids(tokenizer: PreTrainedTokenizerFast, seed: int) -> list[int]:
    """The tokens of random text, with special tokens (which decode to nothing) among them."""
    rng = random.Random(seed)
    text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 30)))
    ids = list(tokenizer.encode(text, add_special_tokens=False))
    for _ in range(rng.randint(0, 3)):
        ids.insert(rng.randint(0, len(ids)), tokenizer.bos_token_id)
    return ids


def streamed(tokenizer: PreTrainedTokenizerFast, ids: list[int], stop: tuple[str, ...]) -> str:
    stream = TextStream(lambda t: tokenizer.decode(t, skip_special_tokens=True), stop)
    text = ""
    for token in ids:
        text += stream.push(token)
        if stream.stopped:
            return text
    return text + stream.flush()


@pytest.mark.parametrize("kind", ["byte-level", "gemma-sentencepiece", "llama-sentencepiece"])
def test_streamed_text_is_the_decode_of_all_tokens(kind: str) -> None:
    tokenizer = {
        "byte-level": build_tokenizer,
        "gemma-sentencepiece": lambda: sentencepiece_tokenizer(strip_first_space=False),
        "llama-sentencepiece": lambda: sentencepiece_tokenizer(strip_first_space=True),
    }[kind]()
    assert_streams_decode(tokenizer, seeds=range(60))


def assert_streams_decode(tokenizer: PreTrainedTokenizerFast, seeds: range) -> None:
    """For each seed's tokens: the streamed text equals tokenizer.decode of them all, and with a
    stop sequence, that text up to the stop's first occurrence."""
    for seed in seeds:
        ids = random_ids(tokenizer, seed)
        full = tokenizer.decode(ids, skip_special_tokens=True)
        assert streamed(tokenizer, ids, ()) == full, (seed, ids)
        for stop in ("END", "é", "日本語 ", "quick"):
            expected = full[: full.index(stop)] if stop in full else full
            assert streamed(tokenizer, ids, (stop,)) == expected, (seed, stop)
