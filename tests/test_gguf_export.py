"""GGUF-LoRA export: the LoRA pairs equal PEFT's own delta weights, and the file is laid out
the way llama.cpp reads it (checked on a stand-in base GGUF with the tiny model's shapes)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
import torch
from peft import LoraConfig, PeftModel, VeraConfig, get_peft_model
from peft.tuners.tuners_utils import BaseTunerLayer
from transformers import AutoModelForCausalLM

from loraplex.adapters.errors import InvalidAdapter
from loraplex.adapters.gguf_export import BaseLayout, adapter_as_lora, export_gguf

CONFIGS = {
    "lora": LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False),
    "rslora-patterns": LoraConfig(
        r=4,
        lora_alpha=8,
        use_rslora=True,
        alpha_pattern={"v_proj": 3.0},
        target_modules="all-linear",
        init_lora_weights=False,
    ),
    "lora-rank-pattern": LoraConfig(
        r=4, lora_alpha=8, target_modules="all-linear", rank_pattern={"o_proj": 2, "up_proj": 3},
        init_lora_weights=False,
    ),
    "vera": VeraConfig(r=4, target_modules="all-linear", save_projection=True),
    "vera-regenerated": VeraConfig(r=4, target_modules="all-linear", save_projection=False),
}  # fmt: skip


def random_adapter(checkpoint: Path, kind: str, out: Path) -> PeftModel:
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    model = get_peft_model(base, CONFIGS[kind])
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "vera_lambda" in name:  # VeRA starts as a no-op; make every factor count
                param.normal_(0.0, 0.5)
    model.save_pretrained(out)
    return model


def peft_deltas(model: PeftModel) -> dict[str, torch.Tensor]:
    prefix = "base_model.model."
    return {
        name.removeprefix(prefix): module.get_delta_weight("default")
        for name, module in model.named_modules()
        if isinstance(module, BaseTunerLayer) and hasattr(module, "get_delta_weight")
    }


def in_features_of(model: PeftModel) -> Any:
    modules = dict(model.get_base_model().named_modules())
    return lambda name: modules[name].in_features


@pytest.mark.parametrize("kind", sorted(CONFIGS))
def test_pairs_equal_peft_delta_weights(
    tiny_checkpoints: dict[str, Path], tmp_path: Path, kind: str
) -> None:
    model = random_adapter(tiny_checkpoints["gemma3"], kind, tmp_path / kind)
    pairs = adapter_as_lora(tmp_path / kind, in_features_of(model))
    expected = peft_deltas(model)
    assert {p.module for p in pairs} == expected.keys() and len(pairs) == 14
    for pair in pairs:
        assert pair.a.shape[0] == pair.b.shape[1] <= 4
        torch.testing.assert_close(pair.b @ pair.a, expected[pair.module], rtol=1e-5, atol=1e-6)


def standin_base_gguf(model: PeftModel, path: Path) -> Path:
    """A GGUF with the tiny model's architecture and weight shapes (zeros; only shapes matter)."""
    base = model.get_base_model()
    layers = base.config.num_hidden_layers
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.GEMMA3, layers)
    writer = gguf.GGUFWriter(path, "gemma3")
    writer.add_block_count(layers)
    for module_name, module in base.named_modules():
        if isinstance(module, BaseTunerLayer):
            shape = (module.out_features, module.in_features)
            writer.add_tensor(names.get_name(module_name) + ".weight", np.zeros(shape, np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize("kind", ["lora", "lora-rank-pattern", "vera", "vera-regenerated"])
def test_file_layout_matches_llama_cpp(
    tiny_checkpoints: dict[str, Path], tmp_path: Path, kind: str
) -> None:
    model = random_adapter(tiny_checkpoints["gemma3"], kind, tmp_path / kind)
    base_file = standin_base_gguf(model, tmp_path / "base.gguf")
    out = export_gguf(tmp_path / kind, base_file, tmp_path / "adapter.gguf", progress=False)
    reader = gguf.GGUFReader(out)
    assert reader.get_field("general.type").contents() == "adapter"
    assert reader.get_field("adapter.type").contents() == "lora"
    assert reader.get_field("general.architecture").contents() == "gemma3"
    assert reader.get_field("adapter.lora.alpha").contents() == 4.0  # = rank: scale 1
    # lower-rank layers are padded with zeros to the file's one rank, which changes nothing
    tensors = {t.name: np.array(t.data) for t in reader.tensors}
    layout = BaseLayout.read(base_file)
    expected = peft_deltas(model)
    assert len(tensors) == 2 * len(expected)
    for module, delta in expected.items():
        name = layout.gguf_name(module)
        a, b = tensors[f"{name}.lora_a"], tensors[f"{name}.lora_b"]
        assert a.shape == (4, delta.shape[1]) and b.shape == (delta.shape[0], 4)
        np.testing.assert_allclose(b @ a, delta.detach().numpy(), rtol=1e-4, atol=1e-6)


def test_unsupported_architecture_is_refused(
    tiny_checkpoints: dict[str, Path], tmp_path: Path
) -> None:
    random_adapter(tiny_checkpoints["llama"], "lora", tmp_path / "llama")
    writer = gguf.GGUFWriter(tmp_path / "llama.gguf", "falcon")  # a layout loraplex does not map
    writer.add_block_count(2)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(InvalidAdapter, match="supports"):
        export_gguf(tmp_path / "llama", tmp_path / "llama.gguf", tmp_path / "x.gguf")


def test_the_base_layout_is_parsed_once_per_file_version(
    tiny_checkpoints: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = random_adapter(tiny_checkpoints["gemma3"], "lora", tmp_path / "lora")
    base_file = standin_base_gguf(model, tmp_path / "base.gguf")
    parsed: list[Path] = []
    parse = BaseLayout.parse

    def counting_parse(base_gguf: Path) -> BaseLayout:
        parsed.append(base_gguf)
        return parse(base_gguf)

    monkeypatch.setattr(BaseLayout, "parse", counting_parse)
    first = export_gguf(tmp_path / "lora", base_file, tmp_path / "a.gguf", progress=False)
    second = export_gguf(tmp_path / "lora", base_file, tmp_path / "b.gguf", progress=False)
    assert len(parsed) == 1
    assert first.read_bytes() == second.read_bytes()
    stat = base_file.stat()
    os.utime(base_file, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))  # a new version
    export_gguf(tmp_path / "lora", base_file, tmp_path / "c.gguf", progress=False)
    assert len(parsed) == 2
