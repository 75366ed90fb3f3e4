"""Per-request token choice on one row of logits, for every backend: logit bias, penalties and
the output format's mask, then the argmax (greedy) or temperature, top-k, top-p, min-p and a
draw from the request's own generator.

Rows are torch tensors on the engine's device (numpy rows from llama.cpp are viewed, not
copied). Safe for every value validation accepts: penalized logits are clamped to the float
range, and the largest logit is subtracted before dividing by the temperature, so no step of
the softmax sees an infinity (a row's logits are checked finite before they get here)."""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from typing import NamedTuple

import torch

from loraplex.server.engine.api import SamplingParams
from loraplex.server.engine.grammar import apply_bitmask

# top-p sorts only this many best tokens unless their mass falls short (a full sort of a 262k
# vocabulary is most of a step's sampling time on the CPU)
NUCLEUS_PREFETCH = 4096


class Choice(NamedTuple):
    token: int
    logprob: float | None  # under the model's logits, when the request asked for logprobs
    top: list[tuple[int, float]] | None  # the top_logprobs most probable (token, logprob)


class TokenSampler:
    """Chooses one request's tokens; its own generator makes a seeded request reproducible.

    Scores are the model's logits with, in order, the logit bias added, the repetition,
    presence and frequency penalties applied and the output format's disallowed tokens set
    to -inf; then the argmax, or temperature, top-k, top-p and min-p (transformers' order)
    and a draw. Log-probabilities are always the model's own, before any of this."""

    def __init__(
        self, params: SamplingParams, prompt_ids: Sequence[int], device: torch.device
    ) -> None:
        self.params = params
        self.generator = torch.Generator(device=device)
        seed = params.seed if params.seed is not None else secrets.randbits(63)
        self.generator.manual_seed(seed)
        self._history: torch.Tensor | None = None  # every token so far, kept for the penalty only
        if params.repetition_penalty != 1.0:
            self._history = torch.tensor(list(prompt_ids), dtype=torch.long, device=device)
        self._output: list[int] = []  # the chosen tokens, for presence and frequency penalties
        self._bias: tuple[torch.Tensor, torch.Tensor] | None = None
        if params.logit_bias:
            ids, values = zip(*params.logit_bias, strict=True)
            self._bias = (torch.tensor(ids, device=device), torch.tensor(values, device=device))

    @property
    def plain_greedy(self) -> bool:
        """Whether the token is simply the argmax of the model's logits."""
        return self.params.greedy and self._bias is None and not self._penalized

    @property
    def _penalized(self) -> bool:
        p = self.params
        return p.repetition_penalty != 1.0 or p.presence_penalty != 0 or p.frequency_penalty != 0

    def choose(
        self, logits: torch.Tensor, argmax: int | None = None, allowed: torch.Tensor | None = None
    ) -> Choice:
        """The next token from one row of logits. `argmax`: the row's argmax, when the caller
        has it already; `allowed`: the output format's bitmask (grammar.apply_bitmask)."""
        logits = logits.float()
        if self.plain_greedy and argmax is not None and allowed is None:
            token = argmax
        else:
            token = self._pick(self.scores(logits, allowed))
        if self._history is not None:
            self._history = torch.cat([self._history, self._history.new_tensor([token])])
        self._output.append(token)
        return Choice(token, *self._logprobs(logits, token))

    def scores(self, logits: torch.Tensor, allowed: torch.Tensor | None = None) -> torch.Tensor:
        """The logits the choice is made from (see the class)."""
        p = self.params
        scores = logits
        if self._bias is not None:
            scores = scores.index_add(0, self._bias[0], self._bias[1])
        if self._history is not None and self._history.numel():
            scores = apply_repetition_penalty(scores, self._history, p.repetition_penalty)
        if self._output and (p.presence_penalty != 0 or p.frequency_penalty != 0):
            scores = apply_output_penalties(
                scores, self._output, p.presence_penalty, p.frequency_penalty
            )
        if allowed is not None:
            scores = apply_bitmask(scores, allowed)
            if not bool(torch.isfinite(scores).any()):
                raise RuntimeError("the output format allows no token here")
        return scores

    def _pick(self, scores: torch.Tensor) -> int:
        p = self.params
        if p.greedy:
            return argmax_of(scores)
        ids, probs = distribution(scores, p.temperature, p.top_k, p.top_p, p.min_p)
        pick = draw(probs, self.generator)
        return pick if ids is None else int(ids[pick])

    def _logprobs(
        self, logits: torch.Tensor, token: int
    ) -> tuple[float | None, list[tuple[int, float]] | None]:
        p = self.params
        if not p.logprobs and not p.top_logprobs:
            return None, None
        total = logits.logsumexp(-1)
        logprob = float(logits[token] - total) if p.logprobs else None
        if not p.top_logprobs:
            return logprob, None
        ids = largest(logits, p.top_logprobs)
        values, order = logits[ids].sort(descending=True, stable=True)
        top = [(int(i), float(v - total)) for i, v in zip(ids[order], values, strict=True)]
        return logprob, top


def apply_output_penalties(
    scores: torch.Tensor, output: list[int], presence: float, frequency: float
) -> torch.Tensor:
    """OpenAI's rule: each token the output holds loses `presence` once and `frequency` per
    occurrence."""
    ids, counts = torch.tensor(output, device=scores.device).unique(return_counts=True)
    return scores.index_add(0, ids, -(presence + frequency * counts.to(scores.dtype)))


def apply_repetition_penalty(
    scores: torch.Tensor, history: torch.Tensor, penalty: float
) -> torch.Tensor:
    """CTRL-style, as transformers does it: seen logits > 0 divided, < 0 multiplied."""
    seen = scores.gather(0, history)
    seen = torch.where(seen > 0, seen / penalty, seen * penalty)
    largest = torch.finfo(seen.dtype).max  # a tiny or huge penalty must not make infinities
    return scores.scatter(0, history, seen.clamp(-largest, largest))


def distribution(
    scores: torch.Tensor, temperature: float, top_k: int, top_p: float, min_p: float = 0.0
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """The tokens a draw may pick (None: every token) and their probabilities (not always
    normalized): the softmax of scores / temperature over the top-k (ties with the k-th
    kept, as in transformers), then top-p: the most probable tokens until their mass reaches
    top_p (the top one always), then min-p: those at least min_p times the top one's."""
    ids = top_k_ids(scores, top_k) if 0 < top_k < scores.numel() else None
    kept = scores if ids is None else scores[ids]
    # the largest is subtracted first, so that dividing by a tiny temperature cannot overflow
    probs = torch.softmax((kept - kept.max()) / temperature, -1)
    if top_p < 1.0:
        probs = nucleus(probs, top_p)
    if min_p > 0.0:
        probs = torch.where(probs >= min_p * probs.max(), probs, 0.0)
    return ids, probs


def top_k_ids(scores: torch.Tensor, k: int) -> torch.Tensor:
    """The k largest scores' indices, and those of any score tied with the k-th."""
    ids = largest(scores, k + 1)
    values, order = scores[ids].sort(descending=True)
    if values[k] < values[k - 1]:  # no tie across the cut, as is usual
        return ids[order[:k]]
    return (scores >= values[k - 1]).nonzero()[:, 0]


def nucleus(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """`probs` with the tokens past the top-p mass set to zero."""
    order = largest(probs, min(NUCLEUS_PREFETCH, probs.numel()))
    best = probs[order].sort(descending=True)
    order, top = order[best.indices], best.values
    if order.numel() < probs.numel() and float(top.sum()) < top_p:  # a flat distribution
        top, order = probs.sort(descending=True)
    kept = torch.where(top.cumsum(-1) - top < top_p, top, 0.0)
    return torch.zeros_like(probs).scatter(0, order, kept)


def draw(probs: torch.Tensor, generator: torch.Generator) -> int:
    """A token drawn from `probs` (not necessarily normalized) by inverting their CDF: one pass,
    where torch.multinomial over a large vocabulary costs several on the CPU. Summed in float64
    so that small probabilities keep their share."""
    cumulative = probs.double().cumsum(-1)
    total = cumulative[-1]
    u = torch.rand(1, generator=generator, device=probs.device, dtype=torch.float64) * total
    u = torch.minimum(u, torch.nextafter(total, total.new_zeros(())))  # rounding must not reach it
    return int(torch.searchsorted(cumulative, u, right=True))


def largest(values: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest values, in no particular order."""
    if values.device.type == "cpu":  # numpy's partition is several times faster than topk
        return torch.from_numpy(values.numpy().argpartition(-k)[-k:])
    return torch.topk(values, k, sorted=False).indices


def argmax_of(scores: torch.Tensor) -> int:
    """The first index of the largest value."""
    if scores.device.type == "cpu":  # numpy's argmax is several times faster than torch's
        return int(scores.numpy().argmax())
    return int(scores.argmax())
