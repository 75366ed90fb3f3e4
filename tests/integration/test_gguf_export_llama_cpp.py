"""The exported GGUF-LoRA changes llama.cpp's logits the way the PEFT adapter changes the
transformers model's logits, on the real default base (Q4_K_M GGUF vs its fp32 conversion).

The two bases differ by 4-bit quantization, so the adapters' effects are compared by the
cosine similarity of the logit deltas (adapter minus base) at every position, not exactly.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from peft import LoraConfig, PeftModel, VeraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from loraplex.adapters.gguf_export import export_gguf
from loraplex.bench.plain_llama import plain_llama
from loraplex.server.models import ModelSource

pytestmark = [pytest.mark.integration, pytest.mark.gguf]
PROMPT = "Record: Lars Berg is 77 years old, lives in Cairo and works as a chemist.\nJSON:"
# Per-position cosine of the logit deltas. The adapters are sized so that their effect is
# well above the numerical noise llama.cpp shows between runs with and without an adapter
# (about 0.5 cosine for a tiny adapter, and more on AVX-512 CPUs than on AVX2 ones: at half
# the LoRA sizes below, one position measured 0.75 there).
MIN_DELTA_COSINE = 0.85
MIN_MEAN_DELTA_COSINE = 0.95
# Random init sizes giving a logit change of similar size for each adapter kind.
INIT_STD = {"lora": 0.06, "rslora": 0.02, "vera": 1.0}


def adapter_for(checkpoint: Path, kind: str, out: Path) -> PeftModel:
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    if kind == "vera":
        config: LoraConfig | VeraConfig = VeraConfig(r=8, target_modules="all-linear")
    else:
        config = LoraConfig(
            r=8,
            lora_alpha=16,
            use_rslora=kind == "rslora",
            target_modules="all-linear",
            init_lora_weights=False,
        )
    model = get_peft_model(base, config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name or "vera_lambda_b" in name:
                param.normal_(0.0, INIT_STD[kind])
    model.save_pretrained(out)
    return model


def peft_logits(model: PeftModel, tokens: list[int]) -> tuple[np.ndarray, np.ndarray]:
    ids = torch.tensor([tokens])
    with torch.no_grad():
        adapted = model(input_ids=ids).logits[0].numpy()
        with model.disable_adapter():
            base = model(input_ids=ids).logits[0].numpy()
    return adapted, base


def llama_logits(gguf_file: Path, tokens: list[int], lora: Path | None) -> np.ndarray:
    kwargs = {"lora_path": str(lora)} if lora else {}
    llm = plain_llama(
        str(gguf_file), n_ctx=128, n_threads=2, logits_all=True, verbose=False, **kwargs
    )
    llm.eval(tokens)
    return np.array(llm.scores[: len(tokens)], dtype=np.float64)


def cosine_rows(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    return (x * y).sum(-1) / (np.linalg.norm(x, axis=-1) * np.linalg.norm(y, axis=-1))


@pytest.mark.parametrize("kind", ["lora", "rslora", "vera"])
def test_llama_cpp_applies_the_exported_adapter_like_peft(
    real_model: ModelSource, real_checkpoint: Path, tmp_path: Path, kind: str
) -> None:
    from llama_cpp import Llama

    model = adapter_for(real_checkpoint, kind, tmp_path / kind)
    out = export_gguf(tmp_path / kind, real_model.path, tmp_path / f"{kind}.gguf", progress=False)
    vocab_only = Llama(str(real_model.path), vocab_only=True, verbose=False)
    tokens = vocab_only.tokenize(PROMPT.encode(), add_bos=True)

    hf_adapted, hf_base = peft_logits(model, tokens)
    cpp_base = llama_logits(real_model.path, tokens, None)
    cpp_adapted = llama_logits(real_model.path, tokens, out)

    hf_delta, cpp_delta = hf_adapted - hf_base, cpp_adapted - cpp_base
    assert np.linalg.norm(cpp_delta) > 0.1 * np.linalg.norm(hf_delta), "adapter had no effect"
    cosines = cosine_rows(hf_delta, cpp_delta)
    print(f"{kind}: delta cosine min {cosines.min():.3f} mean {cosines.mean():.3f}")
    assert cosines.min() >= MIN_DELTA_COSINE
    assert cosines.mean() >= MIN_MEAN_DELTA_COSINE
