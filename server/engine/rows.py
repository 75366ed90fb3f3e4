"""What every backend does around its forward passes: refuse requests it cannot serve, and turn
each sequence's row of logits into a token, its text, and the sequence's finish."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass

import torch

from loraplex.server.engine.api import (
    NOT_FINITE_LOGITS,
    FinishReason,
    SamplingParams,
    SequenceRequest,
    TokenEvent,
)
from loraplex.server.engine.grammar import Grammars, Matcher
from loraplex.server.engine.sampling import TokenSampler, argmax_of
from loraplex.server.engine.text import TextStream
from loraplex.server.errors import InvalidRequest

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelInfo:
    """What rows need of the engine's model; a sequence's tokens (prompt and output) fill at
    most max_context positions."""

    max_context: int
    vocab_size: int
    is_eos: Callable[[int], bool]
    decode: Callable[[list[int]], str]
    device: torch.device
    grammars: Grammars | None = None  # None: output formats are refused


def check_request(
    request: SequenceRequest, model: ModelInfo, running: Collection[str], capacity: int
) -> None:
    """Raise InvalidRequest if the engine cannot start `request` beside the `running` ones."""
    request.sampling.validate()
    if request.seq_id in running:
        raise InvalidRequest("seq_id", f"{request.seq_id!r} is already running")
    if len(running) >= capacity:
        raise InvalidRequest("seq_id", f"the batch is full ({capacity} sequences)")
    scale = request.adapter.scale if request.adapter else 1.0
    if not abs(scale) < float("inf"):
        raise InvalidRequest("adapter.scale", f"must be finite, got {scale}")
    check_input(request.prompt_ids, request.sampling, model)


def check_input(prompt_ids: list[int], params: SamplingParams, model: ModelInfo) -> None:
    """What depends on the model: the prompt's length and token ids, the token ids options
    name, the output format (compiled once, then cached)."""
    if not prompt_ids:
        raise InvalidRequest("prompt_ids", "the prompt is empty")
    if len(prompt_ids) >= model.max_context:
        raise InvalidRequest(
            "prompt_ids", f"{len(prompt_ids)} tokens do not fit {model.max_context}"
        )
    for field, ids in (("prompt_ids", prompt_ids),
                       ("logit_bias", [t for t, _ in params.logit_bias]),
                       ("stop_token_ids", params.stop_token_ids)):  # fmt: skip
        if any(not 0 <= t < model.vocab_size for t in ids):
            raise InvalidRequest(field, f"token ids must be in [0, {model.vocab_size})")
    if params.output_format is not None:
        if model.grammars is None:
            raise InvalidRequest("output_format", "this engine does not offer output formats")
        model.grammars.check(params.output_format)


def error_event(seq_id: str, problem: str) -> TokenEvent:
    return TokenEvent(seq_id, None, finish=FinishReason.ERROR, error=problem)


@dataclass
class Row:
    """One running sequence's tokens, token choice, text and finish."""

    request: SequenceRequest
    sampler: TokenSampler
    stream: TextStream
    tokens: list[int]  # the prompt, then each chosen token
    matcher: Matcher | None = None  # where the output stands in its format, if it has one
    finish: FinishReason | None = None
    virtual: int = 0  # a soft prompt's virtual tokens before the prompt, in the cache too

    @classmethod
    def start(cls, request: SequenceRequest, model: ModelInfo, virtual: int = 0) -> Row:
        """A row for a request `check_request` passed."""
        params = request.sampling
        sampler = TokenSampler(params, request.prompt_ids, model.device)
        stream = TextStream(model.decode, params.stop)
        matcher = None
        if params.output_format is not None:
            assert model.grammars is not None  # check_request refuses the format otherwise
            matcher = model.grammars.matcher(params.output_format)
        return cls(request, sampler, stream, list(request.prompt_ids), matcher, virtual=virtual)

    def fail(self, problem: str) -> TokenEvent:
        self.finish = FinishReason.ERROR
        return error_event(self.request.seq_id, problem)

    def advance(self, logits: torch.Tensor, argmax: int | None, model: ModelInfo) -> TokenEvent:
        """Choose the next token from this row of logits and decide whether the sequence ends."""
        try:
            allowed = self.matcher.allowed() if self.matcher else None
            choice = self.sampler.choose(logits, argmax, allowed)
            if self.matcher:
                self.matcher.accept(choice.token)
        except Exception as err:  # one request's sampling must not end its batch mates
            log.exception("sampling failed for %s", self.request.seq_id)
            return self.fail(f"sampling failed: {err}")
        self.tokens.append(choice.token)
        text = self._text(choice.token, model)
        return TokenEvent(
            self.request.seq_id, choice.token, text, choice.logprob, self.finish, choice.top
        )

    def _text(self, token: int, model: ModelInfo) -> str:
        params = self.request.sampling
        if model.is_eos(token) and not params.ignore_eos:
            self.finish = FinishReason.EOS
            return self.stream.flush()
        if token in params.stop_token_ids:
            self.finish = FinishReason.STOP
            return self.stream.flush()
        text = self.stream.push(token)
        if self.stream.stopped:
            self.finish = FinishReason.STOP
            return text
        generated = len(self.tokens) - len(self.request.prompt_ids)
        if self.matcher is not None and self.matcher.finished:  # the format is complete
            self.finish = FinishReason.STOP
        elif generated >= params.max_new_tokens:
            self.finish = FinishReason.LENGTH
        elif len(self.tokens) + self.virtual >= model.max_context:
            self.finish = FinishReason.CONTEXT
        return text + self.stream.flush() if self.finish else text


def advance_all(
    rows: Sequence[Row], logits: torch.Tensor | Sequence[torch.Tensor], model: ModelInfo
) -> list[TokenEvent]:
    """Advance each row by its row of `logits` ([len(rows), vocab]); a row whose logits are not
    finite, or whose sampling fails, ends alone."""
    argmax, finite = peaks(logits)
    return [
        row.advance(scores, best, model) if ok else row.fail(NOT_FINITE_LOGITS)
        for row, scores, best, ok in zip(rows, logits, argmax, finite, strict=True)
    ]


def peaks(logits: torch.Tensor | Sequence[torch.Tensor]) -> tuple[list[int], list[bool]]:
    """Each row's argmax, which greedy rows take, and whether the row is finite: a NaN anywhere
    or a +inf is the row's maximum (-inf logits are harmless)."""
    if isinstance(logits, torch.Tensor) and logits.device.type != "cpu":
        top, index = logits.max(-1)  # one call and one wait for the whole batch
        return index.tolist(), torch.isfinite(top).tolist()
    argmax = [argmax_of(row) for row in logits]
    return argmax, [math.isfinite(row[i]) for row, i in zip(logits, argmax, strict=True)]
