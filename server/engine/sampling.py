"""Per-request token choice on one row of logits, for every backend: repetition penalty, then the
argmax (greedy) or temperature, top-k, top-p and a draw from the request's own generator.

Rows are torch tensors on the engine's device (numpy rows from llama.cpp are viewed, not
copied). Safe for every value validation accepts: penalized logits are clamped to the float
range, and the largest logit is subtracted before dividing by the temperature, so no step of
the softmax sees an infinity (a row's logits are checked finite before they get here)."""

from __future__ import annotations

import secrets
from collections.abc import Sequence

import torch

from loraplex.server.engine.api import SamplingParams

# top-p sorts only this many best tokens unless their mass falls short (a full sort of a 262k
# vocabulary is most of a step's sampling time on the CPU)
NUCLEUS_PREFETCH = 4096


class TokenSampler:
    """Chooses one request's tokens; its own generator makes a seeded request reproducible."""

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

    @property
    def plain_greedy(self) -> bool:
        """Whether the token is simply the argmax of the model's logits."""
        return self.params.greedy and self.params.repetition_penalty == 1.0

    def choose(self, logits: torch.Tensor, argmax: int | None = None) -> tuple[int, float | None]:
        """The next token and, when asked for, its log-probability under the model's logits
        (before penalty, temperature and filters). `argmax`: the row's argmax, when the caller
        has it already."""
        logits = logits.float()
        token = argmax if self.plain_greedy and argmax is not None else self._pick(logits)
        if self._history is not None:
            self._history = torch.cat([self._history, self._history.new_tensor([token])])
        logprob = float(logits[token] - logits.logsumexp(-1)) if self.params.logprobs else None
        return token, logprob

    def _pick(self, logits: torch.Tensor) -> int:
        p = self.params
        scores = logits
        if self._history is not None and self._history.numel():
            scores = apply_repetition_penalty(logits, self._history, p.repetition_penalty)
        if p.greedy:
            return argmax_of(scores)
        ids, probs = distribution(scores, p.temperature, p.top_k, p.top_p)
        pick = draw(probs, self.generator)
        return pick if ids is None else int(ids[pick])


def apply_repetition_penalty(
    scores: torch.Tensor, history: torch.Tensor, penalty: float
) -> torch.Tensor:
    """CTRL-style, as transformers does it: seen logits > 0 divided, < 0 multiplied."""
    seen = scores.gather(0, history)
    seen = torch.where(seen > 0, seen / penalty, seen * penalty)
    largest = torch.finfo(seen.dtype).max  # a tiny or huge penalty must not make infinities
    return scores.scatter(0, history, seen.clamp(-largest, largest))


def distribution(
    scores: torch.Tensor, temperature: float, top_k: int, top_p: float
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """The tokens a draw may pick (None: every token) and their probabilities: the softmax of
    scores / temperature over the top-k (ties with the k-th kept, as in transformers), then
    top-p: the most probable tokens until their mass reaches top_p (the top one always)."""
    ids = top_k_ids(scores, top_k) if 0 < top_k < scores.numel() else None
    kept = scores if ids is None else scores[ids]
    # the largest is subtracted first, so that dividing by a tiny temperature cannot overflow
    probs = torch.softmax((kept - kept.max()) / temperature, -1)
    return ids, probs if top_p >= 1.0 else nucleus(probs, top_p)


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
