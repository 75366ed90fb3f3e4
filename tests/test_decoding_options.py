"""Decoding options and structured output, against independent oracles: transformers' logits
processors, plain-Python penalties over collections.Counter, torch's log_softmax, a bit-by-bit
reading of the grammar mask, the `jsonschema` validator, `re.fullmatch`, a hand-written parser
for the Lark grammar, and the transformers model itself on the same weights."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import jsonschema
import numpy as np
import pytest
import torch
from tiny import build_tokenizer
from transformers import AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerFast
from transformers.generation.logits_process import (
    RepetitionPenaltyLogitsProcessor,
    SequenceBiasLogitsProcessor,
)

from loraplex.adapters.store import AdapterStore
from loraplex.server.engine import grammar
from loraplex.server.engine.api import (
    FinishReason,
    OutputFormat,
    SamplingParams,
    SequenceRequest,
    StepPlan,
    TokenEvent,
)
from loraplex.server.engine.config import EngineConfig
from loraplex.server.engine.hf import HFEngine
from loraplex.server.engine.rows import ModelInfo, Row, advance_all
from loraplex.server.engine.sampling import TokenSampler
from loraplex.server.errors import InvalidRequest

CPU = torch.device("cpu")
VOCAB = 1000
TOKENIZER = build_tokenizer()  # the tiny checkpoints' tokenizer: trained the same way


def random_logits(seed: int, size: int = VOCAB, spread: float = 3.0) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).standard_normal(size) * spread).float()


def forced(token: int, size: int = VOCAB) -> torch.Tensor:
    """Logits that make any greedy sampler (penalties of at most a few units) pick `token`."""
    logits = torch.zeros(size)
    logits[token] = 1e4
    return logits


def sampler_with_output(
    params: SamplingParams, prompt: list[int], output: list[int]
) -> TokenSampler:
    """A sampler that has already chosen `output` (through its public choose())."""
    sampler = TokenSampler(params, prompt, CPU)
    for token in output:
        assert sampler.choose(forced(token)).token == token
    return sampler


# ---- sampler level: bias, penalties, top logprobs -------------------------------------------


def test_logit_bias_matches_transformers_sequence_bias() -> None:
    logits = random_logits(1)
    bias = ((3, 5.0), (17, -100.0), (999, 100.0), (0, -0.25), (500, 1.5))
    params = SamplingParams(logit_bias=bias)
    ours = TokenSampler(params, [1, 2], CPU).scores(logits)
    processor = SequenceBiasLogitsProcessor([[[token], value] for token, value in bias])
    expected = processor(torch.tensor([[1, 2]]), logits[None].clone())[0]
    torch.testing.assert_close(ours, expected)
    assert TokenSampler(params, [1, 2], CPU).choose(logits).token == 999  # greedy: the +100


def counter_penalties(
    logits: torch.Tensor, output: list[int], presence: float, frequency: float
) -> list[float]:
    """OpenAI's rule in plain Python: each token in the output loses `presence` once and
    `frequency` per occurrence; the prompt does not count."""
    counts = Counter(output)
    values = [float(v) for v in logits]
    for token, count in counts.items():
        values[token] -= presence + frequency * count
    return values


@pytest.mark.parametrize(
    ("presence", "frequency"), [(0.7, 0.0), (0.0, 0.4), (1.5, -0.3), (-2.0, 2.0), (0.5, 1.0)]
)
def test_presence_and_frequency_penalties_count_the_output_only(
    presence: float, frequency: float
) -> None:
    prompt = [5, 6, 7, 7, 8, 40]  # penalizing these would be wrong
    output = [40, 5, 9, 9, 9, 300, 40, 12]
    params = SamplingParams(presence_penalty=presence, frequency_penalty=frequency)
    sampler = sampler_with_output(params, prompt, output)
    logits = random_logits(2)
    expected = torch.tensor(counter_penalties(logits, output, presence, frequency))
    torch.testing.assert_close(sampler.scores(logits), expected, atol=1e-5, rtol=0)
    # untouched: the prompt-only tokens and everything else
    for token in (6, 7, 8, 0, 999):
        assert float(sampler.scores(logits)[token]) == float(logits[token])


def test_a_fresh_sampler_penalizes_nothing_and_the_prompt_never() -> None:
    params = SamplingParams(presence_penalty=2.0, frequency_penalty=2.0)
    logits = random_logits(3)
    best = int(logits.argmax())
    sampler = TokenSampler(params, [best] * 5, CPU)
    assert torch.equal(sampler.scores(logits), logits)
    assert sampler.choose(logits).token == best  # the prompt's copies of it cost nothing
    assert sampler.scores(logits)[best] == pytest.approx(float(logits[best]) - 4.0)


def test_bias_then_repetition_then_output_penalties_in_order() -> None:
    prompt, output = [3, 4, 5], [4, 9, 9, 11]
    bias = ((4, 2.0), (9, -1.0), (20, 3.0))
    params = SamplingParams(
        logit_bias=bias, repetition_penalty=1.7, presence_penalty=0.3, frequency_penalty=0.2
    )
    sampler = sampler_with_output(params, prompt, output)
    logits = random_logits(4)
    ids = torch.tensor([prompt + output])
    expected = SequenceBiasLogitsProcessor([[[t], v] for t, v in bias])(ids, logits[None].clone())
    expected = RepetitionPenaltyLogitsProcessor(1.7)(ids, expected)[0]
    expected = torch.tensor(counter_penalties(expected, output, 0.3, 0.2))
    torch.testing.assert_close(sampler.scores(logits), expected, atol=1e-5, rtol=0)


def test_greedy_with_penalties_takes_the_argmax_of_the_counter_oracle() -> None:
    logits = random_logits(5, spread=0.5)  # close logits, so the penalties reorder them
    params = SamplingParams(presence_penalty=0.4, frequency_penalty=0.3)
    sampler = TokenSampler(params, [0, 1], CPU)
    output: list[int] = []
    for _ in range(30):
        scores = counter_penalties(logits, output, 0.4, 0.3)
        expected = max(range(VOCAB), key=scores.__getitem__)
        output.append(sampler.choose(logits).token)
        assert output[-1] == expected
    assert len(set(output)) > 5  # the penalties moved greedy off its first choice


@pytest.mark.parametrize("k", [1, 5, 20])
def test_top_logprobs_are_the_models_log_softmax_topk(k: int) -> None:
    # the scores are biased and penalized and the token is drawn: the top logprobs are still
    # the model's own distribution's
    params = SamplingParams(
        temperature=0.8, top_k=30, seed=4, top_logprobs=k, logit_bias=((7, 50.0),),
        presence_penalty=1.0, repetition_penalty=1.3,
    )  # fmt: skip
    sampler = TokenSampler(params, [1, 2, 3], CPU)
    for step in range(5):
        logits = random_logits(10 + step)
        choice = sampler.choose(logits)
        values, ids = torch.log_softmax(logits.double(), -1).topk(k)
        assert choice.top is not None and len(choice.top) == k
        assert [t for t, _ in choice.top] == ids.tolist()
        np.testing.assert_allclose([v for _, v in choice.top], values.numpy(), atol=1e-5)
        assert choice.logprob is None  # only asked for the top ones


def test_no_top_logprobs_unless_asked() -> None:
    choice = TokenSampler(SamplingParams(logprobs=True), [1], CPU).choose(random_logits(6))
    assert choice.top is None and choice.logprob is not None


# ---- sampler level: the output format's mask ------------------------------------------------


def bits_of(words: np.ndarray, size: int) -> list[bool]:
    """Token t's bit, read one at a time: bit t % 32 of int32 word t // 32; none past the mask."""
    return [
        t < 32 * len(words) and bool((int(words[t // 32]) >> (t % 32)) & 1) for t in range(size)
    ]


@pytest.mark.parametrize(("size", "words"), [(320, 10), (100, 2), (50, 4), (1000, 32)])
def test_apply_bitmask_keeps_exactly_the_set_bits(size: int, words: int) -> None:
    rng = np.random.default_rng(size)
    mask = rng.integers(-(2**31), 2**31, size=words, dtype=np.int32)
    logits = random_logits(size, size=size)
    masked = grammar.apply_bitmask(logits, torch.from_numpy(mask))
    expected = bits_of(mask, size)
    assert masked.shape == logits.shape
    for token, allowed in enumerate(expected):
        assert float(masked[token]) == (float(logits[token]) if allowed else float("-inf"))
    if size > 32 * words:  # tokens past the mask are disallowed
        assert bool(torch.isneginf(masked[32 * words :]).all())


def random_mask(seed: int, size: int, share: float) -> tuple[torch.Tensor, set[int]]:
    """An int32 bitmask allowing a random `share` of the tokens, and the set it allows."""
    allowed = np.random.default_rng(seed).random(size) < share
    words = np.zeros((size + 31) // 32, dtype=np.int64)
    for token in np.flatnonzero(allowed):
        words[token // 32] |= 1 << (token % 32)
    return torch.from_numpy(words.astype(np.uint32).view(np.int32)), set(np.flatnonzero(allowed))


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=2.0, seed=1),
        SamplingParams(temperature=1.0, top_p=0.9, min_p=0.01, seed=2),
        SamplingParams(temperature=5.0, seed=3, logit_bias=((0, 100.0),), presence_penalty=1.0),
    ],
)
def test_a_masked_sampler_never_picks_a_disallowed_token(params: SamplingParams) -> None:
    mask, allowed = random_mask(7, VOCAB, 0.1)
    if 0 in allowed:  # the bias must push a disallowed token
        allowed.discard(0)
        mask[0] &= ~1
    logits = random_logits(8, spread=1.0)
    sampler = TokenSampler(params, [1, 2], CPU)
    drawn = [sampler.choose(logits, allowed=mask).token for _ in range(400)]
    assert set(drawn) <= allowed
    assert len(set(drawn)) > 5  # the draws spread over the allowed tokens


def test_the_mask_comes_before_top_k_and_greedy() -> None:
    mask, allowed = random_mask(9, VOCAB, 0.2)
    logits = random_logits(10)
    best_allowed = sorted(allowed, key=lambda t: -float(logits[t]))
    assert int(logits.argmax()) not in allowed  # otherwise this proves nothing
    greedy = TokenSampler(SamplingParams(), [1], CPU)
    assert greedy.choose(logits, int(logits.argmax()), mask).token == best_allowed[0]
    top3 = TokenSampler(SamplingParams(temperature=50.0, top_k=3, seed=1), [1], CPU)
    drawn = {top3.choose(logits, allowed=mask).token for _ in range(200)}
    assert drawn == set(best_allowed[:3])


def test_a_mask_allowing_nothing_raises() -> None:
    nothing = torch.zeros(VOCAB // 32 + 1, dtype=torch.int32)
    for params in (SamplingParams(), SamplingParams(temperature=1.0, seed=1)):
        with pytest.raises(RuntimeError, match="allows no token"):
            TokenSampler(params, [1], CPU).choose(random_logits(11), allowed=nothing)


class NothingAllowed:
    """A matcher stand-in whose grammar has reached a dead end."""

    finished = False

    def allowed(self) -> torch.Tensor:
        return torch.zeros(VOCAB // 32 + 1, dtype=torch.int32)

    def accept(self, token: int) -> None:
        raise AssertionError("nothing can be accepted")


def test_a_dead_end_mask_ends_its_row_with_an_error_and_not_its_batch_mate() -> None:
    model = ModelInfo(64, VOCAB, lambda t: t == 0, lambda ids: " ".join(map(str, ids)), CPU)
    stuck = Row.start(SequenceRequest("stuck", [1, 2], SamplingParams()), model)
    stuck.matcher = NothingAllowed()  # type: ignore[assignment]
    mate = Row.start(SequenceRequest("mate", [1, 2], SamplingParams(max_new_tokens=3)), model)
    logits = torch.stack([random_logits(12), random_logits(13)])
    events = advance_all([stuck, mate], logits, model)
    assert events[0].finish is FinishReason.ERROR and events[0].token_id is None
    assert events[0].error is not None and "allows no token" in events[0].error
    assert events[1].token_id == int(logits[1].argmax()) and events[1].finish is None
    assert stuck.finish is FinishReason.ERROR and mate.finish is None


# ---- the grammar's masks over a real vocabulary ---------------------------------------------


TokenizerGrammars = tuple[PreTrainedTokenizerFast, grammar.Grammars, int]


@pytest.fixture(scope="module")
def tokenizer_grammars() -> TokenizerGrammars:
    eos = TOKENIZER.eos_token_id
    return TOKENIZER, grammar.for_hf_tokenizer(TOKENIZER, len(TOKENIZER), [eos]), eos


def allowed_set(matcher: grammar.Matcher) -> set[int]:
    words = matcher.allowed().numpy()
    return {t for t, bit in enumerate(bits_of(words, matcher.vocab)) if bit}


def test_a_regex_masks_exactly_the_tokens_that_can_continue_it(
    tokenizer_grammars: TokenizerGrammars,
) -> None:
    tokenizer, grammars, eos = tokenizer_grammars
    text = {t: tokenizer.decode([t]) for t in range(len(tokenizer))}
    digits = {t for t, s in text.items() if s and all(c in "0123456789" for c in s)}
    assert len(digits) > 10  # single digits and merged ones like "23"
    matcher = grammars.matcher(OutputFormat("regex", "[0-9]+"))
    assert allowed_set(matcher) == digits  # no EOS yet: the output must not be empty
    matcher.accept(min(digits))
    assert allowed_set(matcher) == digits | {eos}
    assert not matcher.finished
    with pytest.raises(RuntimeError, match="refused"):
        matcher.accept(next(t for t, s in text.items() if s == "x"))

    two = grammars.matcher(OutputFormat("regex", "ab|cd"))
    firsts = {t for t, s in text.items() if s in ("a", "ab", "c", "cd")}
    assert allowed_set(two) == firsts
    two.accept(next(t for t, s in text.items() if s == "c"))
    assert allowed_set(two) == {t for t, s in text.items() if s == "d"}
    two.accept(next(t for t, s in text.items() if s == "d"))
    assert two.finished


# ---- engine level ----------------------------------------------------------------------------

PROMPT = "The quick brown fox"
PROMPTS = [PROMPT, "Question: what is two plus two?", "Hello world", "hello"]
SCHEMA = {
    "type": "object",
    "properties": {
        "color": {"enum": ["red", "green", "blue"]},
        "n": {"type": "integer", "minimum": 0, "maximum": 99},
        "name": {"type": "string", "maxLength": 5},
        "ok": {"type": "boolean"},
    },
    "required": ["color", "n", "name", "ok"],
    "additionalProperties": False,
}
# JSON allows whitespace between tokens, which the random model favours until max_new_tokens:
# the JSON rows bias it away (the grammar still decides everything else)
NO_WHITESPACE = tuple(
    (t, -100.0)
    for t in range(len(TOKENIZER))
    if TOKENIZER.decode([t], skip_special_tokens=True)
    and not TOKENIZER.decode([t], skip_special_tokens=True).strip()
)
REGEX = r"[a-z]{2,6}-[0-9]{1,3}(\.[a-z]{1,2})?"
# arithmetic with at least one operator, nested at most two deep (deeper nesting is what the
# random model, which repeats its last token, would pour out); checked by `parse_expr` below
LARK = r"""
start: "(" expr OP expr ")"
expr: DIGIT | "(" leaf OP leaf ")"
leaf: DIGIT
OP: "+" | "*"
DIGIT: /[0-9]/
"""


def parse_expr(text: str) -> int:
    """The value of an expression of LARK's language; ValueError when it is not one."""

    def expr(i: int, depth: int) -> tuple[int, int]:
        if i < len(text) and text[i] in "0123456789":
            return int(text[i]), i + 1
        if i >= len(text) or text[i] != "(" or depth == 2:
            raise ValueError(f"{text!r}: expected a digit{' or (' * (depth < 2)} at {i}")
        left, i = expr(i + 1, depth + 1)
        if i >= len(text) or text[i] not in "+*":
            raise ValueError(f"{text!r}: expected an operator at {i}")
        op = text[i]
        right, i = expr(i + 1, depth + 1)
        if i >= len(text) or text[i] != ")":
            raise ValueError(f"{text!r}: expected ')' at {i}")
        return (left + right if op == "+" else left * right), i + 1

    if not text.startswith("("):
        raise ValueError(f"{text!r}: the top level needs an operator")
    value, end = expr(0, 0)
    if end != len(text):
        raise ValueError(f"{text!r}: trailing text at {end}")
    return value


def test_the_expression_oracle_refuses_what_it_should() -> None:
    assert parse_expr("(1+(2*3))") == 7
    assert parse_expr("((1+2)*(3+4))") == 21
    for bad in ("1", "(1+2", "(1+2))", "(12+3)", "(1-2)", "(1+2)x", "", "(1+((2*3)+4))"):
        with pytest.raises(ValueError):
            parse_expr(bad)


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


class Output:
    def __init__(self) -> None:
        self.events: list[TokenEvent] = []

    @property
    def tokens(self) -> list[int]:
        return [e.token_id for e in self.events if e.token_id is not None]

    @property
    def text(self) -> str:
        return "".join(e.text for e in self.events)

    @property
    def finish(self) -> FinishReason | None:
        return self.events[-1].finish if self.events else None

    @property
    def error(self) -> str | None:
        return self.events[-1].error if self.events else None


def run_batch(engine: HFEngine, requests: list[SequenceRequest]) -> dict[str, Output]:
    """Prefill every request in one step, then decode until all have finished."""
    outputs = {r.seq_id: Output() for r in requests}
    plan = StepPlan(prefill=requests)
    for _ in range(300):
        for event in engine.step(plan):
            outputs[event.seq_id].events.append(event)
        if not engine.running():
            assert all(o.finish is not None for o in outputs.values())
            return outputs
        plan = StepPlan(decode=engine.running())
    raise AssertionError("sequences did not finish")


def request(seq_id: str, prompt: str = PROMPT, **params: object) -> SequenceRequest:
    sampling = SamplingParams(**{"max_new_tokens": 8, **params})  # type: ignore[arg-type]
    return SequenceRequest(seq_id, list(TOKENIZER.encode(prompt)), sampling)


def solo(engine: HFEngine, prompt: str = PROMPT, **params: object) -> Output:
    return run_batch(engine, [request("solo", prompt, **params)])["solo"]


def test_the_tokenizer_is_the_engines(engine: HFEngine) -> None:
    for prompt in PROMPTS:
        assert list(TOKENIZER.encode(prompt)) == engine.encode(prompt)
    assert {t for t, _ in NO_WHITESPACE} == {
        t for t in range(320) if engine.decode([t]) and not engine.decode([t]).strip()
    }
    assert len(NO_WHITESPACE) >= 4  # space, tab, newline, carriage return


def hf_penalized_greedy(
    hf_model: PreTrainedModel, prompt: list[int], n: int, presence: float, frequency: float
) -> list[int]:
    """transformers' logits for each position, penalized by `counter_penalties`, argmax."""
    output: list[int] = []
    with torch.no_grad():
        for _ in range(n):
            logits = hf_model(torch.tensor([prompt + output])).logits[0, -1].double()
            scores = counter_penalties(logits, output, presence, frequency)
            output.append(max(range(len(scores)), key=scores.__getitem__))
    return output


def test_penalized_greedy_equals_transformers_with_counter_penalties(
    engine: HFEngine, hf_model: PreTrainedModel
) -> None:
    for prompt in PROMPTS[:2]:
        ids = engine.encode(prompt)
        expected = hf_penalized_greedy(hf_model, ids, 10, 0.5, 1.5)
        got = solo(engine, prompt, max_new_tokens=10, presence_penalty=0.5, frequency_penalty=1.5)
        assert got.tokens == expected
        plain = solo(engine, prompt, max_new_tokens=10)
        assert got.tokens != plain.tokens  # the penalties changed the output
    # the prompt's tokens are not penalized: its last token is the model's greedy first pick
    ids = engine.encode(PROMPT)
    assert solo(engine, max_new_tokens=1).tokens == [ids[-1]]
    pen = solo(engine, max_new_tokens=1, presence_penalty=2.0, frequency_penalty=2.0)
    assert pen.tokens == [ids[-1]]


def test_stop_token_id_ends_with_stop_without_its_text(engine: HFEngine) -> None:
    penalties = {"presence_penalty": 0.5, "frequency_penalty": 1.5}  # so that tokens vary
    greedy = solo(engine, max_new_tokens=8, **penalties)
    first3, fourth = greedy.tokens[:3], greedy.tokens[3]
    assert fourth not in first3 and fourth not in engine.eos_ids
    assert engine.decode([fourth]), "the stop token must have text for this to test anything"
    stopped = solo(engine, max_new_tokens=8, stop_token_ids=(fourth, 1), **penalties)
    assert stopped.finish is FinishReason.STOP
    # the stop token is reported as the last token id (vLLM does the same), its text is not
    assert stopped.tokens == [*first3, fourth]
    assert stopped.text == engine.decode(first3)
    assert stopped.events[-1].token_id == fourth and stopped.events[-1].text == ""


def test_ignore_eos_goes_on_past_end_of_sequence(engine: HFEngine) -> None:
    (eos,) = engine.eos_ids
    bias = ((eos, 100.0),)
    ended = solo(engine, max_new_tokens=6, logit_bias=bias)
    assert ended.tokens == [eos] and ended.finish is FinishReason.EOS and ended.text == ""
    kept = solo(engine, max_new_tokens=6, logit_bias=bias, ignore_eos=True)
    assert kept.tokens == [eos] * 6 and kept.finish is FinishReason.LENGTH
    # an EOS that is also a stop token id ends with STOP once EOS is ignored
    both = solo(engine, max_new_tokens=6, logit_bias=bias, ignore_eos=True, stop_token_ids=(eos,))
    assert both.tokens == [eos] and both.finish is FinishReason.STOP


def test_logit_bias_through_the_engine(engine: HFEngine, hf_model: PreTrainedModel) -> None:
    ids = engine.encode(PROMPT)
    plain = solo(engine, max_new_tokens=6)
    target = next(t for t in range(100, 320) if t not in plain.tokens)
    pushed = solo(engine, max_new_tokens=6, logit_bias=((target, 100.0),))
    assert pushed.tokens == [target] * 6
    # -100 on the greedy token: the runner-up of transformers' logits comes first
    with torch.no_grad():
        logits = hf_model(torch.tensor([ids])).logits[0, -1]
    runner_up = int(logits.topk(2).indices[1])
    assert int(logits.argmax()) == plain.tokens[0]
    pushed_down = solo(engine, max_new_tokens=1, logit_bias=((plain.tokens[0], -100.0),))
    assert pushed_down.tokens == [runner_up]


def test_top_logprobs_through_the_engine(engine: HFEngine, hf_model: PreTrainedModel) -> None:
    ids = engine.encode(PROMPT)
    out = solo(engine, max_new_tokens=6, temperature=1.0, seed=5, top_logprobs=5, logprobs=True)
    with torch.no_grad():
        logits = hf_model(torch.tensor([ids + out.tokens])).logits[0].double()
    expected = torch.log_softmax(logits[len(ids) - 1 : -1], -1)
    for event, row in zip(out.events, expected, strict=True):
        values, top = row.topk(5)
        assert event.top_logprobs is not None
        assert [t for t, _ in event.top_logprobs] == top.tolist()
        np.testing.assert_allclose([v for _, v in event.top_logprobs], values, atol=1e-4)
        assert event.logprob == pytest.approx(float(row[event.token_id]), abs=1e-4)


def schema_request(seq_id: str, seed: int, prompt: str = PROMPT) -> SequenceRequest:
    fmt = OutputFormat("json_schema", json.dumps(SCHEMA))
    return request(
        seq_id, prompt, temperature=1.0, seed=seed, max_new_tokens=60, output_format=fmt,
        logit_bias=NO_WHITESPACE,
    )  # fmt: skip


def assert_schema_valid(output: Output) -> None:
    assert output.finish is not FinishReason.ERROR, output.error
    if output.finish is FinishReason.STOP:
        jsonschema.validate(json.loads(output.text), SCHEMA)


def test_json_schema_outputs_validate(engine: HFEngine) -> None:
    requests = [schema_request(f"s{i}", seed=i, prompt=PROMPTS[i % 4]) for i in range(12)]
    outputs = run_batch(engine, requests)
    for output in outputs.values():
        assert_schema_valid(output)
    stopped = [o for o in outputs.values() if o.finish is FinishReason.STOP]
    assert len(stopped) >= 9, [(o.finish, o.text) for o in outputs.values()]
    assert len({o.text for o in stopped}) > 3  # the draws differ; the grammar does not dictate


def test_json_schema_validator_is_not_vacuous() -> None:
    for bad in (
        {"color": "pink", "n": 1, "name": "a", "ok": True},
        {"color": "red", "n": 100, "name": "a", "ok": True},
        {"color": "red", "n": 1, "name": "abcdef", "ok": True},
        {"color": "red", "n": 1, "name": "a"},
        {"color": "red", "n": 1, "name": "a", "ok": True, "more": 1},
    ):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, SCHEMA)


def test_json_object_outputs_are_objects(engine: HFEngine) -> None:
    bias = NO_WHITESPACE
    fmt = OutputFormat("json_object")
    requests = [
        request(
            f"o{i}", temperature=1.0, seed=i, max_new_tokens=40, output_format=fmt, logit_bias=bias
        )
        for i in range(8)
    ]
    outputs = run_batch(engine, requests)
    stopped = [o for o in outputs.values() if o.finish is FinishReason.STOP]
    assert stopped
    for output in outputs.values():
        assert output.finish in (FinishReason.STOP, FinishReason.LENGTH), output.error
        assert output.text.startswith("{")
    for output in stopped:
        assert isinstance(json.loads(output.text), dict)


def test_regex_outputs_fully_match(engine: HFEngine) -> None:
    fmt = OutputFormat("regex", REGEX)
    requests = [
        request(
            f"r{i}", PROMPTS[i % 4], temperature=1.0, seed=i, max_new_tokens=30, output_format=fmt
        )
        for i in range(8)
    ]
    requests.append(request("greedy", max_new_tokens=30, output_format=fmt))
    for output in run_batch(engine, requests).values():
        # every output of this regex is at most 12 characters, so none hits max_new_tokens
        assert output.finish in (FinishReason.STOP, FinishReason.EOS), output.error
        assert re.fullmatch(REGEX, output.text), output.text


def test_lark_outputs_parse(engine: HFEngine) -> None:
    fmt = OutputFormat("lark", LARK)
    requests = [
        request(
            f"l{i}", PROMPTS[i % 4], temperature=1.0, seed=i, max_new_tokens=40, output_format=fmt
        )
        for i in range(8)
    ]
    outputs = run_batch(engine, requests)
    for output in outputs.values():  # at most 13 characters: none hits max_new_tokens
        assert output.finish is FinishReason.STOP, (output.finish, output.text, output.error)
        parse_expr(output.text)
    assert len({o.text for o in outputs.values()}) > 3


def test_mixed_batch_in_one_step_keeps_each_rows_options(
    engine: HFEngine, hf_model: PreTrainedModel
) -> None:
    penalties = {"presence_penalty": 0.5, "frequency_penalty": 1.5}
    requests = [
        schema_request("schema", seed=3),
        request("regex-greedy", max_new_tokens=30, output_format=OutputFormat("regex", REGEX)),
        request(
            "regex",
            PROMPTS[1],
            temperature=1.0,
            seed=4,
            max_new_tokens=30,
            output_format=OutputFormat("regex", REGEX),
        ),
        request(
            "lark",
            PROMPTS[2],
            temperature=1.0,
            seed=5,
            max_new_tokens=40,
            output_format=OutputFormat("lark", LARK),
        ),
        request(
            "object",
            temperature=1.0,
            seed=1,
            max_new_tokens=40,
            logit_bias=NO_WHITESPACE,
            output_format=OutputFormat("json_object"),
        ),
        request("plain-0", PROMPTS[0], max_new_tokens=12),
        request("plain-1", PROMPTS[1], max_new_tokens=12),
        request("plain-2", PROMPTS[2], max_new_tokens=12),
        request("penalized", PROMPTS[1], max_new_tokens=12, **penalties),
        request("sampled", PROMPTS[3], temperature=1.0, seed=9, min_p=0.05, max_new_tokens=12),
        request("biased", PROMPTS[3], max_new_tokens=5, logit_bias=((150, 100.0),)),
    ]
    outputs = run_batch(engine, requests)
    assert_schema_valid(outputs["schema"])
    assert outputs["schema"].finish is FinishReason.STOP
    for name in ("regex-greedy", "regex"):
        assert re.fullmatch(REGEX, outputs[name].text), outputs[name].text
    assert outputs["lark"].finish is FinishReason.STOP
    parse_expr(outputs["lark"].text)
    assert outputs["object"].finish is FinishReason.STOP
    assert isinstance(json.loads(outputs["object"].text), dict)
    # the unconstrained rows are what they are alone: no neighbour's mask or bias leaked
    for i in range(3):
        alone = solo(engine, PROMPTS[i], max_new_tokens=12)
        assert outputs[f"plain-{i}"].tokens == alone.tokens
        assert outputs[f"plain-{i}"].finish is alone.finish
        assert not re.fullmatch(REGEX, outputs[f"plain-{i}"].text)
    prompt = engine.encode(PROMPTS[1])
    assert outputs["penalized"].tokens == hf_penalized_greedy(hf_model, prompt, 12, 0.5, 1.5)
    alone = solo(engine, PROMPTS[3], temperature=1.0, seed=9, min_p=0.05, max_new_tokens=12)
    assert outputs["sampled"].tokens == alone.tokens
    assert outputs["biased"].tokens == [150] * 5
    # and the constrained rows are what they are alone too
    for req in requests[:5]:
        alone = run_batch(engine, [req])[req.seq_id]
        assert outputs[req.seq_id].tokens == alone.tokens, req.seq_id


@pytest.mark.parametrize(
    "fmt",
    [
        OutputFormat("json_schema", "{not json"),
        OutputFormat("json_schema", '{"type": "nonsense"}'),
        OutputFormat("json_schema", '{"type": "string", "minLength": 5, "maxLength": 2}'),
        OutputFormat("json_schema", '{"properties": {"a": {"$ref": "#/nowhere"}}}'),
        OutputFormat("regex", "[a-"),
        OutputFormat("regex", "(ab"),
        OutputFormat("lark", "start: undefined_rule"),
        OutputFormat("lark", "start: ("),
    ],
    ids=lambda f: f"{f.kind}:{f.spec}",
)
def test_bad_formats_are_refused_naming_output_format(engine: HFEngine, fmt: OutputFormat) -> None:
    with pytest.raises(InvalidRequest) as caught:
        engine.check_input([1], SamplingParams(output_format=fmt))
    assert caught.value.field == "output_format"
    assert str(caught.value).startswith(f"output_format: {fmt.kind}:")
    # the same request submitted anyway ends alone; its batch mate runs to its end
    outputs = run_batch(engine, [request("bad", output_format=fmt), request("mate")])
    assert outputs["bad"].finish is FinishReason.ERROR and outputs["bad"].tokens == []
    assert outputs["bad"].error is not None and outputs["bad"].error.startswith("output_format:")
    assert outputs["mate"].finish is FinishReason.LENGTH and len(outputs["mate"].tokens) == 8


def test_good_formats_pass_the_check(engine: HFEngine) -> None:
    for fmt in (
        OutputFormat("json_object"),
        OutputFormat("json_schema", json.dumps(SCHEMA)),
        OutputFormat("regex", REGEX),
        OutputFormat("lark", LARK),
    ):
        engine.check_input([1], SamplingParams(output_format=fmt))


@pytest.mark.parametrize(
    ("field", "params"),
    [
        ("logit_bias", {"logit_bias": ((320, 1.0),)}),
        ("logit_bias", {"logit_bias": ((-1, 1.0),)}),
        ("logit_bias", {"logit_bias": ((5, 1.0), (10**6, -1.0))}),
        ("stop_token_ids", {"stop_token_ids": (320,)}),
        ("stop_token_ids", {"stop_token_ids": (3, -5)}),
        # the bad id is a stop token id; the valid logit_bias must not take the blame.
        pytest.param(
            "stop_token_ids",
            {"logit_bias": ((5, 1.0),), "stop_token_ids": (320,)},
            id="bad-stop-id-beside-a-valid-logit-bias",
        ),
        ("min_p", {"min_p": 1.5}),
        ("presence_penalty", {"presence_penalty": 2.5}),
        ("frequency_penalty", {"frequency_penalty": float("nan")}),
        ("logit_bias", {"logit_bias": ((5, 101.0),)}),
        ("top_logprobs", {"top_logprobs": 21}),
        ("output_format", {"output_format": OutputFormat("yaml")}),
    ],
)
def test_bad_options_end_their_request_alone(
    engine: HFEngine, field: str, params: dict[str, object]
) -> None:
    outputs = run_batch(engine, [request("bad", **params), request("mate")])
    assert outputs["bad"].finish is FinishReason.ERROR and outputs["bad"].tokens == []
    assert outputs["bad"].error is not None
    assert outputs["bad"].error.startswith(f"{field}:"), outputs["bad"].error
    assert outputs["mate"].finish is FinishReason.LENGTH and len(outputs["mate"].tokens) == 8
    assert engine.resources()["sequences"] == 0
