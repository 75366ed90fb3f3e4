"""GRPO rollouts on loraplex's engine (adapters/trainer/rollouts.py) against PEFT's own model:
the engine shares the trainer's base tensors, samples what the policy computes, and follows
the policy's weights from one call to the next without writing them anywhere."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from peft import LoraConfig, VeraConfig, get_peft_model

from loraplex.adapters.trainer import grpo
from loraplex.adapters.trainer.base import load_base, load_tokenizer
from loraplex.adapters.trainer.rollouts import POLICY, EngineRollouts, engine_view
from loraplex.adapters.trainer.tasks import TASKS

NEW_TOKENS = 6


def prompts(count: int) -> list[str]:
    import json

    lines = TASKS["concise"].path("test").read_text().splitlines()[:count]
    return [json.loads(line)["prompt"] for line in lines]


def policy_model(checkpoint: Path, kind: str, seed: int = 0) -> Any:
    """A tiny base with a LoRA or VeRA whose every weight is random, so it changes outputs."""
    torch.manual_seed(seed)
    base = load_base(checkpoint, "none", torch.device("cpu"))
    config: Any = (
        LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM")
        if kind == "lora"
        else VeraConfig(
            r=8, target_modules="all-linear", save_projection=True, task_type="CAUSAL_LM"
        )
    )
    model = get_peft_model(base, config)
    randomize(model, seed)
    return model


def randomize(model: Any, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name or "vera_lambda" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.3)


def trainer_for(model: Any, tokenizer: Any) -> SimpleNamespace:
    """What EngineRollouts reads of a GRPOTrainer: greedy, so PEFT's generate is the oracle."""
    return SimpleNamespace(
        model=model,
        processing_class=tokenizer,
        accelerator=SimpleNamespace(unwrap_model=lambda m: m),
        max_completion_length=NEW_TOKENS,
        temperature=1e-6,
        top_p=1.0,
        top_k=0,
        min_p=None,
        repetition_penalty=1.0,
    )


def peft_greedy(model: Any, tokenizer: Any, prompt: str) -> tuple[list[int], list[float]]:
    """PEFT's own greedy tokens (stopping at the model's end tokens) and their log-probs."""
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(input_ids=ids, max_new_tokens=NEW_TOKENS, do_sample=False,
                             output_scores=True, return_dict_in_generate=True)  # fmt: skip
    tokens = out.sequences[0, ids.shape[1] :].tolist()
    scores = [torch.log_softmax(s[0].float(), -1) for s in out.scores]
    logprobs = [float(s[t]) for s, t in zip(scores, tokens, strict=True)]
    return tokens, logprobs


@pytest.mark.parametrize("kind", ["lora", "vera"])
def test_rollouts_sample_what_the_peft_policy_computes_and_follow_its_updates(
    tiny_checkpoints: dict[str, Path], kind: str
) -> None:
    checkpoint = tiny_checkpoints["gemma3"]
    model, tokenizer = policy_model(checkpoint, kind), load_tokenizer(checkpoint)
    rollouts = EngineRollouts(checkpoint, rank=8, batch_size=3, seed=0, output_head="full")
    trainer = trainer_for(model, tokenizer)
    asked = prompts(4)  # more prompts than the batch holds: rows join as others end
    for update in range(2):
        out = rollouts(asked, trainer)
        assert out["prompt_ids"] == [tokenizer(p).input_ids for p in asked]
        completions = zip(asked, out["completion_ids"], out["logprobs"], strict=True)
        for prompt, tokens, logprobs in completions:
            want_tokens, want_logprobs = peft_greedy(model, tokenizer, prompt)
            assert tokens == want_tokens
            assert logprobs == pytest.approx(want_logprobs, abs=2e-3)
        assert rollouts.store.list()[0].version == update + 1  # a new version per call
        randomize(model, seed=update + 1)  # an optimizer step, in place


def test_the_engine_shares_the_trainers_base_tensors_and_leaves_its_model_alone(
    tiny_checkpoints: dict[str, Path],
) -> None:
    checkpoint = tiny_checkpoints["gemma3"]
    model, tokenizer = policy_model(checkpoint, "lora"), load_tokenizer(checkpoint)
    ids = tokenizer("Hello there", return_tensors="pt").input_ids
    with torch.no_grad():
        before = model(input_ids=ids).logits
    base_storage = {p.untyped_storage().data_ptr() for p in model.get_base_model().parameters()}
    view = engine_view(model)
    assert not any("lora_" in name for name, _ in view.named_parameters())
    assert all(p.untyped_storage().data_ptr() in base_storage for p in view.parameters())
    rollouts = EngineRollouts(checkpoint, rank=8, batch_size=2, seed=0, output_head="full")
    rollouts(prompts(2), trainer_for(model, tokenizer))
    assert rollouts.engine is not None and rollouts.engine.model is not model.get_base_model()
    model.train()
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, before)  # PEFT's layers still in place
    assert any(p.requires_grad for n, p in model.named_parameters() if "lora_" in n)
    assert [a.adapter_id for a in rollouts.store.list()] == [POLICY]


def test_rollouts_option_picks_the_engine_or_trls_generate(tmp_path: Path) -> None:
    from test_trainer import make_config

    base = SimpleNamespace(checkpoint=tmp_path)
    common = {"method": "grpo", "reward": ["line"], "batch_size": 4, "num_generations": 4}
    engine = make_config(tmp_path, tmp_path / "a", tmp_path / "c", **common)
    trl = make_config(tmp_path, tmp_path / "b", tmp_path / "c", rollouts="trl", **common)
    assert isinstance(grpo.rollout_func(engine, base, 4), EngineRollouts)  # type: ignore[arg-type]
    assert grpo.rollout_func(trl, base, 4) is None  # type: ignore[arg-type]


def test_a_grpo_step_takes_its_completions_from_the_engine(
    tiny_checkpoints: dict[str, Path], tmp_path: Path
) -> None:
    from test_trainer import make_config

    from loraplex.adapters.trainer import train
    from loraplex.adapters.trainer.base import resolve_base

    config = make_config(tiny_checkpoints["gemma3"], tmp_path / "out", tmp_path / "cache",
                         method="grpo", data=TASKS["concise"].path("train"), reward=["line"],
                         max_steps=1, batch_size=4, num_generations=4,
                         max_completion_length=NEW_TOKENS, logging_steps=1)  # fmt: skip
    dataset = train.load_data(config)
    trainer = train.build_trainer(config, dataset, resolve_base(config), torch.device("cpu"))
    rollouts = trainer.rollout_func
    assert isinstance(rollouts, EngineRollouts)
    rollouts(prompts(2), trainer)  # builds the engine's view of the base
    # TRL patched the model's forward with a closure over itself: the engine must not run it
    policy_calls: list[int] = []
    for module in trainer.model.modules():
        module.register_forward_hook(lambda *_: policy_calls.append(1))
    rollouts(prompts(2), trainer)
    assert policy_calls == []
    trainer.train()
    assert rollouts.calls == 3
    logged = next(e for e in trainer.state.log_history if "reward" in e)
    assert logged["completions/max_length"] <= NEW_TOKENS
