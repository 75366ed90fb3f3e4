"""Built-in rewards for GRPO, as TRL calls a reward function: one float per completion.

TRL passes each completion's text, its token ids and the dataset's other columns per
completion. A row's `reference` column (or its `completion` / `chosen`, renamed to `reference`
by grpo.py) is what `exact` compares with; `json` checks a row's `schema` column when the row
has one. Every rule looks at the first line of a completion, as the SFT tasks score it.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any

import jsonschema

RewardFunction = Callable[..., list[float]]


def first_line(text: str) -> str:
    return text.strip().split("\n", 1)[0].strip()


def exact(completions: Sequence[str], reference: Sequence[str], **_: Any) -> list[float]:
    """1 where the first line equals the reference's (stripped), else 0."""
    return [
        float(first_line(text) == first_line(want))
        for text, want in zip(completions, reference, strict=True)
    ]


def json_valid(
    completions: Sequence[str], schema: Sequence[Any] | None = None, **_: Any
) -> list[float]:
    """1 where the first line is JSON (valid against the row's `schema`, if it has one)."""
    schemas = schema if schema is not None else [None] * len(completions)
    pairs = zip(completions, schemas, strict=True)
    return [_json_score(first_line(text), rule) for text, rule in pairs]


def _json_score(text: str, schema: Any) -> float:
    try:
        value = json.loads(text)
    except ValueError:
        return 0.0
    if schema in (None, ""):
        return 1.0
    rule = json.loads(schema) if isinstance(schema, str) else schema
    return float(jsonschema.Draft202012Validator(rule).is_valid(value))


def line_end(end_token_ids: set[int]) -> RewardFunction:
    """1 where the completion stopped by itself after one non-empty line: it ended with EOS
    or went on to a new line (a run cut at the length limit scores 0)."""

    def line(
        completions: Sequence[str], completion_ids: Sequence[Sequence[int]], **_: Any
    ) -> list[float]:
        scores = []
        for text, ids in zip(completions, completion_ids, strict=True):
            stopped = bool(ids) and ids[-1] in end_token_ids
            scores.append(float(bool(first_line(text)) and (stopped or "\n" in text.strip())))
        return scores

    return line


def length(max_words: int) -> RewardFunction:
    """1 for a first line of at most `max_words` words, falling linearly to 0 at twice that."""

    def length(completions: Sequence[str], **_: Any) -> list[float]:
        words = [len(first_line(text).split()) for text in completions]
        return [max(0.0, min(1.0, 2.0 - w / max_words)) for w in words]

    return length
