"""Mixed-adapter batches against PEFT run one request at a time (the independent oracle)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from engine_driver import Result, record_grouping, run
from peft_adapters import ADAPTER_CONFIGS, greedy_reference, load_reference
from transformers import AutoTokenizer

from loraplex.adapters.store import AdapterStore
from loraplex.server.engine.api import SamplingParams, SequenceRequest
from loraplex.server.engine.config import EngineConfig
from loraplex.server.engine.hf import AUTO_MERGE_AFTER_FORWARDS, HFEngine
from loraplex.server.engine.hf_model import quantization_kwargs, uses_fused_kernel

NEW_TOKENS = 12
# nf4 adds base-kernel rounding differences: up to 1.4e-3 where bitsandbytes takes its
# AVX512-BF16 kernel for PEFT's forward and torch its AMX one for ours
LOGPROB_TOLERANCE = {"fp32": 1e-4, "nf4": 3e-3}


Plan = list[tuple[str, list[int], str | None]]  # (sequence id, prompt, adapter or None)


def make_engine(
    checkpoint: Path, roots: Path | list[Path], quantization: str, mode: str = "batched"
) -> HFEngine:
    config = EngineConfig(
        checkpoint=checkpoint, quantization=quantization, adapter_mode=mode, max_lora_rank=16
    )
    return HFEngine.from_config(config, AdapterStore(roots if isinstance(roots, list) else [roots]))


def run_plan(engine: HFEngine, plan: Plan, late: Plan) -> dict[str, Result]:
    """`plan` joins at the first step, `late` at the fourth (a packed prefill of its own)."""
    return run(engine, {0: [request(engine, s, pr, a) for s, pr, a in plan],
                        3: [request(engine, s, pr, a) for s, pr, a in late]})  # fmt: skip


def adapter_folder(roots: list[Path], adapter: str | None) -> Path | None:
    """The folder PEFT loads an adapter id from (None: the base)."""
    return next((r / adapter for r in roots if adapter and (r / adapter).is_dir()), None)


def prompts(checkpoint: Path) -> list[list[int]]:
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    texts = ["The capital of France is", "hello world, HELLO", "Question: what is two plus"]
    return [tokenizer.encode(t) for t in texts]


def request(
    engine: HFEngine, seq_id: str, prompt: list[int], adapter: str | None, scale: float = 1.0
) -> SequenceRequest:
    ref = engine.store.acquire(adapter, scale) if adapter else None
    params = SamplingParams(max_new_tokens=NEW_TOKENS, logprobs=True)
    return SequenceRequest(seq_id, prompt, params, ref)


@pytest.mark.parametrize(
    ("family", "quantization"), [("gemma3", "fp32"), ("llama", "fp32"), ("gemma3", "nf4")]
)
def test_mixed_batch_matches_peft_per_request(
    tiny_checkpoints: dict[str, Path],
    tiny_adapter_roots: dict[str, Path],
    family: str,
    quantization: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    checkpoint, root = tiny_checkpoints[family], tiny_adapter_roots[family]
    engine = make_engine(checkpoint, root, quantization)
    grouped = record_grouping(engine, monkeypatch)
    p = prompts(checkpoint)
    names = [None, *ADAPTER_CONFIGS]
    # Every adapter (and the base) on two prompts, plus two rows joining mid-run: enough
    # rows sharing adapters for the engine to group them, and fewer once rows finish.
    plan = [(f"{name}-{i}", p[i], name) for i in (0, 1) for name in names]
    late = [("base-late", p[1], None), ("rslora-late", p[2], "rslora-all-r8")]
    arrivals = {
        0: [request(engine, s, pr, a) for s, pr, a in plan],
        3: [request(engine, s, pr, a) for s, pr, a in late],
    }
    results = run(engine, arrivals)
    assert any(grouped) and not all(grouped), grouped

    device_kwargs = quantization_kwargs(engine.config, engine.device)
    fused = uses_fused_kernel(engine.config)  # the reference runs the engine's 4-bit kernel
    references = {}
    for seq_id, prompt, adapter in plan + late:
        adapter_dir = root / adapter if adapter else None
        model = load_reference(checkpoint, adapter_dir, fused, **device_kwargs)
        references[seq_id] = greedy_reference(model, prompt, NEW_TOKENS)
    tolerance = LOGPROB_TOLERANCE[quantization]
    for seq_id, reference in references.items():
        got = results[seq_id]
        assert got.tokens == reference.tokens, seq_id
        assert got.logprobs == pytest.approx(reference.logprobs, abs=tolerance), seq_id
    # The oracle only means something if every adapter changes the base's answer.
    base_logprobs = references["None-0"].logprobs
    for name in ADAPTER_CONFIGS:
        assert references[f"{name}-0"].logprobs != pytest.approx(base_logprobs, abs=1e-2), name


def test_scale_zero_is_the_base_and_scale_two_doubles_alpha(
    tiny_checkpoints: dict[str, Path], tiny_adapter_roots: dict[str, Path], tmp_path: Path
) -> None:
    checkpoint, root = tiny_checkpoints["llama"], tiny_adapter_roots["llama"]
    doubled = tmp_path / "doubled"
    doubled.mkdir()
    source = root / "lora-qv-r4"
    (doubled / "adapter_model.safetensors").write_bytes(
        (source / "adapter_model.safetensors").read_bytes()
    )
    config = (
        (source / "adapter_config.json").read_text().replace('"lora_alpha": 8', '"lora_alpha": 16')
    )
    (doubled / "adapter_config.json").write_text(config)
    engine = make_engine(checkpoint, root, "fp32")
    p = prompts(checkpoint)[0]
    arrivals = {
        0: [
            request(engine, "zero", p, "lora-qv-r4", scale=0.0),
            request(engine, "two", p, "lora-qv-r4", scale=2.0),
        ]
    }
    results = run(engine, arrivals)
    base = greedy_reference(load_reference(checkpoint, None), p, NEW_TOKENS)
    two = greedy_reference(load_reference(checkpoint, doubled), p, NEW_TOKENS)
    assert results["zero"].tokens == base.tokens
    assert results["zero"].logprobs == pytest.approx(base.logprobs, abs=1e-4)
    assert results["two"].tokens == two.tokens
    assert results["two"].logprobs == pytest.approx(two.logprobs, abs=1e-4)


@pytest.mark.parametrize("family", ["gemma3", "llama"])
def test_merged_mode_matches_peft(
    tiny_checkpoints: dict[str, Path], tiny_adapter_roots: dict[str, Path], family: str
) -> None:
    checkpoint, root = tiny_checkpoints[family], tiny_adapter_roots[family]
    engine = make_engine(checkpoint, root, "fp32", mode="merged")
    original = {n: layer.base_layer.weight.clone() for n, layer in engine.base.layers.items()}
    p = prompts(checkpoint)
    arrivals = {
        0: [
            request(engine, "a", p[0], "rslora-all-r8"),
            request(engine, "b", p[1], "rslora-all-r8"),
        ],
        2: [request(engine, "vera", p[2], "vera-r16")],  # forces an unmerge while others run
    }
    results = run(engine, arrivals)
    for seq_id, prompt, adapter in [
        ("a", p[0], "rslora-all-r8"),
        ("b", p[1], "rslora-all-r8"),
        ("vera", p[2], "vera-r16"),
    ]:
        reference = greedy_reference(load_reference(checkpoint, root / adapter), prompt, NEW_TOKENS)
        assert results[seq_id].tokens == reference.tokens, seq_id
        assert results[seq_id].logprobs == pytest.approx(reference.logprobs, abs=1e-4), seq_id
    engine.merges.unmerge()
    for name, layer in engine.base.layers.items():
        assert torch.equal(layer.base_layer.weight, original[name]), name


def test_auto_mode_merges_a_lasting_owner_only_on_unquantized_bases(
    tiny_checkpoints: dict[str, Path], tiny_adapter_roots: dict[str, Path]
) -> None:
    checkpoint, root = tiny_checkpoints["llama"], tiny_adapter_roots["llama"]
    prompt = prompts(checkpoint)[0]
    reference = greedy_reference(
        load_reference(checkpoint, root / "lora-qv-r4"), prompt, NEW_TOKENS
    )
    for quantization, merges in [("fp32", True), ("nf4", False)]:
        engine = make_engine(checkpoint, root, quantization, mode="auto")
        merged_at: list[int] = []

        def watch(step: int, engine: HFEngine = engine, merged_at: list[int] = merged_at) -> None:
            if engine.merges.merged is not None:
                merged_at.append(step)

        results = run(engine, {0: [request(engine, "a", prompt, "lora-qv-r4")]}, on_step=watch)
        assert bool(merged_at) == merges, quantization
        if quantization == "fp32":  # merged only after the owner has held the batch a while
            assert merged_at[0] == AUTO_MERGE_AFTER_FORWARDS - 1
            assert results["a"].tokens == reference.tokens
            assert results["a"].logprobs == pytest.approx(reference.logprobs, abs=1e-4)
