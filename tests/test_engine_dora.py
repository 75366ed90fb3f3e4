"""DoRA adapters on the hf backend, in batches mixed with LoRA, VeRA and base rows, against
PEFT's own DoRA forward run one request at a time (the independent oracle)."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from engine_driver import run
from peft import LoraConfig, get_peft_model
from peft_adapters import Reference, greedy_reference, load_reference
from test_engine_oracle import (
    LOGPROB_TOLERANCE,
    NEW_TOKENS,
    Plan,
    adapter_folder,
    make_engine,
    prompts,
    request,
    run_plan,
)
from transformers import AutoModelForCausalLM

from loraplex.adapters.errors import InvalidAdapter
from loraplex.adapters.gguf_export import adapter_as_lora
from loraplex.server.engine.hf import HFEngine
from loraplex.server.engine.hf_model import quantization_kwargs, uses_fused_kernel

DORA_CONFIGS = {
    "dora-qv-r4": LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                             use_dora=True),
    "dora-all-rslora": LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", use_dora=True,
                                  use_rslora=True, rank_pattern={"o_proj": 4}),
    "dora-mlp-alpha": LoraConfig(r=6, lora_alpha=6, target_modules=["gate_proj", "up_proj",
                                 "down_proj"], use_dora=True, alpha_pattern={"down_proj": 12}),
}  # fmt: skip
OTHERS = ("lora-qv-r4", "vera-r16")  # from the shared tiny adapter roots
# fp32 as for LoRA; under nf4 a DoRA row's gain (up to 1.5) multiplies the base kernels'
# rounding differences too: 3.4e-3 seen at the ninth token where LoRA rows stay under 3e-3
TOLERANCE = {**LOGPROB_TOLERANCE, "nf4": 6e-3}


def save_dora(checkpoint: Path, config: LoraConfig, out: Path, seed: int) -> None:
    """A trained-looking DoRA adapter: random A and B, and magnitudes 0.5-1.5 times the
    norms PEFT starts them at, so both the direction and the magnitude change the output."""
    base = AutoModelForCausalLM.from_pretrained(checkpoint)
    model = get_peft_model(base, copy.deepcopy(config))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_magnitude_vector" in name:
                param.mul_(0.5 + torch.rand(param.shape, generator=generator))
            elif "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
    model.save_pretrained(out)


@pytest.fixture(scope="module")
def dora_roots(tiny_checkpoints: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
               ) -> dict[str, Path]:  # fmt: skip
    roots = {}
    for family, checkpoint in tiny_checkpoints.items():
        root = tmp_path_factory.mktemp(f"dora-{family}")
        for seed, (name, config) in enumerate(DORA_CONFIGS.items()):
            save_dora(checkpoint, config, root / name, seed)
        roots[family] = root
    return roots


def references(
    checkpoint: Path, roots: list[Path], engine: HFEngine, plan: Plan
) -> dict[str, Reference]:
    kwargs = quantization_kwargs(engine.config, engine.device)
    fused = uses_fused_kernel(engine.config)
    found = {}
    for seq_id, prompt, adapter in plan:
        model = load_reference(checkpoint, adapter_folder(roots, adapter), fused, **kwargs)
        found[seq_id] = greedy_reference(model, prompt, NEW_TOKENS)
    return found


@pytest.mark.parametrize(
    ("family", "quantization"), [("gemma3", "fp32"), ("llama", "fp32"), ("gemma3", "nf4")]
)
def test_dora_rows_equal_peft_in_a_batch_mixed_with_lora_vera_and_base(
    tiny_checkpoints: dict[str, Path], tiny_adapter_roots: dict[str, Path],
    dora_roots: dict[str, Path], family: str, quantization: str,
) -> None:  # fmt: skip
    checkpoint = tiny_checkpoints[family]
    roots = [dora_roots[family], tiny_adapter_roots[family]]
    engine = make_engine(checkpoint, roots, quantization)
    p = prompts(checkpoint)
    names: list[str | None] = [None, *DORA_CONFIGS, *OTHERS]
    plan = [(f"{name}-{i}", p[i], name) for i in (0, 1) for name in names]
    late: Plan = [("dora-late", p[2], "dora-all-rslora")]  # joins mid-run: a packed prefill
    results = run_plan(engine, plan, late)
    expected = references(checkpoint, roots, engine, plan + late)
    for seq_id, reference in expected.items():
        assert results[seq_id].tokens == reference.tokens, seq_id
        assert results[seq_id].logprobs == pytest.approx(
            reference.logprobs, abs=TOLERANCE[quantization]
        ), seq_id
    base = expected["None-0"].logprobs
    for name in DORA_CONFIGS:  # each DoRA adapter changes the answer
        assert expected[f"{name}-0"].logprobs != pytest.approx(base, abs=1e-2), name


def test_a_dora_adapter_is_never_merged_and_still_matches_peft(
    tiny_checkpoints: dict[str, Path], dora_roots: dict[str, Path]
) -> None:
    checkpoint, root = tiny_checkpoints["llama"], dora_roots["llama"]
    engine = make_engine(checkpoint, root, "fp32", mode="merged")
    plan = [("dora", prompts(checkpoint)[0], "dora-all-rslora")]
    results = run(engine, {0: [request(engine, s, pr, a) for s, pr, a in plan]})
    assert engine.merges.merged is None
    reference = references(checkpoint, [root], engine, plan)["dora"]
    assert results["dora"].tokens == reference.tokens
    assert results["dora"].logprobs == pytest.approx(reference.logprobs, abs=1e-4)


def test_a_dora_row_joining_a_merged_batch_takes_its_gain_from_the_unmerged_base(
    tiny_checkpoints: dict[str, Path], tiny_adapter_roots: dict[str, Path],
    dora_roots: dict[str, Path],
) -> None:  # fmt: skip
    checkpoint = tiny_checkpoints["llama"]
    roots = [dora_roots["llama"], tiny_adapter_roots["llama"]]
    engine = make_engine(checkpoint, roots, "fp32", mode="merged")
    p = prompts(checkpoint)
    plan = [("lora", p[0], "rslora-all-r8")]  # owns the batch: merged into the weights
    late = [("dora", p[1], "dora-all-rslora")]
    merged_at_join: list[bool] = []
    results = run(engine, {0: [request(engine, s, pr, a) for s, pr, a in plan],
                           3: [request(engine, s, pr, a) for s, pr, a in late]},
                  on_step=lambda step: merged_at_join.append(engine.merges.merged is not None)
                  )  # fmt: skip
    assert merged_at_join[2]  # the LoRA adapter was merged when the DoRA row arrived
    reference = references(checkpoint, roots, engine, plan + late)
    for seq_id in ("lora", "dora"):
        assert results[seq_id].tokens == reference[seq_id].tokens, seq_id
        assert results[seq_id].logprobs == pytest.approx(reference[seq_id].logprobs, abs=1e-4)


def test_dora_refuses_other_scales_and_the_gguf_form(
    tiny_checkpoints: dict[str, Path], dora_roots: dict[str, Path]
) -> None:
    engine = make_engine(tiny_checkpoints["llama"], dora_roots["llama"], "fp32")
    with pytest.raises(InvalidAdapter, match="adapter_scale 1 only"):
        engine.store.acquire("dora-qv-r4", scale=0.5)
    ref = engine.store.acquire("dora-qv-r4", scale=1.0)  # scale 1 is served
    engine.store.release(ref)
    with pytest.raises(InvalidAdapter, match="use_dora"):
        adapter_as_lora(dora_roots["llama"] / "dora-qv-r4", lambda _module: 64)
