"""Comparing a batched run with its solo twin when the two may round differently."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def assert_equal_until_a_near_tie(
    ours: Sequence[int],
    our_logprobs: Sequence[float],
    alone: Sequence[int],
    alone_logprobs: Sequence[float],
    drift: float,
) -> None:
    """Equal tokens with logprobs within `drift`; the runs may part only where the chosen
    tokens' logprobs were within `drift` of each other (each run took its own argmax of a
    near tie there). The first token must agree: prompts prefill as in a solo run."""
    assert len(our_logprobs) == len(ours) and len(alone_logprobs) == len(alone)
    n = min(len(ours), len(alone))
    same = next((i for i in range(n) if ours[i] != alone[i]), n)
    np.testing.assert_allclose(our_logprobs[:same], alone_logprobs[:same], atol=drift)
    if same < n:
        assert abs(our_logprobs[same] - alone_logprobs[same]) < drift, f"parted at token {same}"
    else:
        assert len(ours) == len(alone), "one run stopped early without a parting token"
    assert same >= 1, "the first tokens differ"
