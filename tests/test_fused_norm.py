"""The fused Gemma RMSNorm against transformers' own modules: equal outputs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
from transformers.models.gemma2.modeling_gemma2 import Gemma2RMSNorm
from transformers.models.gemma3.modeling_gemma3 import Gemma3RMSNorm

from loraplex.adapters.store import AdapterStore
from loraplex.server.engine.config import EngineConfig
from loraplex.server.engine.fused_norm import FusedGemmaRMSNorm
from loraplex.server.engine.hf import HFEngine


@pytest.mark.parametrize("norm_type", [GemmaRMSNorm, Gemma2RMSNorm, Gemma3RMSNorm])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_norm_equals_transformers(
    norm_type: type[torch.nn.Module], dtype: torch.dtype
) -> None:
    generator = torch.Generator().manual_seed(0)
    for shape in [(16, 1, 640), (16, 1, 4, 256), (1, 81, 640), (3, 7, 1, 64)]:
        norm = norm_type(shape[-1], eps=1e-6)
        with torch.no_grad():
            norm.weight.copy_(torch.randn(shape[-1], generator=generator))
        fused = FusedGemmaRMSNorm(norm)
        x = (torch.randn(shape, generator=generator) * 3).to(dtype)
        with torch.inference_mode():
            assert torch.equal(fused(x), norm(x)), (norm_type.__name__, shape, dtype)


def test_the_engine_serves_gemma_with_fused_norms(tiny_checkpoints: dict[str, Path]) -> None:
    config = EngineConfig(checkpoint=tiny_checkpoints["gemma3"], quantization="fp32")
    engine = HFEngine.from_config(config, AdapterStore([]))
    kinds = {type(m).__name__ for m in engine.model.modules()}
    assert "FusedGemmaRMSNorm" in kinds and "Gemma3RMSNorm" not in kinds
