"""PEFT -> GGUF-LoRA export for the architectures users run on llama.cpp, each checked against
llama.cpp's own converters from the llama-cpp-python source release (kept by the setup):

- a tiny random model of the architecture, made a GGUF base by `convert_hf_to_gguf.py`;
- a random all-linear LoRA on it, exported by loraplex and by `convert_lora_to_gguf.py`;
- the two files hold the same tensors (B compared with each file's alpha / rank applied), and
  the GGUF backend serving the PEFT folder gives the greedy tokens and logprobs it gives
  serving llama.cpp's file, which differ from the base's.

Mistral checkpoints become `llama` GGUF files, so "mistral" checks the q/k rotary
permutation a second time from another transformers class.
"""

from __future__ import annotations

import hashlib
import io
import os
import subprocess
import sys
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
import sentencepiece
import torch
from engine_driver import run as engine_run
from peft import LoraConfig, get_peft_model
from tiny import CORPUS
from transformers import (
    Gemma2Config,
    Gemma2ForCausalLM,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from loraplex.adapters.gguf_export import export_gguf
from loraplex.server.engine.api import AdapterRef, SamplingParams, SequenceRequest
from loraplex.server.engine.gguf_runtime import RuntimeConfig
from loraplex.server.engine.gguf_serving import AdapterLimits, build_gguf_backend

pytestmark = pytest.mark.gguf

# where scripts/setup.sh keeps the converters of the llama-cpp-python release it installed
LLAMA_CPP = Path(sys.prefix) / "share" / f"llama.cpp-convert-{version('llama-cpp-python')}"
RANK, ALPHA = 4, 8
COMMON: dict[str, Any] = {
    "vocab_size": 320, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256,
    "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2,
}  # fmt: skip
ARCHITECTURES: dict[str, tuple[type[PreTrainedModel], PretrainedConfig]] = {
    "llama": (LlamaForCausalLM, LlamaConfig(**COMMON, head_dim=16)),
    "mistral": (MistralForCausalLM, MistralConfig(**COMMON, head_dim=16, sliding_window=None)),
    "qwen2": (Qwen2ForCausalLM, Qwen2Config(**COMMON)),
    "qwen3": (Qwen3ForCausalLM, Qwen3Config(**COMMON, head_dim=16)),
    "phi3": (Phi3ForCausalLM, Phi3Config(**COMMON)),
    "gemma2": (Gemma2ForCausalLM, Gemma2Config(**COMMON, head_dim=16)),
    "gemma3": (Gemma3ForCausalLM, Gemma3TextConfig(**COMMON, head_dim=16, sliding_window=64)),
}
PROMPT_IDS = [1, 17, 42, 99, 150, 23, 7]


@dataclass(frozen=True)
class Exports:
    base: Path  # the GGUF base convert_hf_to_gguf.py made
    adapters: Path  # a root: ours/ (the PEFT folder) and theirs/adapter_model.gguf
    ours: Path  # loraplex's export of ours/


def llama_cpp(script: str, *args: str | Path) -> None:
    assert (LLAMA_CPP / script).is_file(), f"{LLAMA_CPP} is missing: run `make setup`"
    env = {**os.environ, "PYTHONPATH": str(LLAMA_CPP / "gguf-py")}
    done = subprocess.run([sys.executable, str(LLAMA_CPP / script), *map(str, args)],
                          capture_output=True, text=True, env=env, timeout=300)  # fmt: skip
    assert done.returncode == 0, f"{script} failed:\n{done.stderr[-3000:]}"


def sentencepiece_model(path: Path) -> None:
    """A small SentencePiece vocabulary: llama.cpp's converter reads it for every one of
    these architectures (padding it to the model's vocabulary size)."""
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS), model_writer=model, vocab_size=200, model_type="bpe",
        pad_id=0, bos_id=1, eos_id=2, unk_id=3, hard_vocab_limit=False, minloglevel=2,
    )  # fmt: skip
    path.write_bytes(model.getvalue())


@pytest.fixture(scope="module", params=sorted(ARCHITECTURES))
def exports(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Exports:
    model_class, config = ARCHITECTURES[request.param]
    work = tmp_path_factory.mktemp(f"gguf-{request.param}")
    torch.manual_seed(0)
    model = model_class(config).eval()
    with torch.no_grad():  # larger than the default init, so tokens depend on the weights
        for param in model.parameters():
            if param.dim() == 2:
                param.normal_(0.0, 0.2)
    model.save_pretrained(work / "hf")
    sentencepiece_model(work / "hf" / "tokenizer.model")
    llama_cpp("convert_hf_to_gguf.py", work / "hf", "--outfile", work / "base.gguf",
              "--outtype", "f32")  # fmt: skip
    lora = LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules="all-linear",
                      init_lora_weights=False)  # fmt: skip
    peft_model = get_peft_model(model, lora)
    with torch.no_grad():  # an adapter strong enough to change greedy tokens
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.normal_(0.0, 0.3)
    adapters = work / "adapters"
    peft_model.save_pretrained(adapters / "ours")
    theirs = adapters / "theirs" / "adapter_model.gguf"
    theirs.parent.mkdir()
    llama_cpp("convert_lora_to_gguf.py", adapters / "ours", "--base", work / "hf",
              "--outfile", theirs, "--outtype", "f32")  # fmt: skip
    ours = export_gguf(adapters / "ours", work / "base.gguf", work / "ours.gguf", progress=False)
    return Exports(work / "base.gguf", adapters, ours)


def scaled_tensors(path: Path) -> dict[str, np.ndarray]:
    """The file's tensors, each B times the file's alpha / rank (what llama.cpp applies)."""
    reader = gguf.GGUFReader(path)
    field = reader.get_field("adapter.lora.alpha")
    assert field is not None
    scale = float(field.contents()) / RANK
    return {t.name: np.array(t.data) * (scale if t.name.endswith(".lora_b") else 1.0)
            for t in reader.tensors}  # fmt: skip


def test_the_export_holds_llama_cpps_tensors(exports: Exports) -> None:
    ours = scaled_tensors(exports.ours)
    theirs = scaled_tensors(exports.adapters / "theirs" / "adapter_model.gguf")
    assert sorted(ours) == sorted(theirs)
    for name, tensor in theirs.items():
        np.testing.assert_allclose(ours[name], tensor, rtol=1e-6, atol=1e-7, err_msg=name)


def test_the_gguf_backend_serves_the_peft_adapter_as_llama_cpps_file(
    exports: Exports, tmp_path: Path
) -> None:
    limits = AdapterLimits([exports.adapters], max_rank=64, max_resident=8,
                           max_resident_bytes=1 << 30)  # fmt: skip
    digest = hashlib.sha256(exports.base.read_bytes()).hexdigest()
    engine, store = build_gguf_backend(exports.base, digest, limits, RuntimeConfig(), tmp_path)
    sampling = SamplingParams(max_new_tokens=8, logprobs=True)
    try:
        served = {}
        for adapter_id in ("ours", "theirs", ""):
            ref: AdapterRef | None = store.acquire(adapter_id) if adapter_id else None
            request = SequenceRequest(f"seq-{adapter_id}", PROMPT_IDS, sampling, ref)
            served[adapter_id] = engine_run(engine, {0: [request]})[request.seq_id]
            if ref is not None:
                store.release(ref)
    finally:
        engine.close()
    assert served["ours"].tokens == served["theirs"].tokens
    np.testing.assert_allclose(served["ours"].logprobs, served["theirs"].logprobs, atol=1e-3)
    assert (served["ours"].tokens, served["ours"].logprobs) != (
        served[""].tokens,
        served[""].logprobs,
    )
