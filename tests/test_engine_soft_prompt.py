"""Soft prompts (PEFT prompt tuning) on the hf backend: each row's virtual-token embeddings
go before its prompt, in batches mixed with LoRA and base rows, against PEFT's own forward
run one request at a time (the independent oracle).

The oracle is PEFT's forward over the prompt and the tokens the engine chose (teacher
forcing): each chosen token must be that forward's argmax, with its log-probability. It is
the forward a soft prompt is trained with. PEFT 0.21's `generate` with transformers 5 is not
used: after the first token it disagrees with PEFT's own forward (its decode positions leave
the virtual tokens out), where the engine keeps the forward's positions throughout.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from engine_driver import run
from peft import PromptTuningConfig, TaskType, get_peft_model
from peft_adapters import Reference, linear_spec, load_reference
from test_engine_oracle import (
    LOGPROB_TOLERANCE,
    Plan,
    adapter_folder,
    make_engine,
    prompts,
    request,
    run_plan,
)
from transformers import AutoModelForCausalLM

from loraplex.adapters.errors import InvalidAdapter
from loraplex.adapters.peft_format import BaseSpec, read_adapter
from loraplex.adapters.store import AdapterStore
from loraplex.server.engine.config import EngineConfig
from loraplex.server.engine.hf import HFEngine
from loraplex.server.engine.hf_model import quantization_kwargs, uses_fused_kernel

SOFT_PROMPTS = {
    "soft-5": PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=5),
    "soft-12": PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=12),
}


def forward_reference(model: torch.nn.Module, prompt: list[int], chosen: list[int]) -> Reference:
    """The argmax and log-probability at each chosen token's position, from one forward over
    the prompt and the chosen tokens."""
    ids = torch.tensor([prompt + chosen])
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0].float()
    steps = logits[-len(chosen) - 1 : -1]  # the positions that chose each token
    logprobs = torch.log_softmax(steps, -1)
    picked = logprobs.gather(1, torch.tensor(chosen)[:, None])[:, 0]
    return Reference(steps.argmax(-1).tolist(), picked.tolist())


def save_soft_prompt(checkpoint: Path, config: PromptTuningConfig, out: Path, seed: int) -> None:
    """Virtual tokens drawn at the scale of the model's own token embeddings."""
    base = AutoModelForCausalLM.from_pretrained(checkpoint)
    model = get_peft_model(base, copy.deepcopy(config))
    scale = float(base.get_input_embeddings().weight.std())
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.requires_grad:
                assert "prompt_encoder" in name
                param.copy_(torch.randn(param.shape, generator=generator) * scale * 3)
    model.save_pretrained(out)


@pytest.fixture(scope="module")
def soft_roots(tiny_checkpoints: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
               ) -> dict[str, Path]:  # fmt: skip
    roots = {}
    for family, checkpoint in tiny_checkpoints.items():
        root = tmp_path_factory.mktemp(f"soft-{family}")
        for seed, (name, config) in enumerate(SOFT_PROMPTS.items()):
            save_soft_prompt(checkpoint, config, root / name, seed)
        roots[family] = root
    return roots


@pytest.mark.parametrize(
    ("family", "quantization"), [("gemma3", "fp32"), ("llama", "fp32"), ("gemma3", "nf4")]
)
def test_soft_prompt_rows_equal_peft_in_a_batch_mixed_with_lora_and_base(
    tiny_checkpoints: dict[str, Path], tiny_adapter_roots: dict[str, Path],
    soft_roots: dict[str, Path], family: str, quantization: str,
) -> None:  # fmt: skip
    checkpoint = tiny_checkpoints[family]
    roots = [soft_roots[family], tiny_adapter_roots[family]]
    engine = make_engine(checkpoint, roots, quantization)
    p = prompts(checkpoint)
    names: list[str | None] = [None, *SOFT_PROMPTS, "lora-qv-r4"]
    plan = [(f"{name}-{i}", p[i], name) for i in (0, 1) for name in names]
    late: Plan = [("soft-late", p[2], "soft-12"), ("lora-late", p[2], "lora-qv-r4")]
    results = run_plan(engine, plan, late)  # the late ones share a packed prefill

    kwargs = quantization_kwargs(engine.config, engine.device)
    fused = uses_fused_kernel(engine.config)
    for seq_id, prompt, adapter in plan + late:
        model = load_reference(checkpoint, adapter_folder(roots, adapter), fused, **kwargs)
        reference = forward_reference(model, prompt, results[seq_id].tokens)
        assert results[seq_id].tokens == reference.tokens, seq_id
        tolerance = LOGPROB_TOLERANCE[quantization]
        assert results[seq_id].logprobs == pytest.approx(reference.logprobs, abs=tolerance), seq_id
    for name in SOFT_PROMPTS:  # each soft prompt changes the answer
        assert results[f"{name}-0"].logprobs != pytest.approx(
            results["None-0"].logprobs, abs=1e-2
        ), name


def test_a_soft_prompt_counts_against_the_context_and_needs_the_hf_backend(
    tiny_checkpoints: dict[str, Path], soft_roots: dict[str, Path], tiny_llama: torch.nn.Module,
) -> None:  # fmt: skip
    checkpoint, root = tiny_checkpoints["llama"], soft_roots["llama"]
    config = EngineConfig(checkpoint=checkpoint, quantization="fp32", max_context=16)
    engine = HFEngine.from_config(config, AdapterStore([root]))
    long_prompt = prompts(checkpoint)[0][:6]  # 6 tokens fit 16, but not with 12 virtual ones
    results = run(engine, {0: [request(engine, "long", long_prompt, "soft-12")]})
    assert results["long"].error is not None and "virtual tokens" in results["long"].error
    spec = linear_spec(tiny_llama)
    no_embeddings = BaseSpec(spec.model_type, spec.linear_shapes, spec.max_rank)  # as gguf's
    with pytest.raises(InvalidAdapter, match="need --backend hf"):
        read_adapter("soft-5", root / "soft-5", no_embeddings)
