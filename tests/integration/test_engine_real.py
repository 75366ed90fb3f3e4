"""The real Gemma 3 270M in NF4: a mixed LoRA/rsLoRA/VeRA/base batch against PEFT per request."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from engine_driver import record_grouping, run
from peft_adapters import ADAPTER_CONFIGS, greedy_reference, load_reference, save_adapter
from transformers import AutoModelForCausalLM, AutoTokenizer

from loraplex.adapters.store import AdapterStore
from loraplex.server.engine.api import SamplingParams, SequenceRequest
from loraplex.server.engine.config import EngineConfig
from loraplex.server.engine.hf import HFEngine
from loraplex.server.engine.hf_model import (
    OUTPUT_HEAD_CALIBRATION,
    quantization_kwargs,
    uses_fused_kernel,
)
from loraplex.server.engine.output_head import quantize_output_head

pytestmark = pytest.mark.integration
NEW_TOKENS = 10
# Greedy tokens must match exactly; log-probabilities within this. NF4 multiplies in bf16
# (on CPUs that have it), and torch runs a batch's bf16 matmuls through other kernels than one
# row's: 2e-3 apart on AVX2 CPUs, up to 0.047 on CPUs with AMX-BF16, whose tile kernels round
# otherwise, and 0.115 and 0.164 on two AMD EPYCs with AVX512-BF16 for one token of a VeRA
# row in this 10-row batch (the same with the rows grouped or gathered; VeRA's large weights
# amplify the base's rounding). Every adapter moves the base's log-probabilities by more
# than this (checked).
LOGPROB_TOLERANCE = 0.2


def test_real_nf4_mixed_batch_matches_peft(
    real_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    base = AutoModelForCausalLM.from_pretrained(real_checkpoint)
    for seed, (name, config) in enumerate(ADAPTER_CONFIGS.items()):
        std = 0.3 if name.startswith("vera") else 0.02
        save_adapter(base, config, tmp_path / name, seed=seed, std=std)
    del base
    config = EngineConfig(checkpoint=real_checkpoint, quantization="nf4", max_lora_rank=16)
    engine = HFEngine.from_config(config, AdapterStore([tmp_path]))
    grouped = record_grouping(engine, monkeypatch)
    prompt = engine.encode("The three primary colors are")
    params = SamplingParams(max_new_tokens=NEW_TOKENS, logprobs=True)
    names = [None, *ADAPTER_CONFIGS]
    twice = [(f"{n}-{i}", n) for i in (0, 1) for n in names]  # rows sharing adapters: grouped
    requests = [
        SequenceRequest(seq_id, prompt, params, engine.store.acquire(n) if n else None)
        for seq_id, n in twice
    ]
    results = run(engine, {0: requests})
    assert all(grouped), grouped
    kwargs = quantization_kwargs(config, engine.device)
    fused = uses_fused_kernel(config)  # the reference runs the engine's 4-bit kernel
    references = {}
    for name in names:
        model = load_reference(real_checkpoint, tmp_path / name if name else None, fused, **kwargs)
        references[str(name)] = greedy_reference(model, prompt, NEW_TOKENS)
        del model
    for seq_id, name in twice:
        reference = references[str(name)]
        assert results[seq_id].tokens == reference.tokens, seq_id
        assert results[seq_id].logprobs == pytest.approx(
            reference.logprobs, abs=LOGPROB_TOLERANCE
        ), seq_id
    # The oracle only means something if every adapter moves the base's distribution.
    for name in ADAPTER_CONFIGS:
        base = references["None"].logprobs
        assert references[name].logprobs != pytest.approx(base, abs=LOGPROB_TOLERANCE), name


def test_real_int8_output_head_keeps_the_next_token(real_checkpoint: Path) -> None:
    """Teacher-forced over text other than the calibration text: wherever the full head's top
    token leads clearly, the int8 head picks it too (Gemma's logits have many near ties)."""
    config = EngineConfig(checkpoint=real_checkpoint, quantization="nf4")
    kwargs = quantization_kwargs(config, torch.device("cpu"))
    model = AutoModelForCausalLM.from_pretrained(real_checkpoint, **kwargs).eval()
    tokenizer = AutoTokenizer.from_pretrained(real_checkpoint)
    ids = tokenizer(INT8_HEAD_TEXT, return_tensors="pt").input_ids
    calibration = tokenizer(OUTPUT_HEAD_CALIBRATION, return_tensors="pt").input_ids
    with torch.inference_mode():
        full = model(input_ids=ids).logits[0].float().log_softmax(-1)
        quantize_output_head(model, calibration)
        int8 = model(input_ids=ids).logits[0].float().log_softmax(-1)
    top2 = full.topk(2, dim=-1).values
    clear = top2[:, 0] - top2[:, 1] > CLEAR_LEAD_NATS
    assert clear.sum() >= len(clear) // 2  # the check below covers most positions
    assert torch.equal(full.argmax(-1)[clear], int8.argmax(-1)[clear])
    assert torch.nn.functional.cosine_similarity(full, int8, dim=-1).min() >= 0.999


CLEAR_LEAD_NATS = 0.25
INT8_HEAD_TEXT = (
    "The three primary colors are red, yellow and blue. Mixing red and blue gives purple, "
    "while yellow and blue make green. Painters have used these rules for centuries, and "
    "printers rely on a related set: cyan, magenta, yellow and black."
)
