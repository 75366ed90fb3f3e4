"""Per-sequence token choice on a row of logits, in numpy.

Order: repetition penalty (HF rule: divide positive logits, multiply negative ones, over every
token already in the prompt or output), then greedy argmax when temperature is 0; otherwise
temperature, top-k, top-p, and a draw from the sequence's own seeded generator. The logprob
reported is that of the chosen token under the distribution it was chosen from (for greedy, the
penalized logits' softmax).

Safe for every value validation accepts: penalized logits are clamped to float32's range, and
the temperature divides logits only after the largest is subtracted, in float64.
"""

from __future__ import annotations

import numpy as np

from loraplex.server.engine.api import SamplingParams

# top-p first looks among this many best tokens; a full sort of a 262k vocabulary costs ~15 ms
_NUCLEUS_PREFETCH = 4096
_FLOAT32_MAX = float(np.finfo(np.float32).max)


class TokenSampler:
    """Chooses the next token of one sequence; remembers the tokens it has seen."""

    def __init__(self, params: SamplingParams, prompt_ids: list[int], vocab_size: int) -> None:
        self.params = params
        self._rng = np.random.default_rng(params.seed)
        self._seen = np.zeros(vocab_size, dtype=bool)
        self._seen[np.asarray(prompt_ids, dtype=np.int64)] = True

    def choose(self, logits: np.ndarray) -> tuple[int, float | None]:
        """The next token id and, if asked for, its logprob; `logits` is not modified."""
        scores = self._penalized(logits)
        if self.params.greedy:
            token = int(np.argmax(scores))
            logprob = _log_softmax_at(scores, token) if self.params.logprobs else None
        else:
            token, logprob = self._draw(scores)
        self._seen[token] = True
        return token, logprob

    def _penalized(self, logits: np.ndarray) -> np.ndarray:
        penalty = self.params.repetition_penalty
        if penalty == 1.0:
            return logits
        scores = logits.astype(np.float32, copy=True)
        seen = scores[self._seen].astype(np.float64)
        penalized = np.where(seen > 0, seen / penalty, seen * penalty)
        scores[self._seen] = np.clip(penalized, -_FLOAT32_MAX, _FLOAT32_MAX)
        return scores

    def distribution(self, logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The token ids a temperature > 0 draw can pick, and their probabilities."""
        p = self.params
        return _filtered(self._penalized(logits), p.temperature, p.top_k, p.top_p)

    def _draw(self, scores: np.ndarray) -> tuple[int, float | None]:
        p = self.params
        ids, probs = _filtered(scores, p.temperature, p.top_k, p.top_p)
        pick = int(self._rng.choice(len(ids), p=probs))
        logprob = float(np.log(probs[pick])) if self.params.logprobs else None
        return int(ids[pick]), logprob


def _filtered(
    scores: np.ndarray, temperature: float, top_k: int, top_p: float
) -> tuple[np.ndarray, np.ndarray]:
    ids = _top_k_ids(scores, top_k)  # the temperature does not change the order
    kept = scores[ids].astype(np.float64)
    probs = np.exp((kept - kept.max()) / temperature)
    probs /= probs.sum()
    if top_p < 1.0:
        ids, probs = _nucleus(ids, probs, top_p)
    return ids, probs


def _top_k_ids(scores: np.ndarray, top_k: int) -> np.ndarray:
    if top_k == 0 or top_k >= scores.shape[0]:
        return np.arange(scores.shape[0])
    return np.argpartition(scores, -top_k)[-top_k:]


def _nucleus(ids: np.ndarray, probs: np.ndarray, top_p: float) -> tuple[np.ndarray, np.ndarray]:
    """The smallest highest-probability set whose mass reaches top_p, renormalized."""
    order = _descending(probs)
    cumulative = np.cumsum(probs[order])
    if cumulative[-1] < top_p:  # the prefetched head was too small: sort everything
        order = np.argsort(-probs, kind="stable")
        cumulative = np.cumsum(probs[order])
    cut = min(int(np.searchsorted(cumulative, top_p)), len(order) - 1)
    keep = order[: cut + 1]
    kept = probs[keep]
    return ids[keep], kept / kept.sum()


def _descending(probs: np.ndarray) -> np.ndarray:
    """Indices of the best probabilities, best first: all of them, or a prefetched head."""
    if probs.shape[0] <= _NUCLEUS_PREFETCH:
        return np.argsort(-probs, kind="stable")
    head = np.argpartition(probs, -_NUCLEUS_PREFETCH)[-_NUCLEUS_PREFETCH:]
    return head[np.argsort(-probs[head], kind="stable")]


def _log_softmax_at(scores: np.ndarray, token: int) -> float:
    shifted = scores.astype(np.float64) - float(scores.max())
    return float(shifted[token] - np.log(np.exp(shifted).sum()))
