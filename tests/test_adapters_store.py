"""The adapter store: paths, validation errors, versions, pins and LRU residency."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, VeraConfig, get_peft_model
from peft_adapters import save_adapter
from tiny import build_model, build_tokenizer

from loraplex.adapters.errors import (
    AdapterCapacityExceeded,
    AdapterInUse,
    AdapterNotFound,
    InvalidAdapter,
)
from loraplex.adapters.peft_format import BaseSpec, read_adapter, regenerate_projection
from loraplex.adapters.store import AdapterStore
from loraplex.adapters.weights import AdapterWeights


@pytest.fixture(scope="module")
def root(tiny_llama: torch.nn.Module, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("root")
    for i in range(4):
        save_adapter(tiny_llama, LoraConfig(r=4, target_modules=["q_proj"]), root / f"a{i}", seed=i)
    save_adapter(tiny_llama, LoraConfig(r=32, target_modules=["q_proj"]), root / "too-big", seed=9)
    return root


def store_over(root: Path, tiny_llama_spec: BaseSpec, **limits: int) -> AdapterStore:
    return AdapterStore([root], base=tiny_llama_spec, **limits)


def copy_adapter(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True)
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


@pytest.mark.parametrize(
    "bad_id", ["../a0", "/etc", "a0/../../x", "", "a\\b", "./a0", ".a0", "x/.git"]
)
def test_ids_that_escape_the_root_are_refused(
    root: Path, tiny_llama_spec: BaseSpec, bad_id: str
) -> None:
    with pytest.raises(InvalidAdapter) as err:
        store_over(root, tiny_llama_spec).load(bad_id)
    assert err.value.adapter_id == bad_id


def test_symlink_leading_outside_is_refused(
    root: Path, tiny_llama_spec: BaseSpec, tmp_path: Path
) -> None:
    outside = copy_adapter(root / "a0", tmp_path / "outside")
    inner = tmp_path / "root"
    inner.mkdir()
    os.symlink(outside, inner / "sneaky")
    with pytest.raises(InvalidAdapter, match="outside"):
        store_over(inner, tiny_llama_spec).load("sneaky")


def test_unknown_id_is_not_found(root: Path, tiny_llama_spec: BaseSpec) -> None:
    with pytest.raises(AdapterNotFound):
        store_over(root, tiny_llama_spec).acquire("nope")


def test_pickle_only_adapter_is_refused(
    root: Path, tiny_llama_spec: BaseSpec, tmp_path: Path
) -> None:
    bad = copy_adapter(root / "a0", tmp_path / "pickled")
    (bad / "adapter_model.safetensors").rename(bad / "adapter_model.bin")
    with pytest.raises(InvalidAdapter, match="pickled weights are never loaded"):
        read_adapter("pickled", bad, tiny_llama_spec)


def test_corrupt_and_missing_files_are_refused(
    root: Path, tiny_llama_spec: BaseSpec, tmp_path: Path
) -> None:
    bad = copy_adapter(root / "a0", tmp_path / "corrupt")
    data = (bad / "adapter_model.safetensors").read_bytes()
    (bad / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(InvalidAdapter, match="corrupt"):
        read_adapter("corrupt", bad, tiny_llama_spec)
    (bad / "adapter_config.json").unlink()
    with pytest.raises(InvalidAdapter, match=r"adapter_config\.json is missing"):
        read_adapter("corrupt", bad, tiny_llama_spec)


def test_rank_over_limit_is_refused(root: Path, tiny_llama_spec: BaseSpec) -> None:
    with pytest.raises(InvalidAdapter, match="over the limit") as err:
        store_over(root, tiny_llama_spec).load("too-big")
    assert err.value.adapter_id == "too-big"


def test_wrong_architecture_and_type_are_refused(root: Path, tmp_path: Path) -> None:
    other = build_model("gemma3", build_tokenizer())
    wrong_shape = BaseSpec(
        "other", {f"model.layers.{i}.self_attn.q_proj": (32, 64) for i in range(2)}, 16
    )
    with pytest.raises(InvalidAdapter, match="shape"):
        read_adapter("a0", root / "a0", wrong_shape)
    with pytest.raises(InvalidAdapter, match="not a linear layer"):
        read_adapter("a0", root / "a0", BaseSpec("gemma3", {"x.q_proj": (64, 64)}, 16))
    bad = copy_adapter(root / "a0", tmp_path / "ia3")
    config = json.loads((bad / "adapter_config.json").read_text())
    (bad / "adapter_config.json").write_text(json.dumps({**config, "peft_type": "IA3"}))
    with pytest.raises(InvalidAdapter, match="not supported"):
        read_adapter("ia3", bad, BaseSpec("x", {}, 16))
    del other


def test_vera_projection_regenerated_like_peft(tiny_llama: torch.nn.Module) -> None:
    model = get_peft_model(
        build_model("llama", build_tokenizer()),
        VeraConfig(r=8, target_modules=["q_proj", "down_proj"], projection_prng_key=7),
    )
    peft_a = model.base_model.vera_A["default"]
    peft_b = model.base_model.vera_B["default"]
    mine = regenerate_projection(7, 8, peft_a.shape[1], peft_b.shape[0])
    assert torch.equal(mine.a, peft_a) and torch.equal(mine.b, peft_b)


def test_lru_eviction_skips_pinned_and_in_use(root: Path, tiny_llama_spec: BaseSpec) -> None:
    store = store_over(root, tiny_llama_spec, max_resident=2)
    store.pin("a0")
    held = store.acquire("a1")
    with pytest.raises(AdapterCapacityExceeded):
        store.load("a2")  # a0 pinned, a1 in use
    store.release(held)
    store.load("a2")  # evicts a1, the idle one
    resident = {i.adapter_id for i in store.list() if i.resident}
    assert resident == {"a0", "a2"}
    store.pin("a0", False)
    store.acquire("a3")  # lazy load evicts a0 now (least recently used, unpinned, idle)
    assert {i.adapter_id for i in store.list() if i.resident} == {"a2", "a3"}


def test_no_room_is_refused_at_once_without_reading_or_losing_the_current_version(
    root: Path, tiny_llama_spec: BaseSpec
) -> None:
    """The scheduler retries such loads after each release: a refusal must cost no read."""
    reads: list[str] = []

    def read(adapter_id: str, path: Path, base: BaseSpec) -> AdapterWeights:
        reads.append(adapter_id)
        return read_adapter(adapter_id, path, base)

    store = AdapterStore([root], base=tiny_llama_spec, max_resident=1, read=read)
    held = store.acquire("a0")
    assert store.any_in_use()
    for _ in range(3):
        with pytest.raises(AdapterCapacityExceeded, match="in use"):
            store.acquire("a1")
    assert reads == ["a0"]
    store.release(held)
    assert not store.any_in_use()
    store.pin("a0")
    with pytest.raises(AdapterCapacityExceeded, match="pinned"):
        store.load("a1")
    assert [i.adapter_id for i in store.list() if i.resident] == ["a0"]


def test_byte_limit_evicts(root: Path, tiny_llama_spec: BaseSpec) -> None:
    one = store_over(root, tiny_llama_spec).load("a0").nbytes
    store = store_over(root, tiny_llama_spec, max_resident_bytes=one * 2)
    for name in ("a0", "a1", "a2"):
        store.load(name)
    assert store.resident_bytes() <= one * 2


def test_newer_version_keeps_the_held_one(
    root: Path, tiny_llama_spec: BaseSpec, tmp_path: Path
) -> None:
    copy_adapter(root / "a0", tmp_path / "x")
    store = store_over(tmp_path, tiny_llama_spec, max_resident=1)
    ref = store.acquire("x")
    old = store.get(ref)
    copy_adapter(root / "a1", tmp_path / "new")
    (tmp_path / "x").rename(tmp_path / "old")
    (tmp_path / "new").rename(tmp_path / "x")
    info = store.load("x")
    assert info.version == ref.version + 1
    assert store.get(ref) is old  # the running sequence keeps its version
    with pytest.raises(AdapterInUse):
        store.unload("x", wait=False)
    threading.Timer(0.2, store.release, [ref]).start()
    store.unload("x", wait=True, timeout=10)
    with pytest.raises(AdapterNotFound):
        store.get(ref)


def test_unload_times_out_while_in_use(root: Path, tiny_llama_spec: BaseSpec) -> None:
    store = store_over(root, tiny_llama_spec)
    store.acquire("a0")
    with pytest.raises(AdapterInUse):
        store.unload("a0", wait=True, timeout=0.05)
