"""The int8 output head against the model's own full-precision lm_head (the oracle)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

from loraplex.adapters.store import AdapterStore
from loraplex.server.engine.api import SamplingParams, SequenceRequest, StepPlan
from loraplex.server.engine.config import EngineConfig
from loraplex.server.engine.hf import HFEngine
from loraplex.server.engine.output_head import (
    OutputHeadError,
    SplitInt8Head,
    int8_head_pays,
    int8_head_possible,
    quantize_output_head,
)

MIN_COSINE = 0.999  # per-row logits; int8 per-channel weights, per-call activation scale


def row_cosines(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return nn.functional.cosine_similarity(a.flatten(0, -2), b.flatten(0, -2), dim=-1)


def test_int8_head_logits_follow_the_full_head(tiny_checkpoint: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoint).eval()
    ids = torch.randint(
        4, model.config.vocab_size, (3, 9), generator=torch.Generator().manual_seed(0)
    )
    with torch.inference_mode():
        full = model(input_ids=ids).logits
        quantize_output_head(model, ids[:1])
        int8 = model(input_ids=ids).logits
    assert int8.shape == full.shape and int8.dtype == full.dtype
    assert row_cosines(int8, full).min() >= MIN_COSINE
    assert not torch.equal(int8, full)  # the head really was replaced


def test_engine_with_int8_head_generates_near_the_full_head(tiny_checkpoint: Path) -> None:
    results = {}
    for head in ("full", "int8"):
        config = EngineConfig(checkpoint=tiny_checkpoint, quantization="fp32", output_head=head)
        engine = HFEngine.from_config(config, AdapterStore([]))
        params = SamplingParams(max_new_tokens=1, logprobs=True)
        request = SequenceRequest("r", engine.encode("The capital of France"), params)
        (event,) = engine.step(StepPlan(prefill=[request]))
        assert event.error is None and event.logprob is not None
        results[head] = event.logprob
    # Near ties may pick another token, but its log-probability is then nearly the same.
    assert results["int8"] == pytest.approx(results["full"], abs=0.05)


def test_int8_head_refuses_other_devices_and_heads() -> None:
    model = nn.Module()
    with torch.device("meta"):
        model.lm_head = nn.Linear(8, 16, bias=False)
    ids = torch.zeros(1, 3, dtype=torch.long)
    with pytest.raises(OutputHeadError, match="CPU only"):
        quantize_output_head(model, ids)
    model.lm_head = nn.Identity()
    with pytest.raises(OutputHeadError, match=r"nn\.Linear"):
        quantize_output_head(model, ids)


def test_int8_head_calibration_leaves_a_merging_nf4_base_layout_alone(
    tiny_checkpoint: Path,
) -> None:
    """Calibrating through bitsandbytes' own forward would repack the 4-bit weights in place on
    AVX512-BF16 CPUs (its fused kernel's layout), and merged mode cannot merge into that
    layout. The codes must stay byte for byte those of a full-head engine."""
    codes = {}
    for head in ("full", "int8"):
        config = EngineConfig(checkpoint=tiny_checkpoint, quantization="nf4", output_head=head,
                              adapter_mode="merged")  # fmt: skip
        engine = HFEngine.from_config(config, AdapterStore([]))
        weights = {name: layer.base_layer.weight for name, layer in engine.base.layers.items()}
        assert not any(getattr(w.quant_state, "packing_format_for_cpu", False)
                       for w in weights.values())  # fmt: skip
        codes[head] = {name: w.data.clone() for name, w in weights.items()}
    assert codes["int8"].keys() == codes["full"].keys()
    for name, data in codes["full"].items():
        assert torch.equal(codes["int8"][name], data), name


@pytest.mark.parametrize("pays", [True, False])
def test_auto_head_installs_int8_exactly_when_it_times_faster(
    tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch, pays: bool
) -> None:
    from loraplex.server.engine import hf_model

    asked: list[tuple[type, type, int]] = []

    def timed(full: nn.Module, int8: nn.Module, rows: int) -> bool:
        asked.append((type(full), type(int8), rows))
        return pays

    monkeypatch.setattr(hf_model, "int8_head_pays", timed)
    config = EngineConfig(
        checkpoint=tiny_checkpoint, quantization="fp32", output_head="auto", max_batch_size=12
    )
    engine = HFEngine.from_config(config, AdapterStore([]))
    assert asked == [(nn.Linear, SplitInt8Head, 12)]  # the two heads, at a full batch
    assert isinstance(engine.base.model.lm_head, SplitInt8Head) is pays


def test_int8_head_timing_leaves_the_heads_as_they_were(tiny_checkpoint: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoint).eval()
    assert int8_head_possible(model)
    full, weight = model.lm_head, model.lm_head.weight.clone()
    int8 = SplitInt8Head(weight, torch.arange(2))
    assert isinstance(int8_head_pays(full, int8, 16), bool)
    assert model.lm_head is full and torch.equal(full.weight, weight)
    model.lm_head = nn.Identity()
    assert not int8_head_possible(model)
