"""Drive an engine step by step the way a scheduler would, collecting tokens per sequence."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest

from loraplex.server.engine.api import Engine, FinishReason, SequenceRequest, StepPlan
from loraplex.server.engine.hf import HFEngine


@dataclass
class Result:
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    text: str = ""
    finish: FinishReason | None = None
    error: str | None = None


def run(
    engine: Engine,
    arrivals: dict[int, list[SequenceRequest]],
    on_step: Callable[[int], None] | None = None,
    max_steps: int = 500,
) -> dict[str, Result]:
    """arrivals: step number -> requests that join at that step."""
    results: dict[str, Result] = {}
    for step in range(max_steps):
        new = arrivals.get(step, [])
        for request in new:
            results[request.seq_id] = Result()
        for event in engine.step(StepPlan(prefill=new, decode=engine.running())):
            result = results[event.seq_id]
            if event.token_id is not None:
                result.tokens.append(event.token_id)
            if event.logprob is not None:
                result.logprobs.append(event.logprob)
            result.text += event.text
            result.finish, result.error = event.finish, event.error
        if on_step:
            on_step(step)
        if not engine.running() and step >= max(arrivals, default=0):
            return results
    raise AssertionError("sequences did not finish")


def record_grouping(engine: HFEngine, monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """Per adapter-routed forward from now on: whether its LoRA rows were grouped by adapter
    (True) or gathered per row."""
    grouped: list[bool] = []
    route = engine.routing.set

    def recording(*args: Any, **kwargs: Any) -> None:
        route(*args, **kwargs)
        if engine.routing.current is not None:
            grouped.append(engine.routing.current.groups is not None)

    monkeypatch.setattr(engine.routing, "set", recording)
    return grouped
