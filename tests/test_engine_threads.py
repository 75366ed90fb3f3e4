"""The hf engine's CPU threads: decode forwards on decode_threads, prefills on threads."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from engine_driver import run

from loraplex.adapters.store import AdapterStore
from loraplex.server.engine.api import SamplingParams, SequenceRequest
from loraplex.server.engine.config import EngineConfig
from loraplex.server.engine.hf import HFEngine


@pytest.fixture(autouse=True)
def keep_torch_threads() -> Iterator[None]:
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def threads_per_forward(engine: HFEngine) -> list[tuple[str, int]]:
    """('decode' or 'prefill', torch threads) for each forward from now on."""
    seen: list[tuple[str, int]] = []

    def record(_module: torch.nn.Module, _args: Any, kwargs: dict[str, Any]) -> None:
        kind = "decode" if kwargs["input_ids"].shape[1] == 1 else "prefill"
        seen.append((kind, torch.get_num_threads()))

    engine.model.register_forward_pre_hook(record, with_kwargs=True)
    return seen


def two_overlapping_requests(engine: HFEngine) -> None:
    """The second joins while the first decodes: one step runs both kinds of forward."""
    prompt = engine.encode("The quick brown fox")
    params = SamplingParams(max_new_tokens=4)
    run(
        engine,
        {0: [SequenceRequest("a", prompt, params)], 1: [SequenceRequest("b", prompt, params)]},
    )


def test_decode_and_prefill_forwards_run_on_their_own_thread_counts(
    tiny_checkpoints: dict[str, Path], tmp_path: Path
) -> None:
    config = EngineConfig(
        checkpoint=tiny_checkpoints["gemma3"], quantization="fp32", threads=3, decode_threads=2
    )
    engine = HFEngine.from_config(config, AdapterStore([tmp_path]))
    seen = threads_per_forward(engine)
    torch.set_num_threads(1)  # whatever the process had set before a step comes back after it
    two_overlapping_requests(engine)
    assert sorted(set(seen)) == [("decode", 2), ("prefill", 3)]
    assert [kind for kind, _ in seen].count("prefill") == 2
    assert torch.get_num_threads() == 1


def test_decode_uses_the_prefill_threads_by_default(
    tiny_checkpoints: dict[str, Path], tmp_path: Path
) -> None:
    config = EngineConfig(checkpoint=tiny_checkpoints["gemma3"], quantization="fp32")
    engine = HFEngine.from_config(config, AdapterStore([tmp_path]))
    seen = threads_per_forward(engine)
    torch.set_num_threads(3)
    two_overlapping_requests(engine)
    torch.set_num_threads(1)
    two_overlapping_requests(engine)
    assert sorted(set(seen)) == [("decode", 1), ("decode", 3), ("prefill", 1), ("prefill", 3)]
