"""Per-request token choice: repetition penalty, temperature, top-k, top-p, seeded sampling.

Safe for every value validation accepts: penalized logits are clamped to the float range,
and the largest logit is subtracted before dividing by the temperature, so no step of the
softmax sees an infinity (a row's logits are checked finite before they get here)."""

from __future__ import annotations

import secrets

import torch

from loraplex.server.engine.api import SamplingParams


class TokenSampler:
    """Chooses one request's tokens; its own generator makes a seeded request reproducible."""

    def __init__(self, params: SamplingParams, device: torch.device) -> None:
        self.params = params
        self.generator = torch.Generator(device=device)
        seed = params.seed if params.seed is not None else secrets.randbits(63)
        self.generator.manual_seed(seed)

    @property
    def plain_greedy(self) -> bool:
        """Whether the token is simply the argmax of the model's logits."""
        return self.params.greedy and self.params.repetition_penalty == 1.0

    def choose(
        self, logits: torch.Tensor, history: torch.Tensor, argmax: int | None = None
    ) -> tuple[int, float | None]:
        """The next token and, when asked for, its log-probability under the model's logits.

        `argmax`: the logits' argmax when the caller computed it for the whole batch at once.
        """
        p = self.params
        if self.plain_greedy and argmax is not None:
            token = argmax
        else:
            token = self._pick(logits.float(), history)
        logprob = float(torch.log_softmax(logits.float(), -1)[token]) if p.logprobs else None
        return token, logprob

    def _pick(self, scores: torch.Tensor, history: torch.Tensor) -> int:
        p = self.params
        if p.repetition_penalty != 1.0 and history.numel():
            scores = apply_repetition_penalty(scores, history, p.repetition_penalty)
        if p.greedy:
            return int(scores.argmax())
        scaled = (scores - scores.max()) / p.temperature
        probs = filtered_probs(scaled, p.top_k, p.top_p)
        return int(torch.multinomial(probs, 1, generator=self.generator))


def apply_repetition_penalty(
    scores: torch.Tensor, history: torch.Tensor, penalty: float
) -> torch.Tensor:
    """CTRL-style, as transformers does it: seen logits > 0 divided, < 0 multiplied."""
    seen = scores.gather(0, history)
    seen = torch.where(seen > 0, seen / penalty, seen * penalty)
    largest = torch.finfo(seen.dtype).max  # a tiny or huge penalty must not make infinities
    return scores.scatter(0, history, seen.clamp(-largest, largest))


def filtered_probs(scores: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Softmax over the tokens kept by top-k, then by top-p (nucleus; the top token always kept)."""
    if top_k > 0 and top_k < scores.numel():
        kth = torch.topk(scores, top_k).values[-1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p < 1.0:
        sorted_scores, order = torch.sort(scores, descending=True)
        cumulative = torch.softmax(sorted_scores, -1).cumsum(-1)
        drop_sorted = cumulative - torch.softmax(sorted_scores, -1) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(0, order, drop_sorted)
        scores = scores.masked_fill(drop, float("-inf"))
    return torch.softmax(scores, -1)
