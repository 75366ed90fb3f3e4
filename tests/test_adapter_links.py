"""Adapter folders and files that link outside their adapter root are refused with the reason
(InvalidAdapter: FAILED_PRECONDITION), on load and acquire, and nothing outside is read; links
that stay inside their root keep working."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import torch
from peft import LoraConfig
from peft_adapters import save_adapter

from loraplex.adapters.errors import InvalidAdapter
from loraplex.adapters.peft_format import CONFIG_FILE, WEIGHTS_FILE, BaseSpec, read_adapter
from loraplex.adapters.store import AdapterStore
from loraplex.adapters.weights import AdapterWeights
from loraplex.server.status import status_for


@pytest.fixture(scope="module")
def adapter(tiny_llama: torch.nn.Module, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("adapter") / "lora"
    return save_adapter(tiny_llama, LoraConfig(r=4, target_modules=["q_proj"]), out, seed=0)


@dataclass
class Tree:
    """Two adapter roots and a folder outside both, each holding a valid adapter."""

    root: Path
    other_root: Path
    outside: Path

    def store(self, tiny_llama_spec: BaseSpec, reads: list[Path]) -> AdapterStore:
        def spying_read(adapter_id: str, path: Path, base: BaseSpec) -> AdapterWeights:
            reads.append(path)
            return read_adapter(adapter_id, path, base)

        return AdapterStore([self.root, self.other_root], base=tiny_llama_spec, read=spying_read)


@pytest.fixture
def tree(adapter: Path, tmp_path: Path) -> Tree:
    tree = Tree(tmp_path / "root", tmp_path / "other-root", tmp_path / "outside")
    for folder in (tree.root, tree.other_root, tree.outside):
        shutil.copytree(adapter, folder / "real")
    return tree


def refused_everywhere(store: AdapterStore, adapter_id: str, reason: str) -> None:
    """Load and acquire both refuse with the reason, mapped to FAILED_PRECONDITION."""
    for attempt in (store.load, store.acquire):
        with pytest.raises(InvalidAdapter, match=reason) as err:
            attempt(adapter_id)
        assert status_for(err.value) == grpc.StatusCode.FAILED_PRECONDITION


def listed(store: AdapterStore) -> dict[str, tuple[str, int]]:
    return {a.adapter_id: (a.peft_type, a.rank) for a in store.list()}


def test_a_folder_linking_outside_is_refused_unread(tree: Tree, tiny_llama_spec: BaseSpec) -> None:
    os.symlink(tree.outside / "real", tree.root / "x")
    reads: list[Path] = []
    store = tree.store(tiny_llama_spec, reads)
    refused_everywhere(store, "x", "the adapter folder links outside its adapter root")
    assert reads == [] and listed(store).get("x", ("", 0)) == ("", 0)


LINKED_FILES = [(CONFIG_FILE,), (WEIGHTS_FILE,), (CONFIG_FILE, WEIGHTS_FILE)]


@pytest.mark.parametrize("linked", LINKED_FILES, ids="+".join)
def test_files_linking_outside_are_refused_unread(
    tree: Tree, tiny_llama_spec: BaseSpec, linked: tuple[str, ...]
) -> None:
    """A real folder inside the root whose files are links: the old store read them."""
    for name, target in (("x", tree.outside), ("y", tree.other_root), ("inside", tree.root)):
        folder = tree.root / name
        folder.mkdir()
        for file in (CONFIG_FILE, WEIGHTS_FILE):
            if file in linked:
                os.symlink(target / "real" / file, folder / file)
            else:
                shutil.copy(tree.root / "real" / file, folder / file)
    reads: list[Path] = []
    store = tree.store(tiny_llama_spec, reads)
    for adapter_id in ("x", "y"):  # outside any root, and in another root
        refused_everywhere(store, adapter_id, f"{linked[0]} links outside its adapter root")
        assert listed(store)[adapter_id] == ("", 0)  # listing shows it, reads nothing
    assert reads == []
    assert store.load("inside").version == 1  # links within the same root keep working
    assert reads == [(tree.root / "inside").resolve()]


def test_a_dangling_file_link_outside_is_refused_not_missing(
    tree: Tree, tiny_llama_spec: BaseSpec
) -> None:
    """Was NOT_FOUND: the config link's target did not exist, so no adapter seemed to be there."""
    (tree.root / "x").mkdir()
    shutil.copy(tree.root / "real" / WEIGHTS_FILE, tree.root / "x" / WEIGHTS_FILE)
    os.symlink(tree.outside / "gone" / CONFIG_FILE, tree.root / "x" / CONFIG_FILE)
    refused_everywhere(tree.store(tiny_llama_spec, []), "x", f"{CONFIG_FILE} links outside")


def test_a_parent_folder_linking_outside_is_neither_listed_nor_loaded(
    tree: Tree, tiny_llama_spec: BaseSpec
) -> None:
    """Listing must not walk outside the root: it would reveal (and stat) what lies there."""
    os.symlink(tree.outside, tree.root / "team")
    reads: list[Path] = []
    store = tree.store(tiny_llama_spec, reads)
    assert set(listed(store)) == {"real"}
    refused_everywhere(store, "team/real", "the adapter folder links outside its adapter root")
    assert reads == []


def test_a_link_to_another_roots_adapter_is_refused(tree: Tree, tiny_llama_spec: BaseSpec) -> None:
    os.symlink(tree.other_root / "real", tree.root / "x")
    os.symlink(tree.root / "real", tree.root / "same-root")
    reads: list[Path] = []
    store = tree.store(tiny_llama_spec, reads)
    refused_everywhere(store, "x", "the adapter folder links outside its adapter root")
    assert reads == []
    assert store.load("same-root").path == str((tree.root / "real").resolve())


def folder_loop(root: Path) -> None:
    os.symlink(root / "x", root / "x")


def file_loop(root: Path) -> None:
    (root / "x").mkdir()
    os.symlink(root / "x" / CONFIG_FILE, root / "x" / CONFIG_FILE)


LOOPS: dict[str, Callable[[Path], None]] = {"folder": folder_loop, "file": file_loop}


@pytest.mark.parametrize("where", LOOPS)
def test_link_loops_are_invalid_adapters(tree: Tree, tiny_llama_spec: BaseSpec, where: str) -> None:
    """Was an untyped RuntimeError (INTERNAL) for a looping folder."""
    LOOPS[where](tree.root)
    store = tree.store(tiny_llama_spec, [])
    refused_everywhere(store, "x", "cannot be resolved")
    assert set(listed(store)) <= {"real", "x"}
