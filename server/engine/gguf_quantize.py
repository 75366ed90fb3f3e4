"""Other quantizations of a GGUF base, made with llama.cpp's own quantizer.

No package ships the default model in Q5_K_M (or Q8_0, ...), so they are requantized from the
Q4_K_M file. Requantizing cannot restore what Q4_K_M already lost: the result has the new
format's size and speed, but its quality is bounded by the Q4_K_M source.
"""

from __future__ import annotations

import ctypes
import os
import tempfile
from pathlib import Path

import llama_cpp.llama_cpp as llama

from loraplex.server.engine.gguf_runtime import quiet_llama_logs
from loraplex.server.errors import CorruptModel, InvalidRequest

QUANT_TYPES: dict[str, int] = {
    "q4_k_m": llama.LLAMA_FTYPE_MOSTLY_Q4_K_M,
    "q4_k_s": llama.LLAMA_FTYPE_MOSTLY_Q4_K_S,
    "q5_k_m": llama.LLAMA_FTYPE_MOSTLY_Q5_K_M,
    "q5_k_s": llama.LLAMA_FTYPE_MOSTLY_Q5_K_S,
    "q6_k": llama.LLAMA_FTYPE_MOSTLY_Q6_K,
    "q8_0": llama.LLAMA_FTYPE_MOSTLY_Q8_0,
}


def quantized_path(source: Path, quant: str, cache_dir: Path, source_sha256: str) -> Path:
    """Where the `quant` version of `source` lives in the cache, keyed by the source's hash."""
    return cache_dir / "models" / f"{source.stem}-{source_sha256[:16]}-{quant}.gguf"


def requantize(source: Path, target: Path, quant: str, n_threads: int | None = None) -> Path:
    """Write `source` requantized to `quant` at `target` (atomically), unless it is there."""
    ftype = QUANT_TYPES.get(quant.lower())
    if ftype is None:
        raise InvalidRequest("quant", f"must be one of {', '.join(QUANT_TYPES)}, got {quant!r}")
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, scratch = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part")
    os.close(fd)
    try:
        _quantize(source, Path(scratch), ftype, n_threads)
        os.replace(scratch, target)
    finally:
        Path(scratch).unlink(missing_ok=True)
    return target


def _quantize(source: Path, target: Path, ftype: int, n_threads: int | None) -> None:
    quiet_llama_logs()  # it logs every tensor it converts
    params = llama.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = n_threads or 0  # 0: llama.cpp uses every core
    params.allow_requantize = True  # the source is already quantized
    status = llama.llama_model_quantize(
        str(source).encode(), str(target).encode(), ctypes.byref(params)
    )
    if status != 0:
        raise CorruptModel(f"llama.cpp could not requantize {source} (status {status})")
