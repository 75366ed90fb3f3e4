"""Weight-first CPU matmuls (cpu_matmul.py) against torch's own linear, and an engine that
computes weight-first against one that does not."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from engine_driver import run
from torch import nn
from torch.nn import functional as F
from transformers import AutoTokenizer

from loraplex.adapters.store import AdapterStore
from loraplex.server.engine import cpu_matmul, nf4
from loraplex.server.engine.api import SamplingParams, SequenceRequest
from loraplex.server.engine.config import EngineConfig
from loraplex.server.engine.cpu_matmul import WeightFirstLinear, faster_output_head, weight_first
from loraplex.server.engine.hf import HFEngine


@pytest.mark.parametrize("shape", [(7, 48), (3, 5, 48), (2, 1, 48)])
def test_weight_first_equals_linear(shape: tuple[int, ...]) -> None:
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(40, 48, generator=generator)
    x = torch.randn(shape, generator=generator)
    torch.testing.assert_close(weight_first(x, weight), F.linear(x, weight))


def test_weight_first_head_shares_the_weight_and_refuses_a_bias() -> None:
    head = nn.Linear(16, 32, bias=False)
    wrapped = WeightFirstLinear(head)
    assert wrapped.weight is head.weight
    x = torch.randn(4, 1, 16)
    torch.testing.assert_close(wrapped(x), head(x))
    with pytest.raises(ValueError, match="bias-free"):
        WeightFirstLinear(nn.Linear(16, 32, bias=True))


@pytest.mark.parametrize("pays", [True, False])
def test_output_head_is_wrapped_only_where_weight_first_pays(
    pays: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cpu_matmul, "weight_first_pays", lambda: pays)
    model = nn.Module()
    model.lm_head = nn.Linear(16, 32, bias=False)
    assert faster_output_head(model) is pays
    assert isinstance(model.lm_head, WeightFirstLinear) is pays


def _greedy(checkpoint: Path, root: Path, pays: bool, monkeypatch: pytest.MonkeyPatch) -> list:
    monkeypatch.setattr(cpu_matmul, "weight_first_pays", lambda: pays)
    monkeypatch.setattr(nf4, "weight_first_pays", lambda: pays)
    config = EngineConfig(checkpoint=checkpoint, quantization="nf4", max_lora_rank=16)
    engine = HFEngine.from_config(config, AdapterStore([root]))
    assert isinstance(engine.base.model.lm_head, WeightFirstLinear) is pays
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    params = SamplingParams(max_new_tokens=6, logprobs=True)
    names = [None, *sorted(p.name for p in root.iterdir())]
    requests = [
        SequenceRequest(f"r{i}", tokenizer.encode(f"Row {i} says"), params,
                        engine.store.acquire(name) if name else None)
        for i, name in enumerate(names)
    ]  # fmt: skip
    results = run(engine, {0: requests})
    return [(r.tokens, r.logprobs) for _, r in sorted(results.items())]


def test_an_nf4_engine_computes_the_same_either_way(
    tiny_checkpoints: dict[str, Path],
    tiny_adapter_roots: dict[str, Path],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    checkpoint, root = tiny_checkpoints["gemma3"], tiny_adapter_roots["gemma3"]
    flipped = _greedy(checkpoint, root, True, monkeypatch)
    usual = _greedy(checkpoint, root, False, monkeypatch)
    for (tokens, logprobs), (want_tokens, want_logprobs) in zip(flipped, usual, strict=True):
        assert tokens == want_tokens
        assert logprobs == pytest.approx(want_logprobs, abs=1e-4)
