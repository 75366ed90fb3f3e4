"""GRPO rollouts on loraplex's own engine (`train-adapter --method grpo --rollouts engine`).

TRL calls `rollout_func(prompts, trainer)` once per generation batch, its prompts already
repeated `--num-generations` times. The engine runs over the trainer's own base: the model's
modules are copied but its weight tensors are shared (no second copy of the base), and PEFT's
adapter layers are left out, so the engine computes the base with its own kernels and applies
the policy as one of its adapters. Each call installs the policy's current weights as a new
version of one adapter held in memory (nothing is written to disk), then samples every
completion in continuous batches and returns the token ids with each sampled token's
log-probability (TRL applies its importance-sampling correction to them only with vLLM).
"""

from __future__ import annotations

import copy
import json
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from loraplex.adapters.peft_format import BaseSpec, adapter_weights
from loraplex.adapters.store import AdapterStore
from loraplex.adapters.types import AdapterRef
from loraplex.adapters.weights import AdapterWeights
from loraplex.server.engine.api import SamplingParams, SequenceRequest, StepPlan
from loraplex.server.engine.config import EngineConfig, OutputHead
from loraplex.server.engine.hf import HFEngine

POLICY = "grpo-policy"
MIN_ENGINE_RANK = 64  # the engine's rank limit: at least its default


def engine_view(model: Any) -> Any:
    """The PEFT model's base as a model of its own: new modules over the same parameter and
    buffer tensors, with PEFT's adapter layers replaced by the base layers they wrap, and
    their class's own forwards (TRL patches the model's `forward` with a closure over the
    original model, which a copy would still call)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    base = model.get_base_model()
    shared = {id(t): t for t in (*base.parameters(), *base.buffers())}
    view = copy.deepcopy(base, shared)
    for name, module in list(view.named_modules()):
        module.__dict__.pop("forward", None)
        if isinstance(module, BaseTunerLayer):
            parent, _, child = name.rpartition(".")
            setattr(view.get_submodule(parent), child, module.get_base_layer())
    return view


def policy_weights(model: Any, base: BaseSpec) -> AdapterWeights:
    """The PEFT model's active adapter as the engine's weights: its saved tensors and config,
    copied (the optimizer goes on changing the live ones), checked as a directory would be."""
    from peft import get_peft_model_state_dict

    name = model.active_adapter
    config = json.loads(json.dumps(model.peft_config[name].to_dict(), default=_jsonable))
    state = get_peft_model_state_dict(model, adapter_name=name)
    tensors = {k: v.detach().to(torch.float32, copy=True) for k, v in state.items()}
    return adapter_weights(POLICY, config, tensors, base)


def _jsonable(value: object) -> object:
    return sorted(value) if isinstance(value, set | frozenset) else str(value)


@dataclass
class _Completion:
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)


class EngineRollouts:
    """TRL's `rollout_func`: completions sampled by an HFEngine over the trainer's base."""

    def __init__(
        self,
        checkpoint: Path,
        rank: int,
        batch_size: int,
        seed: int,
        output_head: OutputHead = "auto",
    ) -> None:
        """`output_head`: the engine's (EngineConfig.output_head); auto takes the int8 head
        where it times faster, a quarter of the vocabulary's fp32 bytes."""
        self.checkpoint, self.rank, self.batch_size, self.seed = checkpoint, rank, batch_size, seed
        self.output_head = output_head
        self.store = AdapterStore([], max_resident=2)
        self.engine: HFEngine | None = None
        self.calls = 0
        self.full_length = False  # benchmarks: every completion runs to max_completion_length

    def __call__(self, prompts: list[str], trainer: Any) -> dict[str, list[Any]]:
        policy = trainer.accelerator.unwrap_model(trainer.model)
        engine = self._engine(policy, trainer.processing_class)
        self.store.install(POLICY, policy_weights(policy, engine.base.spec))
        prompt_ids = [list(ids) for ids in trainer.processing_class(text=prompts)["input_ids"]]
        ref = self.store.acquire(POLICY)
        try:
            completions = self._sample(engine, prompt_ids, self._sampling(trainer), ref)
        finally:
            self.store.release(ref)
        self.calls += 1
        return {
            "prompt_ids": prompt_ids,
            "completion_ids": [c.token_ids for c in completions],
            "logprobs": [c.logprobs for c in completions],
        }

    def _engine(self, policy: Any, tokenizer: Any) -> HFEngine:
        if self.engine is None:
            config = EngineConfig(
                checkpoint=self.checkpoint,
                adapter_mode="batched",  # merging would write into the trainer's base weights
                output_head=self.output_head,
                adapter_slots=1,
                max_lora_rank=max(self.rank, MIN_ENGINE_RANK),
                max_batch_size=self.batch_size,
            )
            self.engine = HFEngine.around(engine_view(policy), tokenizer, config, self.store)
        return self.engine

    def _sampling(self, trainer: Any) -> dict[str, Any]:
        return {
            "max_new_tokens": trainer.max_completion_length,
            "temperature": trainer.temperature,
            "top_p": trainer.top_p,
            "top_k": trainer.top_k or 0,
            "min_p": trainer.min_p or 0.0,
            "repetition_penalty": trainer.repetition_penalty,
            "logprobs": True,
            "ignore_eos": self.full_length,
        }

    def _sample(
        self, engine: HFEngine, prompt_ids: list[list[int]], sampling: dict[str, Any],
        ref: AdapterRef,
    ) -> list[_Completion]:  # fmt: skip
        """Every prompt's completion, rows joining as others finish (continuous batching)."""
        first_seed = self.seed * 1_000_003 + self.calls * len(prompt_ids)
        waiting = deque(
            SequenceRequest(str(i), ids, SamplingParams(seed=first_seed + i, **sampling), ref)
            for i, ids in enumerate(prompt_ids)
        )
        completions = [_Completion() for _ in prompt_ids]
        while waiting or engine.running():
            room = engine.max_batch_size - len(engine.running())
            joining = [waiting.popleft() for _ in range(min(room, len(waiting)))]
            for event in engine.step(StepPlan(prefill=joining, decode=engine.running())):
                if event.deferred:  # the engine could not take it this step
                    waiting.appendleft(next(r for r in joining if r.seq_id == event.seq_id))
                    continue
                if event.error is not None:
                    raise RuntimeError(f"rollout {event.seq_id} failed: {event.error}")
                if event.token_id is not None:
                    completion = completions[int(event.seq_id)]
                    completion.token_ids.append(event.token_id)
                    completion.logprobs.append(float(event.logprob or 0.0))
        return completions
