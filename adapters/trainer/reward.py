"""Reward models: a LoRA adapter on the base with a scalar head, and how it scores text.

`train-adapter --method reward` trains one through TRL's RewardTrainer over
{prompt, chosen, rejected} rows: the base loads as a sequence classifier with one output (its
`score` head, trained in full and saved with the adapter through PEFT's SEQ_CLS task type),
and the loss pushes the chosen text's reward above the rejected one's. A reward adapter is not
a generation adapter: the server refuses it, and the trainer and `eval-adapter` use it.

The text a reward is read from is the one RewardTrainer trains on: prompt + completion + the
EOS token, tokenized as plain text.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel
from tqdm import tqdm
from transformers import AutoModelForSequenceClassification, PreTrainedModel

from loraplex.adapters.trainer.base import compute_dtype, quantization_config
from loraplex.adapters.trainer.config import Quantization

SCORE_HEAD = "score"  # transformers' name for a sequence classifier's output layer


def load_reward_base(
    checkpoint: Path, quantization: Quantization, device: torch.device, pad_token_id: int
) -> PreTrainedModel:
    """The base as a one-output sequence classifier (a fresh `score` head), quantized as asked;
    the head itself stays in full precision so that it can train."""
    dtype = compute_dtype(device)
    quantized = quantization_config(quantization, dtype)
    if quantized is not None:
        quantized.llm_int8_skip_modules = [SCORE_HEAD]
    model = AutoModelForSequenceClassification.from_pretrained(
        checkpoint,
        num_labels=1,
        dtype=dtype,
        quantization_config=quantized,
        device_map={"": device},
        attn_implementation="eager",
    )
    # The classifier reads the last token that is not padding.
    model.config.pad_token_id = pad_token_id
    return model


def head_in_compute_dtype(model: Any, dtype: torch.dtype) -> None:
    """TRL casts every trainable parameter of a quantized model to bf16 (QLoRA's recipe), which
    suits LoRA layers (they cast their input) but not the plain `score` head, which then meets
    hidden states of the compute dtype (fp32 on a CPU): the head goes back to that dtype."""
    for name, param in model.named_parameters():
        if param.requires_grad and f".{SCORE_HEAD}." in f".{name}":
            param.data = param.data.to(dtype)


def load_reward_model(
    checkpoint: Path, adapter: Path, quantization: Quantization, device: torch.device,
    tokenizer: Any,
) -> PeftModel:  # fmt: skip
    base = load_reward_base(checkpoint, quantization, device, tokenizer.pad_token_id)
    return PeftModel.from_pretrained(base, adapter).eval()


def reward_text(prompt: str, completion: str, tokenizer: Any) -> str:
    return prompt + completion + tokenizer.eos_token


def rewards(
    model: Any, tokenizer: Any, texts: list[str], batch_size: int = 16, progress: bool = False
) -> list[float]:
    """The model's scalar reward for each text (right-padded batches)."""
    tokenizer.padding_side = "right"
    scores: list[float] = []
    batches = range(0, len(texts), batch_size)
    for start in tqdm(batches, desc="rewards", disable=not progress):
        batch = tokenizer(texts[start : start + batch_size], return_tensors="pt", padding=True)
        with torch.no_grad():
            logits = model(**batch.to(model.device)).logits
        scores.extend(float(value) for value in logits[:, 0].float())
    return scores


def answer_rewards(
    model: Any, tokenizer: Any, prompts: Sequence[str], answers: Sequence[str],
    batch_size: int = 16, progress: bool = False,
) -> list[float]:  # fmt: skip
    """The reward of each prompt + answer, read as the model was trained to read it."""
    pairs = zip(prompts, answers, strict=True)
    texts = [reward_text(prompt, answer, tokenizer) for prompt, answer in pairs]
    return rewards(model, tokenizer, texts, batch_size, progress)


def pairwise_accuracy(
    model: Any, tokenizer: Any, rows: list[dict[str, str]], batch_size: int = 16,
    progress: bool = False,
) -> dict[str, float]:  # fmt: skip
    """Share of pairs whose chosen text the model rewards above the rejected one, and the mean
    reward margin."""
    prompts = [r["prompt"] for r in rows]
    answers = [r["chosen"] for r in rows] + [r["rejected"] for r in rows]
    scored = answer_rewards(model, tokenizer, prompts + prompts, answers, batch_size, progress)
    margins = [c - r for c, r in zip(scored[: len(rows)], scored[len(rows) :], strict=True)]
    return {
        "pairwise_accuracy": sum(m > 0 for m in margins) / len(margins),
        "mean_reward_margin": sum(margins) / len(margins),
    }
