"""Raw llama-cpp-python as the oracle for the GGUF backend: greedy tokens from the high-level
`Llama`, with an adapter loaded the only way that API allows, as its `lora_path`."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from loraplex.bench.plain_llama import plain_llama

N_TOKENS = 12

# llama.cpp's CPU matmuls take other kernels for one row than for several (and its float32 LoRA
# matmul too), so a batched run's logprobs drift from its solo twin's over a dozen tokens, with
# identical tokens: up to 0.13 was measured on an AVX2 machine, 0.27 on an AVX-512 one, and
# 0.42 on an AMD EPYC AVX2 one (test_grpc_e2e, eighth token, growing from 0.02 over the first
# seven). Wrong positions, KV cross-talk or a wrong adapter change the tokens within a step or two.
DRIFT = 0.5
ORACLE_CTX = 128


def oracle_greedy(
    model: Path, prompt_ids: list[int], lora: Path | None = None, scale: float = 1.0
) -> list[int]:
    """Greedy tokens from the high-level Llama with the adapter loaded as its lora_path."""
    return oracle_greedy_logprobs(model, prompt_ids, lora, scale)[0]


def oracle_greedy_logprobs(
    model: Path, prompt_ids: list[int], lora: Path | None = None, scale: float = 1.0
) -> tuple[list[int], list[float]]:
    """Greedy tokens from the high-level Llama with the adapter loaded as its lora_path (the
    only way that API loads one), and the log-probability of each."""
    llm = plain_llama(
        str(model),
        n_ctx=ORACLE_CTX,
        n_threads=2,
        logits_all=True,
        lora_path=None if lora is None else str(lora),
        lora_scale=scale,
        verbose=False,
    )
    llm.eval(prompt_ids)
    tokens: list[int] = []
    logprobs: list[float] = []
    for _ in range(N_TOKENS):
        scores = np.asarray(llm.scores[llm.n_tokens - 1], dtype=np.float64)
        tokens.append(int(np.argmax(scores)))
        shifted = scores - scores.max()
        logprobs.append(float(shifted[tokens[-1]] - np.log(np.exp(shifted).sum())))
        llm.eval([tokens[-1]])
    llm.close()
    return tokens, logprobs
