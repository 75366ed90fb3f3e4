"""A thin, typed layer over llama-cpp-python's low-level API: one model, one context.

Everything that touches ctypes lives here: loading, tokenization, multi-sequence batches with
per-sequence KV memory, the context's adapter set, and logits rows as numpy arrays.
"""

from __future__ import annotations

import ctypes
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import llama_cpp.llama_cpp as llama
import numpy as np
from gguf import LlamaFileType

from loraplex.server.errors import CorruptModel, LoraplexError

AdapterSet = tuple[tuple[Any, float], ...]  # ((llama_adapter_lora_p, scale), ...)


class DecodeFailed(LoraplexError):
    """llama_decode refused a batch (no KV space, or an internal error)."""


@dataclass(frozen=True)
class RuntimeConfig:
    n_ctx_per_seq: int = 2048  # llama.cpp may round it up; LlamaRuntime.n_ctx_per_seq is exact
    n_seq_max: int = 8
    # llama.cpp's own defaults, as llama-server runs: one llama_decode call takes a step's
    # prompts whole (up to n_batch tokens), so llama.cpp cuts its ubatches (n_ubatch tokens,
    # an equal share of every sequence with a per-sequence KV cache) seeing every prompt,
    # instead of calls cut at fixed token counts that split prompts across calls
    n_batch: int = 2048
    n_ubatch: int = 512
    n_threads: int | None = None  # None: every core this process may use
    n_gpu_layers: int | None = None  # None: all layers when llama.cpp can offload, else none
    flash_attn: bool | None = None  # None: llama.cpp decides per device
    # llama.cpp's repacked CPU weights are faster, but take other kernels for one row than for
    # groups of rows, moving a sequence's logits by up to ~1 with its batch mates; without them
    # batched and solo runs differ only by float rounding (single vs multi-row dot products).
    # On CPUs with AMX, llama.cpp 0.3.36 also crashes (SIGSEGV in llama_decode) on them.
    repack_weights: bool = False


@dataclass(frozen=True)
class TokenSlot:
    """One token of a batch: where it goes and whether its logits are wanted."""

    token: int
    pos: int
    seq: int
    wants_logits: bool


_backend_ready = False


def _init_backend() -> None:
    global _backend_ready
    if not _backend_ready:
        quiet_llama_logs()
        llama.llama_backend_init()
        _backend_ready = True


_log = logging.getLogger("loraplex.llama_cpp")
_GGML_LOG_WARN, _GGML_LOG_ERROR = 3, 4  # ggml_log_level in this llama.cpp


@llama.llama_log_callback  # type: ignore[untyped-decorator]
def _forward_llama_log(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
    """llama.cpp's warnings and errors go to Python logging; its chatter (every load and graph
    reservation) is dropped. llama-cpp-python's own callback maps an older level enum and
    lets the chatter through."""
    if level in (_GGML_LOG_WARN, _GGML_LOG_ERROR):
        severity = logging.WARNING if level == _GGML_LOG_WARN else logging.ERROR
        _log.log(severity, "%s", text.decode("utf-8", "replace").rstrip())


def quiet_llama_logs() -> None:
    llama.llama_log_set(_forward_llama_log, ctypes.c_void_p(0))


def llama_library() -> Any:
    """The loaded llama.cpp shared library, for functions llama-cpp-python does not bind."""
    return llama._lib


def default_threads() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


class LlamaRuntime:
    def __init__(self, path: Path, config: RuntimeConfig) -> None:
        _init_backend()
        self.config = config
        self.model = self._load_model(path, config)
        self.vocab = llama.llama_model_get_vocab(self.model)
        self.vocab_size = int(llama.llama_vocab_n_tokens(self.vocab))
        self.ctx = self._new_context(config)
        self.memory = llama.llama_get_memory(self.ctx)
        self.n_ctx_per_seq = int(llama.llama_n_ctx_seq(self.ctx))
        self._batch = llama.llama_batch_init(config.n_batch, 0, 1)
        self._adapters: AdapterSet = ()

    @staticmethod
    def _load_model(path: Path, config: RuntimeConfig) -> Any:
        params = llama.llama_model_default_params()
        layers = config.n_gpu_layers
        if layers is None:
            layers = -1 if llama.llama_supports_gpu_offload() else 0
        params.n_gpu_layers = layers
        params.use_extra_bufts = config.repack_weights
        model = llama.llama_model_load_from_file(str(path).encode(), params)
        if not model:
            raise CorruptModel(f"llama.cpp could not load the GGUF model {path}")
        return model

    def _new_context(self, config: RuntimeConfig) -> Any:
        params = llama.llama_context_default_params()
        params.n_ctx = config.n_ctx_per_seq * config.n_seq_max
        params.n_batch = config.n_batch
        params.n_ubatch = min(config.n_ubatch, config.n_batch)
        params.n_seq_max = config.n_seq_max
        # logits are read for each sequence's last token only; the default (n_batch rows of a
        # 262k vocabulary) would reserve ~0.5 GiB of output buffer
        params.n_outputs_max = config.n_seq_max
        if config.flash_attn is not None:
            params.flash_attn_type = (
                llama.LLAMA_FLASH_ATTN_TYPE_ENABLED
                if config.flash_attn
                else llama.LLAMA_FLASH_ATTN_TYPE_DISABLED
            )
        params.kv_unified = False  # each sequence attends over its own cells only
        params.n_threads = params.n_threads_batch = config.n_threads or default_threads()
        ctx = llama.llama_init_from_model(self.model, params)
        if not ctx:
            raise CorruptModel("llama.cpp could not create a context for the model")
        return ctx

    # ---- tokens and text ----------------------------------------------------------------

    def file_type(self) -> str:
        """The GGUF file's quantization as llama.cpp names it (Q4_K_M, Q5_K_M, F16, ...)."""
        value = ctypes.create_string_buffer(32)
        llama.llama_model_meta_val_str(self.model, b"general.file_type", value, len(value))
        try:
            name = LlamaFileType(int(value.value)).name
        except ValueError:
            return "unknown"
        return name.removeprefix("MOSTLY_").removeprefix("ALL_")

    def tokenize(self, text: str) -> list[int]:
        data = text.encode()
        capacity = len(data) + 8
        buf = (llama.llama_token * capacity)()
        n = llama.llama_tokenize(self.vocab, data, len(data), buf, capacity, True, True)
        if n < 0:  # too small: llama.cpp reports the size it needs, negated
            capacity = -n
            buf = (llama.llama_token * capacity)()
            n = llama.llama_tokenize(self.vocab, data, len(data), buf, capacity, True, True)
        return list(buf[:n])

    def piece(self, token: int) -> bytes:
        buf = ctypes.create_string_buffer(64)
        n = llama.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, False)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = llama.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, False)
        return buf.raw[:n]

    def is_end_of_generation(self, token: int) -> bool:
        return bool(llama.llama_vocab_is_eog(self.vocab, token))

    # ---- adapters -----------------------------------------------------------------------

    @property
    def current_adapters(self) -> AdapterSet:
        return self._adapters

    def set_adapters(self, adapters: AdapterSet) -> bool:
        """Make `adapters` the context's set; False when it already was (no call made)."""
        if adapters == self._adapters:
            return False
        handles = (llama.llama_adapter_lora_p_ctypes * max(1, len(adapters)))(
            *(handle for handle, _ in adapters)
        )
        scales = (ctypes.c_float * max(1, len(adapters)))(*(scale for _, scale in adapters))
        if llama.llama_set_adapters_lora(self.ctx, handles, len(adapters), scales) != 0:
            raise DecodeFailed("llama.cpp refused the adapter set")
        self._adapters = adapters
        return True

    def detach(self, handle: Any) -> None:
        """Take a handle about to be freed off the context."""
        if any(h == handle for h, _ in self._adapters):
            self.set_adapters(())

    # ---- decoding -----------------------------------------------------------------------

    def decode(self, slots: Sequence[TokenSlot]) -> list[np.ndarray]:
        """Run the tokens (n_batch at a time); the logits of each slot that wants them.

        The rows of the last llama_decode call are views of llama.cpp's own buffer, valid until
        the next decode (a 16-row step no longer copies 16 MiB); rows of earlier calls, which
        that buffer no longer holds, are copies."""
        rows: list[np.ndarray] = []
        step = self.config.n_batch
        for start in range(0, len(slots), step):
            chunk = slots[start : start + step]
            self._fill_batch(chunk)
            status = llama.llama_decode(self.ctx, self._batch)
            if status != 0:
                raise DecodeFailed(f"llama_decode returned {status}")
            last = start + step >= len(slots)
            rows.extend(self._logits(i, last) for i, slot in enumerate(chunk) if slot.wants_logits)
        return rows

    def _fill_batch(self, slots: Sequence[TokenSlot]) -> None:
        batch = self._batch
        batch.n_tokens = len(slots)
        for i, slot in enumerate(slots):
            batch.token[i] = slot.token
            batch.pos[i] = slot.pos
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = slot.seq
            batch.logits[i] = slot.wants_logits

    def _logits(self, index: int, view: bool) -> np.ndarray:
        pointer = llama.llama_get_logits_ith(self.ctx, index)
        row = np.ctypeslib.as_array(pointer, shape=(self.vocab_size,))
        return row if view else row.copy()

    def forget(self, seq: int) -> None:
        """Drop every KV cell of sequence slot `seq`."""
        llama.llama_memory_seq_rm(self.memory, seq, -1, -1)

    def move(self, source: int, target: int) -> None:
        """Move sequence slot `source`'s KV cells to the empty slot `target` (llama.cpp copies
        the stream's buffer at the next decode)."""
        llama.llama_memory_seq_cp(self.memory, source, target, -1, -1)
        self.forget(source)

    def close(self) -> None:
        if self.ctx is not None:
            llama.llama_batch_free(self._batch)
            llama.llama_free(self.ctx)
            llama.llama_model_free(self.model)
            self.ctx = self.model = None
