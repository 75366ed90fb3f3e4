"""loraplex's NF4 decode kernel (nf4_gemm.cpp): built once per machine at first use, then
loaded from torch's extension cache.

It multiplies a few rows by a bitsandbytes NF4 weight in the plain layout with AVX512-BF16
dot products, dequantizing each tile of the weight once per call and exactly as
bitsandbytes' dequantize_4bit does, so a decode step computes with the same bf16 weights as a
prefill that dequantizes. Where it cannot be built or run (no AVX512-BF16, no compiler), the
engine dequantizes instead, and says so once in the log.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)
SOURCE = Path(__file__).with_name("nf4_gemm.cpp")
FLAGS = ["-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16", "-fopenmp"]
COLUMNS_MULTIPLE = 64  # in_features and the quantization blocksize (nf4_gemm.cpp's kBlock)


def available() -> bool:
    """Whether this CPU runs the kernel and it could be built (builds it on the first call)."""
    return _module() is not None


def fits(in_features: int, blocksize: int) -> bool:
    return in_features % COLUMNS_MULTIPLE == 0 and blocksize % COLUMNS_MULTIPLE == 0


def nf4_gemm(
    x: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor,
    out_features: int, blocksize: int,
) -> torch.Tensor:  # fmt: skip
    """x [rows, in] bf16 times the NF4 weight [out, in] transposed: [rows, out] bf16."""
    module = _module()
    assert module is not None, "nf4_kernel.available() is False here"
    result: torch.Tensor = module.nf4_gemm(x, packed, absmax, code, out_features, blocksize)
    return result


@functools.cache
def _module() -> Any:
    if not torch.cpu._is_avx512_bf16_supported():
        return None
    from torch.utils import cpp_extension

    try:
        log.info("building or loading the NF4 decode kernel (the first build takes ~30 s)")
        return cpp_extension.load(name="loraplex_nf4_gemm", sources=[str(SOURCE)],
                                  extra_cflags=FLAGS, verbose=False)  # fmt: skip
    except Exception as err:  # no compiler, no ninja, a read-only cache: dequantize instead
        log.warning("NF4 decode kernel unavailable (%s); 4-bit decode steps dequantize", err)
        return None
