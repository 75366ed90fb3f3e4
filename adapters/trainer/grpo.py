"""`train-adapter --method grpo`: TRL's GRPOTrainer with loraplex's rewards.

GRPO samples `--num-generations` completions per prompt, scores each with the rewards (a
reward-model adapter, rule rewards, or a weighted sum of both) and pushes the adapter toward
the completions that beat their group's mean, with a KL penalty (`--beta`) to the base, which
TRL computes with the adapter disabled (no second copy of the base for the reference). TRL
logs the mean reward, each reward function's mean and the KL at every logging step.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch

from loraplex.adapters.trainer import reward, rule_rewards
from loraplex.adapters.trainer.base import BaseInfo
from loraplex.adapters.trainer.config import TrainConfig
from loraplex.adapters.trainer.data import DatasetError

RULES = ("exact", "json", "line", "length")
# TrainingArguments that GRPOConfig does not take: prompts are not truncated, and completions
# are limited by --max-completion-length
NOT_GRPO_ARGS = ("max_length", "dataset_num_proc")


def model_reward(scorer: Any, tokenizer: Any) -> rule_rewards.RewardFunction:
    """A reward-model adapter as a TRL reward function: the reward of prompt + completion."""

    def reward_model(prompts: Sequence[str], completions: Sequence[str], **_: Any) -> list[float]:
        return reward.answer_rewards(scorer, tokenizer, prompts, completions)

    return reward_model


def parse_rewards(config: TrainConfig) -> list[tuple[str, float]]:
    """(name, weight) per --reward NAME[=WEIGHT]; `model` alone when none is named."""
    specs = config.reward or ["model"]
    parsed = []
    for spec in specs:
        name, _, weight = spec.partition("=")
        if name not in ("model", *RULES):
            raise DatasetError(f"unknown reward {name!r}; known: model, {', '.join(RULES)}")
        if name == "model" and config.reward_model is None:
            raise DatasetError("the model reward needs --reward-model DIR (a reward adapter)")
        try:
            parsed.append((name, float(weight) if weight else 1.0))
        except ValueError:
            raise DatasetError(f"reward {spec!r}: the weight must be a number") from None
    return parsed


def reward_functions(
    config: TrainConfig, base: BaseInfo, device: torch.device, tokenizer: Any
) -> tuple[list[Any], list[float]]:
    """The reward callables GRPOTrainer calls, and their weights."""
    functions: list[Any] = []
    weights: list[float] = []
    for name, weight in parse_rewards(config):
        functions.append(_reward_function(name, config, base, device, tokenizer))
        weights.append(weight)
    return functions, weights


def _reward_function(
    name: str, config: TrainConfig, base: BaseInfo, device: torch.device, tokenizer: Any
) -> Any:
    if name == "model":
        assert config.reward_model is not None  # checked by parse_rewards
        scorer = reward.load_reward_model(
            base.checkpoint, config.reward_model, config.quantization, device, tokenizer
        )
        return model_reward(scorer, tokenizer)
    if name == "exact":
        return rule_rewards.exact
    if name == "json":
        return rule_rewards.json_valid
    if name == "line":
        return rule_rewards.line_end(end_token_ids(tokenizer, base))
    return rule_rewards.length(config.max_words)


def end_token_ids(tokenizer: Any, base: BaseInfo) -> set[int]:
    """Every token that ends a generation: the tokenizer's EOS and the generation config's."""
    from transformers import GenerationConfig

    ids = {tokenizer.eos_token_id}
    try:
        configured = GenerationConfig.from_pretrained(base.checkpoint).eos_token_id
    except OSError:  # no generation_config.json
        configured = None
    if configured is not None:
        ids.update(configured if isinstance(configured, list) else [configured])
    return {i for i in ids if i is not None}


def curve(history: list[dict[str, Any]]) -> list[dict[str, float]]:
    """The mean reward and KL to the base at each logged step (TRL's log), for the card."""
    keys = ("step", "reward", "reward_std", "kl")
    return [{k: float(e[k]) for k in keys if k in e} for e in history if "reward" in e]


def grpo_args(config: TrainConfig, common: dict[str, Any], weights: list[float]) -> Any:
    from trl import GRPOConfig

    kept = {key: value for key, value in common.items() if key not in NOT_GRPO_ARGS}
    return GRPOConfig(
        **kept,
        num_generations=config.num_generations,
        max_completion_length=config.max_completion_length,
        temperature=config.temperature,
        beta=config.beta,
        reward_weights=weights,
    )


def rollout_func(config: TrainConfig, base: BaseInfo, generation_batch: int) -> Any:
    """loraplex's engine as TRL's rollout function (`--rollouts engine`), or None for TRL's
    own generate."""
    if config.rollouts == "trl":
        return None
    from loraplex.adapters.trainer.rollouts import EngineRollouts

    # TRL warns that rollout_func is experimental; loraplex pins the TRL version it uses
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    return EngineRollouts(base.checkpoint, config.rank, generation_batch, config.seed)
