"""Adapter files are untrusted: mutated configs and safetensors headers always end in a clear
InvalidAdapter (or a valid adapter), never another exception, a hang or a huge allocation.

The example budget is fixed and the search derandomized, so CI time and results are stable.
"""

from __future__ import annotations

import json
import shutil
import struct
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from peft import LoraConfig, VeraConfig
from peft_adapters import linear_spec, save_adapter
from safetensors.torch import load_file, save_file
from tiny import build_model, build_tokenizer

from loraplex.adapters.errors import InvalidAdapter
from loraplex.adapters.peft_format import CONFIG_FILE, WEIGHTS_FILE, BaseSpec, read_adapter
from loraplex.adapters.weights import AdapterWeights

FUZZ = settings(
    max_examples=150,
    derandomize=True,
    deadline=5000,  # ms per example: a hang fails the run instead of stalling it
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                 max_size=4),
    max_leaves=12,
)  # fmt: skip
CONFIG_KEYS = ["peft_type", "r", "lora_alpha", "rank_pattern", "alpha_pattern", "use_rslora",
               "use_dora", "bias", "modules_to_save", "target_modules", "fan_in_fan_out",
               "projection_prng_key", "save_projection"]  # fmt: skip


@pytest.fixture(scope="module")
def base_and_adapters(tmp_path_factory: pytest.TempPathFactory) -> tuple[BaseSpec, Path]:
    model = build_model("llama", build_tokenizer())
    root = tmp_path_factory.mktemp("fuzz-adapters")
    lora = LoraConfig(r=4, target_modules=["q_proj", "v_proj"])
    save_adapter(model, lora, root / "lora", seed=1)
    save_adapter(model, VeraConfig(r=8, target_modules=["q_proj", "v_proj"]), root / "vera", 2)
    return linear_spec(model), root


def attempt(adapter_dir: Path, base: BaseSpec) -> None:
    """The property: a valid adapter or InvalidAdapter naming it, and quickly."""
    started = time.monotonic()
    try:
        assert isinstance(read_adapter("fuzzed", adapter_dir, base), AdapterWeights)
    except InvalidAdapter as err:
        assert err.adapter_id == "fuzzed" and str(err)
    assert time.monotonic() - started < 5


def scratch_copy(source: Path, tmp: Path) -> Path:
    target = tmp / "case"
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(source, target)
    return target


@FUZZ
@given(
    kind=st.sampled_from(["lora", "vera"]),
    changes=st.dictionaries(
        st.sampled_from(CONFIG_KEYS) | st.text(max_size=6), JSON | st.just(None), max_size=4
    ),
)
def test_mutated_configs(
    base_and_adapters: tuple[BaseSpec, Path], tmp_path: Path, kind: str, changes: dict[str, Any]
) -> None:  # fmt: skip
    base, root = base_and_adapters
    case = scratch_copy(root / kind, tmp_path)
    config = json.loads((case / CONFIG_FILE).read_text())
    (case / CONFIG_FILE).write_text(json.dumps({**config, **changes}))
    attempt(case, base)


@FUZZ
@given(raw=st.binary(max_size=200) | JSON.map(lambda v: json.dumps(v).encode()))
def test_config_files_that_are_not_objects(
    base_and_adapters: tuple[BaseSpec, Path], tmp_path: Path, raw: bytes
) -> None:
    base, root = base_and_adapters
    case = scratch_copy(root / "lora", tmp_path)
    (case / CONFIG_FILE).write_bytes(raw)
    attempt(case, base)


ENTRY = st.fixed_dictionaries(
    {},
    optional={
        "dtype": st.sampled_from(["F32", "F16", "BF16", "I64", "U8", "BOOL", "X"]) | JSON,
        "shape": st.lists(st.integers(-2, 1 << 40), max_size=3) | JSON,
        "data_offsets": st.lists(st.integers(-2, 1 << 40), max_size=3) | JSON,
    },
)


def split_safetensors(data: bytes) -> tuple[dict[str, Any], bytes]:
    (length,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + length]), data[8 + length :]


@FUZZ
@given(
    kind=st.sampled_from(["lora", "vera"]),
    edits=st.dictionaries(st.integers(0, 7), ENTRY | JSON, max_size=3),
    claimed_length=st.none() | st.integers(0, (1 << 64) - 1),
    cut=st.none() | st.integers(0, 4096),
)
def test_mutated_safetensors_headers(
    base_and_adapters: tuple[BaseSpec, Path], tmp_path: Path, kind: str,
    edits: dict[int, Any], claimed_length: int | None, cut: int | None,
) -> None:  # fmt: skip
    base, root = base_and_adapters
    case = scratch_copy(root / kind, tmp_path)
    header, data = split_safetensors((case / WEIGHTS_FILE).read_bytes())
    names = sorted(header)
    for index, entry in edits.items():
        header[names[index % len(names)]] = entry
    raw = json.dumps(header).encode()
    blob = struct.pack("<Q", len(raw) if claimed_length is None else claimed_length) + raw + data
    (case / WEIGHTS_FILE).write_bytes(blob if cut is None else blob[:cut])
    attempt(case, base)


def test_a_claimed_100_gb_tensor_is_refused_before_reading(
    base_and_adapters: tuple[BaseSpec, Path], tmp_path: Path
) -> None:
    base, root = base_and_adapters
    case = scratch_copy(root / "lora", tmp_path)
    header, _ = split_safetensors((case / WEIGHTS_FILE).read_bytes())
    name = sorted(k for k in header if k != "__metadata__")[0]
    nbytes = 100 << 30
    header = {name: {"dtype": "F32", "shape": [nbytes // 4 // 16, 16], "data_offsets": [0, nbytes]}}
    raw = json.dumps(header).encode()
    with (case / WEIGHTS_FILE).open("wb") as file:
        file.write(struct.pack("<Q", len(raw)) + raw)
        file.truncate(8 + len(raw) + nbytes)  # sparse: the file really is 100 GB long
    started = time.monotonic()
    with pytest.raises(InvalidAdapter, match="limit"):
        read_adapter("huge", case, base)
    assert time.monotonic() - started < 1


@pytest.mark.parametrize("kind", ["lora", "vera"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_a_non_finite_weight_is_refused_naming_its_tensor(
    base_and_adapters: tuple[BaseSpec, Path], tmp_path: Path, kind: str, bad: float
) -> None:
    base, root = base_and_adapters
    case = scratch_copy(root / kind, tmp_path)
    tensors = load_file(case / WEIGHTS_FILE)
    name = sorted(k for k in tensors if "lora_B" in k or "lambda_b" in k)[-1]
    tensors[name].view(-1)[-1] = bad  # one value among many finite ones
    save_file(tensors, case / WEIGHTS_FILE)
    module = name.removesuffix(".weight").rsplit(".", 1)[0]
    with pytest.raises(InvalidAdapter, match="finite") as refused:
        read_adapter("poisoned", case, base)
    assert module.rsplit(".", 1)[-1] in str(refused.value)
