"""Adapters whose math loraplex does not serve, or whose values would overflow, are refused at
load with a message naming the cause, never served as something else."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import LoraConfig, VeraConfig
from peft_adapters import save_adapter
from safetensors.torch import load_file, save_file

from loraplex.adapters.errors import InvalidAdapter
from loraplex.adapters.peft_config import INERT_FIELDS, MATH_FIELDS, READ_FIELDS
from loraplex.adapters.peft_format import CONFIG_FILE, WEIGHTS_FILE, BaseSpec, read_adapter
from loraplex.adapters.weights import MAX_DELTA_GAIN, LoraWeights, delta_gain


@pytest.fixture(scope="module")
def saved(tiny_llama: torch.nn.Module, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("refusals")
    save_adapter(tiny_llama, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]), root / "lora", 1)
    save_adapter(tiny_llama, VeraConfig(r=8, target_modules=["q_proj", "v_proj"]), root / "vera", 2)
    return root


def copy_of(saved: Path, kind: str, tmp_path: Path) -> Path:
    target = tmp_path / kind
    shutil.copytree(saved / kind, target)
    return target


def edit_config(adapter_dir: Path, **changes: Any) -> None:
    config = json.loads((adapter_dir / CONFIG_FILE).read_text())
    (adapter_dir / CONFIG_FILE).write_text(json.dumps({**config, **changes}))


def edit_tensors(adapter_dir: Path, edit: Any) -> None:
    tensors = load_file(adapter_dir / WEIGHTS_FILE)
    save_file({name: edit(name, t) for name, t in tensors.items()}, adapter_dir / WEIGHTS_FILE)


# ---- config fields ------------------------------------------------------------------------


def test_every_field_peft_writes_is_read_known_inert_or_refused_when_set() -> None:
    """A PEFT release that adds a field makes this fail, so the field gets classified."""
    known = READ_FIELDS | INERT_FIELDS | set(MATH_FIELDS) | {"init_lora_weights"}
    for config_class in (LoraConfig, VeraConfig):
        fields = {f.name for f in dataclasses.fields(config_class)}
        fields -= {"num_virtual_tokens", "token_dim", "num_transformer_submodules",
                   "num_attention_heads", "num_layers"}  # fmt: skip  # prompt learning only
        assert fields <= known, sorted(fields - known)


def test_a_config_saved_by_peft_with_defaults_loads(saved: Path, tiny_llama_spec: BaseSpec) -> None:
    assert isinstance(read_adapter("plain", saved / "lora", tiny_llama_spec), LoraWeights)
    read_adapter("plain-vera", saved / "vera", tiny_llama_spec)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("alora_invocation_tokens", [5, 6, 7]),
        ("use_dora", True),  # served, but a plain LoRA's tensors lack its magnitude vectors
        ("layer_replication", [[0, 2], [1, 2]]),
        ("lora_bias", True),
        ("use_qalora", True),
        ("trainable_token_indices", [3, 4]),
        ("target_parameters", ["mlp.experts.gate_up_proj"]),
        ("arrow_config", {"top_k": 2}),
        ("kasa_config", {}),  # an empty object is still a request for KaSA: refused below
    ],
)
def test_fields_that_change_the_math_are_refused_naming_the_field(
    saved: Path, tiny_llama_spec: BaseSpec, tmp_path: Path, field: str, value: Any
) -> None:
    if value == {}:
        value = {"enabled": True}
    case = copy_of(saved, "lora", tmp_path)
    edit_config(case, **{field: value})
    with pytest.raises(InvalidAdapter, match=field):
        read_adapter("variant", case, tiny_llama_spec)


@pytest.mark.parametrize("init", ["pissa", "pissa_niter_4", "olora", "corda", "loftq", "lora_ga"])
def test_initializations_that_rewrote_the_base_are_refused(
    saved: Path, tiny_llama_spec: BaseSpec, tmp_path: Path, init: str
) -> None:
    case = copy_of(saved, "lora", tmp_path)
    edit_config(case, init_lora_weights=init)
    with pytest.raises(InvalidAdapter, match=r"init_lora_weights.*convert"):
        read_adapter("pissa", case, tiny_llama_spec)


@pytest.mark.parametrize("init", [True, False, "gaussian", "eva", "orthogonal", "mica"])
def test_initializations_that_leave_the_base_alone_load(
    saved: Path, tiny_llama_spec: BaseSpec, tmp_path: Path, init: object
) -> None:
    case = copy_of(saved, "lora", tmp_path)
    edit_config(case, init_lora_weights=init)
    read_adapter("init", case, tiny_llama_spec)


def test_an_unknown_field_is_refused_when_set_and_ignored_when_unset(
    saved: Path, tiny_llama_spec: BaseSpec, tmp_path: Path
) -> None:
    case = copy_of(saved, "lora", tmp_path)
    edit_config(case, use_future_variant=None, future_config={}, future_flag=False)
    read_adapter("future-defaults", case, tiny_llama_spec)
    edit_config(case, use_future_variant=True)
    with pytest.raises(InvalidAdapter, match="unknown config field 'use_future_variant'"):
        read_adapter("future", case, tiny_llama_spec)


# ---- tensors ------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2, torch.int8])
def test_unsupported_dtypes_are_refused_naming_the_dtype(
    saved: Path, tiny_llama_spec: BaseSpec, tmp_path: Path, dtype: torch.dtype
) -> None:
    case = copy_of(saved, "lora", tmp_path)
    edit_tensors(case, lambda name, t: t.to(dtype) if "lora_B" in name else t)
    safetensors_name = {torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2"}
    with pytest.raises(InvalidAdapter, match=safetensors_name.get(dtype, "I8")):
        read_adapter("fp8", case, tiny_llama_spec)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_float_dtypes_load(
    saved: Path, tiny_llama_spec: BaseSpec, tmp_path: Path, dtype: torch.dtype
) -> None:
    case = copy_of(saved, "lora", tmp_path)
    edit_tensors(case, lambda name, t: t.to(dtype))
    read_adapter("half", case, tiny_llama_spec)


@pytest.mark.parametrize("target", ["embed_tokens", "lm_head"])
def test_embedding_and_head_targets_are_refused_as_targets(
    tiny_llama: torch.nn.Module, tiny_llama_spec: BaseSpec, tmp_path: Path, target: str
) -> None:
    config = LoraConfig(r=4, target_modules=["q_proj", target])
    save_adapter(tiny_llama, config, tmp_path / target, seed=3)
    with pytest.raises(InvalidAdapter, match=rf"adapts {target}.*not supported") as refused:
        read_adapter("embed", tmp_path / target, tiny_llama_spec)
    assert "limit" not in str(refused.value)


# ---- overflow -----------------------------------------------------------------------------


def scaled_by(factor: float) -> Any:
    return lambda name, t: t * factor


@pytest.mark.parametrize(
    ("kind", "tensors", "config"),
    [
        ("lora", scaled_by(1e18), {}),
        ("lora", None, {"lora_alpha": 1e38}),
        ("lora", scaled_by(1e6), {"alpha_pattern": {"v_proj": 6e7}}),
        ("vera", lambda name, t: t * 1e18 if "lambda" in name else t, {}),
    ],
)
def test_adapters_whose_delta_would_overflow_are_refused(
    saved: Path, tiny_llama_spec: BaseSpec, tmp_path: Path, kind: str, tensors: Any, config: dict
) -> None:
    case = copy_of(saved, kind, tmp_path)
    if tensors is not None:
        edit_tensors(case, tensors)
    edit_config(case, **config)
    with pytest.raises(InvalidAdapter, match="overflow") as refused:
        read_adapter("huge", case, tiny_llama_spec)
    assert "proj" in str(refused.value)  # names the module


def test_the_gain_bound_holds_for_real_inputs(saved: Path, tiny_llama_spec: BaseSpec) -> None:
    """The bound is an upper bound of |ΔW x|∞ / |x|∞, and well under the limit for a
    trained-sized adapter."""
    weights = read_adapter("plain", saved / "lora", tiny_llama_spec)
    _, gain = delta_gain(weights)
    assert gain < MAX_DELTA_GAIN / 1e12
    for module in weights.modules.values():
        assert isinstance(module, type(next(iter(weights.modules.values()))))
        x = torch.randn(64, module.a.shape[1])
        observed = (x @ module.delta_weight().T).abs().amax(1) / x.abs().amax(1)
        assert float(observed.max()) <= gain * (1 + 1e-5)
