"""Ready GGUF-LoRA files as untrusted input: read back exactly, or refused with the problem
named, before llama.cpp sees them. The serving side is in integration/test_gguf_serving.py."""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

import numpy as np
import pytest
from gguf import GGUFReader, GGUFWriter
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from loraplex.adapters.errors import InvalidAdapter
from loraplex.adapters.gguf_lora import GGUF_LORA_FILE, read_gguf_lora
from loraplex.adapters.paths import resolve_adapter_dir, scan_adapter_ids
from loraplex.adapters.peft_format import BaseSpec
from loraplex.adapters.store import AdapterStore

IN, OUT, MAX_RANK = 32, 48, 16
MODULES = {
    "blk.0.attn_q.weight": "model.layers.0.self_attn.q_proj",
    "blk.0.attn_v.weight": "model.layers.0.self_attn.v_proj",
}
BASE = BaseSpec("gemma3", {m: (IN, OUT) for m in MODULES.values()}, MAX_RANK)


def write_lora(
    folder: Path,
    rank: int = 4,
    alpha: float | None = 8.0,
    arch: str = "gemma3",
    kind: str = "adapter",
    tensors: dict[str, np.ndarray] | None = None,
) -> dict[str, np.ndarray]:
    """Write folder/adapter_model.gguf as llama.cpp's converter lays it out; returns tensors."""
    rng = np.random.default_rng(rank)
    if tensors is None:
        tensors = {}
        for name in MODULES:
            tensors[f"{name}.lora_a"] = rng.normal(size=(rank, IN)).astype(np.float32)
            tensors[f"{name}.lora_b"] = rng.normal(size=(OUT, rank)).astype(np.float16)
    folder.mkdir(parents=True, exist_ok=True)
    writer = GGUFWriter(folder / GGUF_LORA_FILE, arch)
    writer.add_string("general.type", kind)
    writer.add_string("adapter.type", "lora")
    if alpha is not None:
        writer.add_float32("adapter.lora.alpha", alpha)
    for name, array in tensors.items():
        writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return tensors


def read(folder: Path) -> object:
    return read_gguf_lora("ready", folder, BASE, MODULES)


def test_weights_read_back_exactly_with_llama_cpp_scaling(tmp_path: Path) -> None:
    tensors = write_lora(tmp_path / "a", rank=4, alpha=8.0)
    weights = read_gguf_lora("ready", tmp_path / "a", BASE, MODULES)
    assert sorted(weights.modules) == sorted(MODULES.values()) and weights.rank == 4
    for name, module in MODULES.items():
        lora = weights.modules[module]
        assert lora.scaling == 8.0 / 4  # llama.cpp: alpha / rank
        assert np.array_equal(lora.a.numpy(), tensors[f"{name}.lora_a"])
        assert np.array_equal(lora.b.numpy(), tensors[f"{name}.lora_b"].astype(np.float32))
    write_lora(tmp_path / "b", alpha=None)  # no alpha: llama.cpp applies B·A unscaled
    unscaled = read_gguf_lora("x", tmp_path / "b", BASE, MODULES)
    assert {m.scaling for m in unscaled.modules.values()} == {1.0}


def broken_cases() -> dict[str, tuple[dict[str, object], str]]:
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(4, IN)).astype(np.float32), rng.normal(size=(OUT, 4)).astype(np.float32)
    q = "blk.0.attn_q.weight"
    return {
        "other architecture": ({"arch": "llama"}, "made for 'llama'"),
        "not an adapter": ({"kind": "model"}, "not a GGUF-LoRA adapter"),
        "rank over limit": ({"rank": MAX_RANK + 1}, f"outside 1..{MAX_RANK}"),
        "wrong in_features": (
            {"tensors": {f"{q}.lora_a": a[:, :-1], f"{q}.lora_b": b}},
            "do not fit a base layer",
        ),
        "ranks differ": ({"tensors": {f"{q}.lora_a": a, f"{q}.lora_b": b[:, :3]}}, "do not fit"),
        "half missing": ({"tensors": {f"{q}.lora_a": a}}, "lacks its lora_a or lora_b"),
        "unknown layer": (
            {"tensors": {"blk.0.ffn_up.weight.lora_a": a, "blk.0.ffn_up.weight.lora_b": b}},
            "not an adaptable layer",
        ),
        "stray tensor": ({"tensors": {"token_embd.weight": b}}, "unexpected tensor"),
        "no tensors": ({"tensors": {}}, "holds no LoRA tensors"),
    }


@pytest.mark.parametrize("case", sorted(broken_cases()))
def test_broken_files_are_refused_with_the_problem_named(case: str, tmp_path: Path) -> None:
    kwargs, message = broken_cases()[case]
    write_lora(tmp_path, **kwargs)  # type: ignore[arg-type]
    with pytest.raises(InvalidAdapter, match=message):
        read(tmp_path)


def test_unreadable_and_oversized_files_are_refused_before_parsing(tmp_path: Path) -> None:
    tmp_path.joinpath(GGUF_LORA_FILE).write_bytes(b"GGUF\x03\x00\x00\x00truncated")
    with pytest.raises(InvalidAdapter, match="not a readable GGUF"):
        read(tmp_path)
    with tmp_path.joinpath(GGUF_LORA_FILE).open("r+b") as file:
        file.truncate(64 << 20)  # far more than any adapter of this base can need
    with pytest.raises(InvalidAdapter, match="larger than any adapter"):
        read(tmp_path)


@settings(max_examples=120, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])  # fmt: skip
@given(data=st.data())
def test_mutated_files_give_weights_or_a_clear_error(tmp_path: Path, data: st.DataObject) -> None:
    folder = tmp_path / "fuzz"
    write_lora(folder)
    file = folder / GGUF_LORA_FILE
    raw = bytearray(file.read_bytes())
    header_end = GGUFReader(file).data_offset  # mutate metadata and tensor infos, not weights
    for _ in range(data.draw(st.integers(1, 8))):
        raw[data.draw(st.integers(0, header_end - 1))] = data.draw(st.integers(0, 255))
    file.write_bytes(bytes(raw))
    started = time.monotonic()
    with contextlib.suppress(InvalidAdapter):
        read(folder)
    assert time.monotonic() - started < 5


def test_the_store_finds_gguf_folders_and_the_hf_reader_says_where_they_belong(
    tmp_path: Path,
) -> None:
    write_lora(tmp_path / "team" / "ready")
    assert list(scan_adapter_ids([tmp_path])) == ["team/ready"]
    assert resolve_adapter_dir("team/ready", [tmp_path]) == (tmp_path / "team" / "ready").resolve()
    store = AdapterStore([tmp_path], base=BASE)  # the hf backend's PEFT reader
    with pytest.raises(InvalidAdapter, match="--backend gguf"):
        store.load("team/ready")
    [info] = store.list()
    assert info.adapter_id == "team/ready" and not info.resident
    gguf_store = AdapterStore([tmp_path], base=BASE,
                              read=lambda i, p, b: read_gguf_lora(i, p, b, MODULES))  # fmt: skip
    loaded = gguf_store.load("team/ready")
    assert (loaded.peft_type, loaded.rank, loaded.version) == ("LORA", 4, 1)
    assert loaded.nbytes == 2 * 4 * (IN + OUT) * 4  # float32 in memory, both layers
    assert gguf_store.load("team/ready").version == 1  # unchanged file: nothing reloaded
    write_lora(tmp_path / "team" / "ready", rank=8)
    assert gguf_store.load("team/ready").version == 2
