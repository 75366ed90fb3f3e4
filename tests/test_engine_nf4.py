"""NF4 bases: the cached-scale forward, and merging an adapter into 4-bit weights and back."""

from __future__ import annotations

from pathlib import Path

import bitsandbytes as bnb
import pytest
import torch
from peft import LoraConfig
from peft_adapters import load_reference, save_adapter
from transformers import AutoModelForCausalLM, PreTrainedModel

from loraplex.adapters.store import AdapterStore
from loraplex.server.device import pick_device
from loraplex.server.engine.config import EngineConfig
from loraplex.server.engine.hf import HFEngine
from loraplex.server.engine.hf_model import quantization_kwargs
from loraplex.server.engine.nf4 import (
    CachedScalesNf4,
    DecodeKernelNf4,
    _decoded_absmax,
    repacked,
)
from loraplex.server.errors import InvalidRequest


def quantized_linear(weight: torch.Tensor, device: torch.device) -> torch.nn.Module:
    out_features, in_features = weight.shape
    layer = bnb.nn.Linear4bit(in_features, out_features, bias=True, compute_dtype=torch.float32,
                              quant_type="nf4", compress_statistics=True)  # fmt: skip
    layer.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type="nf4",
                                     compress_statistics=True)  # fmt: skip
    return layer.to(device)  # moving quantizes


def test_cached_scales_forward_equals_bitsandbytes_and_follows_weight_swaps() -> None:
    device = pick_device()
    generator = torch.Generator().manual_seed(0)
    layer = quantized_linear(torch.randn(96, 128, generator=generator), device)
    fast = CachedScalesNf4(layer)
    x = torch.randn(3, 5, 128, generator=generator).to(device)
    with torch.inference_mode():
        assert torch.equal(fast(x), layer(x))
        other = quantized_linear(torch.randn(96, 128, generator=generator), device)
        before = fast(x)
        layer.weight = other.weight  # what a merge does
        assert torch.equal(fast(x), layer(x))
        assert not torch.equal(fast(x), before)
        # Weight-first (cpu_matmul.py) changes only the order of the sums.
        torch.testing.assert_close(CachedScalesNf4(layer, weight_first=True)(x), layer(x))


def cpu_has_fused_4bit_kernel(device: torch.device) -> bool:
    cpu_flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    return device.type == "cpu" and "avx512_bf16" in cpu_flags


def nf4_layer(out_features: int, in_features: int, seed: int) -> torch.nn.Module:
    """A bias-free bf16-compute NF4 layer, as the engine's bases have."""
    generator = torch.Generator().manual_seed(seed)
    layer = bnb.nn.Linear4bit(in_features, out_features, bias=False,
                              compute_dtype=torch.bfloat16, quant_type="nf4",
                              compress_statistics=True)  # fmt: skip
    weight = torch.randn(out_features, in_features, generator=generator)
    layer.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type="nf4",
                                     compress_statistics=True)  # fmt: skip
    return layer.to("cpu").eval()


@pytest.mark.parametrize(("out_features", "in_features"), [(96, 128), (2048, 640), (100, 2048)])
def test_decode_kernel_multiplies_by_the_weights_that_prompts_dequantize(
    out_features: int, in_features: int
) -> None:
    """The kernel against bitsandbytes' own dequantization times an fp32 matmul: the same
    bf16 weights, so only the order of the fp32 sums (and the output's rounding) differs."""
    if not cpu_has_fused_4bit_kernel(torch.device("cpu")):
        pytest.skip("the NF4 decode kernel needs AVX512-BF16")
    layer = nf4_layer(out_features, in_features, seed=out_features)
    kernel, dequantizing = DecodeKernelNf4(layer), CachedScalesNf4(layer)
    generator = torch.Generator().manual_seed(1)
    with torch.inference_mode():
        identity = torch.eye(in_features)[:, None, :]  # decode rows: one token each
        dense = torch.cat([kernel(identity[i : i + 32]) for i in range(0, in_features, 32)])
        state = layer.weight.quant_state
        expected = torch.ops.bitsandbytes.dequantize_4bit.default(
            layer.weight.data, _decoded_absmax(state), state.blocksize, "nf4", state.shape,
            torch.bfloat16,
        )  # fmt: skip
        assert torch.equal(dense[:, 0].T, expected)  # each weight exactly, row by row
        for rows in (1, 3, 16, 33):
            x = torch.randn(rows, 1, in_features, generator=generator)
            exact = (x.to(torch.bfloat16).float() @ expected.float().T)[:, 0]
            got = kernel(x)[:, 0]
            assert got.dtype == x.dtype
            bound = 2e-5 * in_features**0.5 * float(exact.abs().max()) + 1e-6
            ulp = exact.abs() * 2**-8  # the bf16 output's rounding
            assert bool(((got - exact).abs() <= ulp + bound).all()), rows
        prompt = torch.randn(1, 5, in_features, generator=generator)
        assert torch.equal(kernel(prompt), dequantizing(prompt))  # prompts dequantize


def test_nf4_base_takes_the_decode_kernel_or_the_fused_one_as_configured(
    tiny_checkpoints: dict[str, Path],
) -> None:
    """auto: loraplex's decode kernel on the plain layout (merging stays possible); fused:
    bitsandbytes repacks in place, except for a base that merges; dequantize: plain."""
    checkpoint = tiny_checkpoints["gemma3"]
    device = pick_device()
    fused = cpu_has_fused_4bit_kernel(device)
    decode = DecodeKernelNf4 if fused else CachedScalesNf4
    cases = [
        ("batched", "auto", 16, decode),
        ("merged", "auto", 8, decode),
        ("batched", "fused", 64, "bitsandbytes" if fused else CachedScalesNf4),
        ("batched", "dequantize", 8, CachedScalesNf4),
        ("merged", "fused", 8, CachedScalesNf4),
    ]
    for mode, kernel, batch, forward in cases:
        config = EngineConfig(checkpoint=checkpoint, quantization="nf4", adapter_mode=mode,
                              nf4_kernel=kernel, max_batch_size=batch)  # fmt: skip
        engine = HFEngine.from_config(config, AdapterStore([]))
        layers = engine.base.layers.values()
        in_place = [repacked(lay.base_layer.weight) for lay in layers]
        case = (mode, kernel, batch)
        assert in_place == [forward == "bitsandbytes"] * len(in_place), case
        if forward == "bitsandbytes":
            assert all(lay.base_forward is lay.base_layer for lay in layers), case
            merging = config.model_copy(update={"adapter_mode": "merged"})
            with pytest.raises(InvalidRequest, match="plain layout"):  # refused, not failed later
                HFEngine(engine.base, engine.store, merging, engine.routing, device)
        else:
            assert all(type(lay.base_forward) is forward for lay in layers), case


def packed_state(weight: torch.nn.Parameter) -> list[torch.Tensor]:
    """Every tensor that defines a quantized weight: packed codes and (nested) scales."""
    state = weight.quant_state  # type: ignore[attr-defined]
    tensors = [weight.data, state.absmax, state.code]
    if state.nested:
        tensors += [state.offset, state.state2.absmax, state.state2.code]
    return [t.clone() for t in tensors]


def log_probs(model: PreTrainedModel, ids: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return torch.log_softmax(model(ids).logits[0].float(), -1)


def test_nf4_merge_restores_weights_exactly_and_stays_close_to_batched(
    tiny_checkpoints: dict[str, Path], tmp_path: Path
) -> None:
    """Merged weights equal PEFT's own NF4 merge (merge_and_unload) byte for byte. Against
    batched mode, merged differs by the rounding of W + BA to the NF4 grid: we require that to
    stay within what quantizing the base to NF4 moves its log-probabilities in the first place
    (on the tiny model, with its large random weights: 1.07 against 1.25)."""
    checkpoint = tiny_checkpoints["gemma3"]
    fp32 = AutoModelForCausalLM.from_pretrained(checkpoint)
    lora = LoraConfig(r=8, lora_alpha=8, target_modules="all-linear")
    save_adapter(fp32, lora, tmp_path / "a", seed=0, std=0.1)
    config = EngineConfig(checkpoint=checkpoint, quantization="nf4", adapter_mode="merged",
                          max_lora_rank=16)  # fmt: skip
    engine = HFEngine.from_config(config, AdapterStore([tmp_path]))
    layers = engine.base.layers
    originals = {name: packed_state(layer.base_layer.weight) for name, layer in layers.items()}
    ids = torch.tensor([engine.encode("The capital of France is")], device=engine.device)
    base = log_probs(engine.model, ids)

    ref = engine.store.acquire("a")
    engine.merges.merge(ref, engine.store.get(ref))
    merged = log_probs(engine.model, ids)
    merged_weights = {name: layer.base_layer.weight.data.clone() for name, layer in layers.items()}
    changed = [
        name
        for name, layer in layers.items()
        if not torch.equal(layer.base_layer.weight.data, originals[name][0])
    ]
    engine.merges.unmerge()

    assert changed == list(layers)  # all-linear: every layer was merged into
    for name, layer in layers.items():
        restored = packed_state(layer.base_layer.weight)
        assert all(torch.equal(a, b) for a, b in zip(restored, originals[name], strict=True))
    assert torch.equal(log_probs(engine.model, ids), base)
    # Batched mode equals PEFT on the same NF4 base (test_engine_oracle), so PEFT stands for it.
    # PEFT's merge gives the same NF4 bytes. It merges before any forward: on CPUs with
    # AVX512-BF16, bitsandbytes' forward repacks the weight into a layout its merge cannot read.
    kwargs = quantization_kwargs(config, engine.device)
    peft_merged = load_reference(checkpoint, tmp_path / "a", **kwargs).merge_and_unload()
    for name, weight in merged_weights.items():
        assert torch.equal(weight, peft_merged.get_submodule(name).weight.data), name
    batched = log_probs(load_reference(checkpoint, tmp_path / "a", **kwargs), ids)
    quantization_error = float((log_probs(fp32.eval(), ids) - base).abs().max())
    merge_error = float((merged - batched).abs().max())
    assert 0 < merge_error <= quantization_error, (merge_error, quantization_error)
