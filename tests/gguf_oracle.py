"""Raw llama-cpp-python as the oracle for the GGUF backend: greedy tokens from the high-level
`Llama`, with an adapter loaded the only way that API allows, as its `lora_path`."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from llama_cpp import Llama

N_TOKENS = 12
ORACLE_CTX = 128


def oracle_greedy(
    model: Path, prompt_ids: list[int], lora: Path | None = None, scale: float = 1.0
) -> list[int]:
    """Greedy tokens from the high-level Llama with the adapter loaded as its lora_path."""
    llm = Llama(
        str(model),
        n_ctx=ORACLE_CTX,
        n_threads=2,
        logits_all=True,  # llama-cpp-python keeps no scores otherwise
        lora_path=None if lora is None else str(lora),
        lora_scale=scale,
        verbose=False,
    )
    llm.eval(prompt_ids)
    tokens: list[int] = []
    for _ in range(N_TOKENS):
        tokens.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        llm.eval([tokens[-1]])
    llm.close()
    return tokens
