"""`eval-adapter`: score an adapter against its own base on a held-out split.

SFT: exact match of the first generated line against the completion, adapter vs base
(greedy decoding, the same prompts). DPO: preference accuracy of the implicit reward
beta * (log p_adapter - log p_base) of chosen over rejected, and the preferred trait
(conciseness: words generated) adapter vs base. Reward model: held-out pairwise accuracy
(chosen rewarded above rejected) and the mean reward margin (reward.py). With a reward model
(`--reward-model`, or a GRPO adapter's own): the mean reward of the adapter's and the base's
greedy answers to the held-out prompts; GRPO adapters also get the conciseness scores.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel
from tqdm import tqdm

from loraplex.adapters.trainer import data as data_mod
from loraplex.adapters.trainer import reward, served_eval
from loraplex.adapters.trainer.base import load_base, load_tokenizer, pick_device, resolve_base
from loraplex.adapters.trainer.config import EvalConfig
from loraplex.adapters.trainer.output import read_metadata
from loraplex.adapters.trainer.rule_rewards import first_line
from loraplex.adapters.trainer.tasks import TASKS

CONCISE_WORDS = 8  # an answer of at most this many words counts as concise


@dataclass
class Scorer:
    """A base model wrapped with one adapter that can be switched off per call."""

    model: PeftModel
    tokenizer: Any
    batch_size: int = 16
    max_new_tokens: int = 40
    progress: bool = True
    stop_at_newline: bool = False  # SFT scores the first line only: stop generating there
    answers: dict[tuple[bool, tuple[str, ...]], list[str]] = field(default_factory=dict)

    def use(self, adapter: bool) -> AbstractContextManager[Any]:
        return nullcontext() if adapter else self.model.disable_adapter()


def run(config: EvalConfig) -> dict[str, Any]:
    if config.adapter is None:
        raise data_mod.DatasetError("give the adapter directory to score")
    method, rows = _rows(config)
    if config.server is not None:
        scores = served_eval.run(config, method, rows)
    else:
        scores = _local_scores(config, config.adapter, method, rows)
    return {"adapter": str(config.adapter), "method": method, "rows": len(rows), **scores}


def _local_scores(
    config: EvalConfig, adapter: Path, method: str, rows: list[data_mod.Row]
) -> dict[str, Any]:
    """Scores computed here, with transformers, on the base the adapter was trained for."""
    base = resolve_base(config)
    device = pick_device(config.device)
    tokenizer = load_tokenizer(base.checkpoint)
    if method == "reward":
        scored = reward.load_reward_model(
            base.checkpoint, adapter, config.quantization, device, tokenizer
        )
        return reward.pairwise_accuracy(scored, tokenizer, rows, config.batch_size, True)
    model = PeftModel.from_pretrained(
        load_base(base.checkpoint, config.quantization, device), adapter
    ).eval()
    scorer = Scorer(
        model, tokenizer, config.batch_size, config.max_new_tokens, stop_at_newline=method == "sft"
    )
    scores = _method_scores(scorer, rows, method, config.beta)
    judge = config.reward_model or _training_reward_model(adapter, method)
    if judge is not None:
        scored = reward.load_reward_model(
            base.checkpoint, judge, config.quantization, device, tokenizer
        )
        scores.update(score_rewards(scorer, rows, scored))
    return scores


def _method_scores(
    scorer: Scorer, rows: list[data_mod.Row], method: str, beta: float
) -> dict[str, Any]:
    if method == "dpo":
        return score_dpo(scorer, rows, beta)
    if method == "sft":
        return score_sft(scorer, rows)
    prompts = [row["prompt"] for row in rows]  # grpo: what its rewards asked for, in words
    with_adapter = [word_count(t) for t in generate(scorer, prompts, True)]
    return trait_scores(with_adapter, [word_count(t) for t in generate(scorer, prompts, False)])


def _training_reward_model(adapter: Path, method: str) -> Path | None:
    """A GRPO adapter's reward model, as its card records it (when that path still exists)."""
    if method != "grpo":
        return None
    recorded = read_metadata(adapter).get("hyperparameters", {}).get("reward_model")
    return Path(recorded) if recorded and Path(recorded).is_dir() else None


def score_rewards(scorer: Scorer, rows: list[data_mod.Row], judge: Any) -> dict[str, Any]:
    """Mean reward of the adapter's and the base's greedy answers under the reward model
    `judge` (the text it reads: prompt + answer + EOS, as it was trained)."""
    prompts = [row["prompt"] for row in rows]
    result: dict[str, Any] = {}
    for label, adapter in (("adapter", True), ("base", False)):
        answers = generate(scorer, prompts, adapter)
        scored = reward.answer_rewards(judge, scorer.tokenizer, prompts, answers, scorer.batch_size)
        result[f"{label}_mean_reward"] = sum(scored) / len(scored)
    result["reward_gain"] = result["adapter_mean_reward"] - result["base_mean_reward"]
    return result


def _rows(config: EvalConfig) -> tuple[str, list[data_mod.Row]]:
    method = config.method or read_metadata(config.adapter or Path()).get("method")
    if config.data is not None:
        path = config.data
    elif config.task is not None:
        if config.task not in TASKS:
            raise data_mod.DatasetError(f"unknown task {config.task!r}; known: {', '.join(TASKS)}")
        path = TASKS[config.task].path("test")
        method = method or TASKS[config.task].method
    else:
        raise data_mod.DatasetError("give --task NAME or --data FILE.jsonl")
    if method not in ("sft", "dpo", "reward", "grpo"):
        raise data_mod.DatasetError("cannot tell sft, dpo, reward or grpo scoring; pass --method")
    rows = data_mod.load_rows(path, method)
    return method, rows[: config.limit] if config.limit else rows


def score_sft(scorer: Scorer, rows: list[data_mod.Row]) -> dict[str, Any]:
    prompts = [row["prompt"] for row in rows]
    targets = [row["completion"].strip() for row in rows]
    result: dict[str, Any] = {}
    for label, adapter in (("adapter", True), ("base", False)):
        outputs = generate(scorer, prompts, adapter)
        hits = [first_line(out) == want for out, want in zip(outputs, targets, strict=True)]
        result[f"{label}_exact_match"] = sum(hits) / len(hits)
        result[f"{label}_examples"] = outputs[:3]
    result["exact_match_gain_points"] = 100 * (
        result["adapter_exact_match"] - result["base_exact_match"]
    )
    return result


def score_dpo(scorer: Scorer, rows: list[data_mod.Row], beta: float) -> dict[str, Any]:
    wins = 0
    margins = []
    for row in tqdm(rows, desc="implicit rewards", disable=not scorer.progress):
        chosen, rejected = completion_logps(scorer, row["prompt"], [row["chosen"], row["rejected"]])
        reward_chosen = beta * (chosen[True] - chosen[False])
        reward_rejected = beta * (rejected[True] - rejected[False])
        margins.append(reward_chosen - reward_rejected)
        wins += margins[-1] > 0
    prompts = [row["prompt"] for row in rows]
    with_adapter = [word_count(t) for t in generate(scorer, prompts, True)]
    without = [word_count(t) for t in generate(scorer, prompts, False)]
    return {
        "preference_accuracy": wins / len(rows),
        "mean_reward_margin": sum(margins) / len(margins),
        **trait_scores(with_adapter, without),
    }


def trait_scores(adapter_words: list[int], base_words: list[int]) -> dict[str, float]:
    """Conciseness: share of answers within CONCISE_WORDS, and the pairwise win rate."""
    pairs = list(zip(adapter_words, base_words, strict=True))
    wins = sum(1.0 if a < b else 0.5 if a == b else 0.0 for a, b in pairs)
    return {
        "adapter_mean_words": sum(adapter_words) / len(pairs),
        "base_mean_words": sum(base_words) / len(pairs),
        "adapter_concise_rate": sum(a <= CONCISE_WORDS for a in adapter_words) / len(pairs),
        "base_concise_rate": sum(b <= CONCISE_WORDS for b in base_words) / len(pairs),
        "concise_win_rate": wins / len(pairs),
    }


def word_count(text: str) -> int:
    return len(text.split())


def completion_logps(
    scorer: Scorer, prompt: str, completions: list[str]
) -> list[dict[bool, float]]:
    """log p(completion + EOS | prompt) for each completion, with the adapter on and off."""
    tok = scorer.tokenizer
    prompt_ids = tok(prompt).input_ids
    seqs = [
        prompt_ids + tok(c, add_special_tokens=False).input_ids + [tok.eos_token_id]
        for c in completions
    ]
    width = max(len(s) for s in seqs)
    ids = torch.tensor([s + [tok.pad_token_id] * (width - len(s)) for s in seqs])
    mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs])
    device = scorer.model.device
    result: list[dict[bool, float]] = [{} for _ in completions]
    for adapter in (True, False):
        with torch.no_grad(), scorer.use(adapter):
            logits = scorer.model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
        logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
        picked = logp.gather(-1, ids[:, 1:].to(device).unsqueeze(-1)).squeeze(-1)
        for i, seq in enumerate(seqs):
            result[i][adapter] = float(picked[i, len(prompt_ids) - 1 : len(seq) - 1].sum())
    return result


def generate(scorer: Scorer, prompts: list[str], adapter: bool) -> list[str]:
    """Greedy continuations (special tokens dropped), batched with left padding; each set of
    prompts is generated once per scorer (greedy answers do not change)."""
    key = (adapter, tuple(prompts))
    if key not in scorer.answers:
        scorer.answers[key] = _generate_all(scorer, prompts, adapter)
    return scorer.answers[key]


def _generate_all(scorer: Scorer, prompts: list[str], adapter: bool) -> list[str]:
    outputs: list[str] = []
    label = "adapter" if adapter else "base"
    total = math.ceil(len(prompts) / scorer.batch_size)
    for batch in tqdm(
        _batches(prompts, scorer.batch_size),
        total=total,
        desc=f"generating ({label})",
        disable=not scorer.progress,
    ):
        outputs.extend(_generate_batch(scorer, batch, adapter))
    return outputs


def _generate_batch(scorer: Scorer, prompts: list[str], adapter: bool) -> list[str]:
    tok = scorer.tokenizer
    tok.padding_side = "left"
    encoded = tok(prompts, return_tensors="pt", padding=True).to(scorer.model.device)
    with torch.no_grad(), scorer.use(adapter):
        out = scorer.model.generate(
            **encoded,
            max_new_tokens=scorer.max_new_tokens,
            do_sample=False,
            pad_token_id=tok.pad_token_id,
            **({"stop_strings": ["\n"], "tokenizer": tok} if scorer.stop_at_newline else {}),
        )
    new_tokens = out[:, encoded["input_ids"].shape[1] :]
    return [str(t) for t in tok.batch_decode(new_tokens, skip_special_tokens=True)]


def _batches(items: list[str], size: int) -> Iterator[list[str]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]
