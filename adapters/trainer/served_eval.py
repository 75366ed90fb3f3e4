"""`eval-adapter --server ADDR`: score an adapter as a running loraplex server serves it.

The answers come from the server (any backend: a GGUF server scores the GGUF-LoRA it made
from the adapter), greedy, with the adapter and then with the base; the metric is computed
here against each row's reference (an SFT row's completion, a DPO row's chosen answer):

- exact: the first line equals the reference's first line;
- rouge: ROUGE-L F1 of the first lines (Google's rouge-score package);
- json-schema: the first line is JSON (valid against the row's `schema`, if it has one);
- reward: the mean reward of prompt + answer under `--reward-model`, scored on this machine;
- stops: the answer ended by itself (the model's end-of-sequence token, no stop string) within
  `--max-words` words.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch
from rouge_score import rouge_scorer

from loraplex.adapters.trainer import data as data_mod
from loraplex.adapters.trainer import reward, rule_rewards
from loraplex.adapters.trainer.base import load_tokenizer, pick_device, resolve_base
from loraplex.adapters.trainer.config import EvalConfig

METRICS = ("exact", "rouge", "json-schema", "reward", "stops")


@dataclass(frozen=True)
class Answer:
    text: str
    finish_reason: str  # "eos", "stop", "length" or "context"


Scores = Callable[[list[Answer], list[data_mod.Row]], list[float]]


def run(config: EvalConfig, method: str, rows: list[data_mod.Row]) -> dict[str, Any]:
    """Scores of the adapter (by its id: the directory's name) and of the base, served."""
    from loraplex.clients.client import Client

    metric = _metric(config, method)
    score = _scorer(metric, config)
    adapter_id = config.adapter.name if config.adapter is not None else ""
    prompts = [row["prompt"] for row in rows]
    result: dict[str, Any] = {"server": config.server, "metric": metric}
    stop_at_line = metric not in ("reward", "stops")  # these judge the whole answer
    with Client(config.server or "", timeout=600) as client:
        for label, adapter in (("adapter", adapter_id), ("base", "")):
            answers = _answers(client, prompts, adapter, config, stop_at_line)
            values = score(answers, rows)
            result[f"{label}_{metric}"] = sum(values) / len(values)
            result[f"{label}_examples"] = [a.text for a in answers[:3]]
    result[f"{metric}_gain"] = result[f"adapter_{metric}"] - result[f"base_{metric}"]
    return result


def _metric(config: EvalConfig, method: str) -> str:
    if config.metric != "auto":
        return config.metric
    if config.reward_model is not None:
        return "reward"
    if method == "sft":
        return "exact"
    raise data_mod.DatasetError(f"pick a --metric ({', '.join(METRICS)}) for a {method} adapter")


def _answers(
    client: Any, prompts: list[str], adapter: str, config: EvalConfig, stop_at_line: bool
) -> list[Answer]:
    """Greedy answers, sent together so that the server batches them."""

    def ask(prompt: str) -> Answer:
        answer = client.generate(
            prompt, adapter=adapter, max_new_tokens=config.max_new_tokens, temperature=0.0,
            stop=["\n"] if stop_at_line else [],
        )  # fmt: skip
        return Answer(str(answer.text), str(answer.finish_reason))

    with ThreadPoolExecutor(max_workers=config.batch_size) as pool:
        return list(pool.map(ask, prompts))


def _scorer(metric: str, config: EvalConfig) -> Scores:
    if metric == "exact":
        return lambda answers, rows: rule_rewards.exact(_texts(answers), _references(rows))
    if metric == "rouge":
        return _rouge
    if metric == "json-schema":
        return lambda answers, rows: rule_rewards.json_valid(
            _texts(answers), [row.get("schema", "") for row in rows]
        )
    if metric == "stops":
        return lambda answers, _: [
            float(a.finish_reason == "eos" and len(a.text.split()) <= config.max_words)
            for a in answers
        ]
    return _reward_scorer(config)


def _texts(answers: list[Answer]) -> list[str]:
    return [answer.text for answer in answers]


def _references(rows: list[data_mod.Row]) -> list[str]:
    return [str(data_mod.reference_answer(row)) for row in rows]


def _rouge(answers: list[Answer], rows: list[data_mod.Row]) -> list[float]:
    """ROUGE-L F1 of each answer's first line against its reference's."""
    rouge = rouge_scorer.RougeScorer(["rougeL"])
    pairs = zip(_texts(answers), _references(rows), strict=True)
    return [
        rouge.score(rule_rewards.first_line(want), rule_rewards.first_line(got))["rougeL"].fmeasure
        for got, want in pairs
    ]


def _reward_scorer(config: EvalConfig) -> Scores:
    if config.reward_model is None:
        raise data_mod.DatasetError("--metric reward needs --reward-model DIR")
    base = resolve_base(config)
    tokenizer = load_tokenizer(base.checkpoint)
    device: torch.device = pick_device(config.device)
    judge = reward.load_reward_model(
        base.checkpoint, config.reward_model, config.quantization, device, tokenizer
    )

    def score(answers: list[Answer], rows: list[data_mod.Row]) -> list[float]:
        prompts = [row["prompt"] for row in rows]
        return reward.answer_rewards(judge, tokenizer, prompts, _texts(answers), config.batch_size)

    return score
