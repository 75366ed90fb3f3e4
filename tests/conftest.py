"""Shared fixtures: tiny checkpoints and PEFT adapters for them, built once per test session,
and an isolated cache."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft_adapters import ADAPTER_CONFIGS, linear_spec, save_adapter
from tiny import build_model, build_tokenizer, save_tiny_checkpoint
from transformers import AutoModelForCausalLM

from loraplex.adapters.peft_format import BaseSpec
from loraplex.server import models
from loraplex.server.config import DEFAULT_MODEL, default_cache_dir
from loraplex.server.models import ModelSource

TINY_FAMILIES = ("gemma3", "llama")


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Directories holding a tiny random Gemma-3-style and Llama-style model with a tokenizer."""
    root = tmp_path_factory.mktemp("tiny-models")
    return {family: save_tiny_checkpoint(family, root / family) for family in TINY_FAMILIES}


@pytest.fixture(params=TINY_FAMILIES)
def tiny_checkpoint(request: pytest.FixtureRequest, tiny_checkpoints: dict[str, Path]) -> Path:
    return tiny_checkpoints[request.param]


@pytest.fixture(scope="session")
def tiny_llama() -> torch.nn.Module:
    """A tiny random Llama built in memory, for tests that write adapters for it."""
    return build_model("llama", build_tokenizer())


@pytest.fixture(scope="session")
def tiny_llama_spec(tiny_llama: torch.nn.Module) -> BaseSpec:
    """What an adapter store validates tiny_llama's adapters against."""
    return linear_spec(tiny_llama)


@pytest.fixture
def cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private, empty loraplex cache so tests never touch the user's."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("LORAPLEX_CACHE", str(cache))
    return cache


@pytest.fixture(scope="session")
def real_model() -> ModelSource:
    """The real default base (Gemma 3 270M Q4_K_M GGUF), assembled into the user's cache."""
    return models.resolve(DEFAULT_MODEL, default_cache_dir())


@pytest.fixture(scope="session")
def real_checkpoint(real_model: ModelSource) -> Path:
    """The default base converted to a transformers checkpoint (converted once, then reused)."""
    return models.hf_checkpoint(real_model, default_cache_dir())


@pytest.fixture(scope="session")
def tiny_adapter_roots(
    tiny_checkpoints: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Path]:
    roots = {}
    for family, checkpoint in tiny_checkpoints.items():
        root = tmp_path_factory.mktemp(f"adapters-{family}")
        base = AutoModelForCausalLM.from_pretrained(checkpoint)
        for seed, (name, config) in enumerate(ADAPTER_CONFIGS.items()):
            # VeRA's effect is a product of two vectors, so it needs larger values to show.
            std = 1.0 if name.startswith("vera") else 0.3
            save_adapter(base, config, root / name, seed=seed, std=std)
        roots[family] = root
    return roots
