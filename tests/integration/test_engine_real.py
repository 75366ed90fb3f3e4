"""The real Gemma 3 270M in NF4: a mixed LoRA/rsLoRA/VeRA/base batch against PEFT per request."""

from __future__ import annotations

from pathlib import Path

import pytest
from engine_driver import run
from peft_adapters import ADAPTER_CONFIGS, greedy_reference, load_reference, save_adapter
from transformers import AutoModelForCausalLM

from loraplex.adapters.store import AdapterStore
from loraplex.server.engine.api import SamplingParams, SequenceRequest
from loraplex.server.engine.config import EngineConfig
from loraplex.server.engine.hf import HFEngine
from loraplex.server.engine.hf_model import quantization_kwargs

pytestmark = pytest.mark.integration
NEW_TOKENS = 10
# Greedy tokens must match exactly; log-probabilities within this (NF4 kernels, batch padding).
LOGPROB_TOLERANCE = 2e-3


def test_real_nf4_mixed_batch_matches_peft(real_checkpoint: Path, tmp_path: Path) -> None:
    base = AutoModelForCausalLM.from_pretrained(real_checkpoint)
    for seed, (name, config) in enumerate(ADAPTER_CONFIGS.items()):
        std = 0.3 if name.startswith("vera") else 0.02
        save_adapter(base, config, tmp_path / name, seed=seed, std=std)
    del base
    config = EngineConfig(checkpoint=real_checkpoint, quantization="nf4", max_lora_rank=16)
    engine = HFEngine.from_config(config, AdapterStore([tmp_path]))
    prompt = engine.encode("The three primary colors are")
    params = SamplingParams(max_new_tokens=NEW_TOKENS, logprobs=True)
    names = [None, *ADAPTER_CONFIGS]
    requests = [
        SequenceRequest(str(n), prompt, params, engine.store.acquire(n) if n else None)
        for n in names
    ]
    results = run(engine, {0: requests})
    kwargs = quantization_kwargs(config, engine.device)
    references = {}
    for name in names:
        model = load_reference(real_checkpoint, tmp_path / name if name else None, **kwargs)
        references[str(name)] = greedy_reference(model, prompt, NEW_TOKENS)
        del model
    for seq_id, reference in references.items():
        assert results[seq_id].tokens == reference.tokens, seq_id
        assert results[seq_id].logprobs == pytest.approx(
            reference.logprobs, abs=LOGPROB_TOLERANCE
        ), seq_id
    # The oracle only means something if every adapter moves the base's distribution.
    for name in ADAPTER_CONFIGS:
        assert references[name].logprobs != pytest.approx(references["None"].logprobs, abs=1e-2)
