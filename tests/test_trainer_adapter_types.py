"""`train-adapter --adapter-type dora|prompt`: a few SFT steps on a tiny model give a DoRA
adapter and a soft prompt that PEFT reloads, that training changed, and that the engine serves
as PEFT's forward computes them."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from engine_driver import run
from peft import PeftModel, get_peft_model, get_peft_model_state_dict
from safetensors.torch import load_file
from test_engine_soft_prompt import forward_reference
from test_trainer import base_model, logits, make_config

from loraplex.adapters.trainer import train
from loraplex.adapters.trainer.config import TrainConfig
from loraplex.adapters.trainer.peft_setup import adapter_config
from loraplex.server.engine.api import SamplingParams, SequenceRequest
from loraplex.server.engine.config import EngineConfig
from loraplex.server.engine.hf import HFEngine

SAVED_KEYS = {
    "dora": ("lora_A", "lora_B", "lora_magnitude_vector"),
    "prompt": ("prompt_embeddings",),
}


@pytest.mark.parametrize("adapter_type", ["dora", "prompt"])
def test_trains_and_serves_as_peft_computes_it(
    tiny_checkpoints: dict[str, Path], tmp_path: Path, adapter_type: str
) -> None:
    checkpoint = tiny_checkpoints["llama"]
    config = make_config(checkpoint, tmp_path / adapter_type, tmp_path / "cache",
                         adapter_type=adapter_type, virtual_tokens=6)  # fmt: skip
    result = train.run(config)
    saved = load_file(str(result.adapter_dir / "adapter_model.safetensors"))
    for key in SAVED_KEYS[adapter_type]:
        assert any(key in name for name in saved), key
    torch.manual_seed(config.seed)  # the adapter as training started it
    initial = get_peft_model_state_dict(
        get_peft_model(base_model(checkpoint), adapter_config(config))
    )
    assert any(not torch.equal(initial[k].float(), saved[k].float()) for k in initial)
    reloaded = PeftModel.from_pretrained(base_model(checkpoint), result.adapter_dir).eval()
    last = logits(reloaded)[:, -1]  # a soft prompt's logits also cover its virtual tokens
    assert not last.allclose(logits(base_model(checkpoint))[:, -1], atol=1e-4)

    engine = HFEngine.from_config(EngineConfig(
        checkpoint=checkpoint, quantization="fp32", adapter_roots=[result.adapter_dir.parent]
    ))  # fmt: skip
    prompt = engine.encode("Record: Ana Silva (41) works as a pilot in Lisbon.\nJSON:")
    ref = engine.store.acquire(result.adapter_dir.name)
    served = run(engine, {0: [SequenceRequest("r", prompt, SamplingParams(max_new_tokens=8),
                                              ref)]})["r"]  # fmt: skip
    reference = forward_reference(reloaded, prompt, served.tokens)
    assert served.tokens == reference.tokens


def test_soft_prompts_train_with_sft_only(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="sft only"):
        TrainConfig(data=tmp_path / "x.jsonl", adapter_type="prompt", method="dpo")
