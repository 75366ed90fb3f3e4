"""The patched ggml kernels against the ones they stand in for, bit for bit (patches/llama.cpp)."""

from __future__ import annotations

import ctypes
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.gguf
POINTER = ctypes.c_void_p


@pytest.fixture(scope="module")
def ggml_cpu() -> ctypes.CDLL:
    from loraplex.server.engine.gguf_runtime import llama_library

    folder = Path(llama_library()._name).parent  # libggml-cpu lies beside libllama
    return ctypes.CDLL(str(next(folder.glob("libggml-cpu.so*"))))


def vec_dot_rows(lib: ctypes.CDLL, x: np.ndarray, y: np.ndarray, stride: int) -> np.ndarray:
    rows, n = x.shape[0], y.shape[0]
    out = np.full(rows, np.nan, np.float32)
    lib.ggml_vec_dot_f32_rows(
        ctypes.c_int(n), out.ctypes.data_as(POINTER), x.ctypes.data_as(POINTER),
        ctypes.c_size_t(4 * stride), y.ctypes.data_as(POINTER), ctypes.c_int(rows),
    )  # fmt: skip
    return out


def vec_dot_each(lib: ctypes.CDLL, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    n = y.shape[0]
    out = np.full(x.shape[0], np.nan, np.float32)
    for r in range(x.shape[0]):
        row = np.ascontiguousarray(x[r, :n])
        lib.ggml_vec_dot_f32(
            ctypes.c_int(n), out[r:].ctypes.data_as(POINTER), ctypes.c_size_t(0),
            row.ctypes.data_as(POINTER), ctypes.c_size_t(0), y.ctypes.data_as(POINTER),
            ctypes.c_size_t(0), ctypes.c_int(1),
        )  # fmt: skip
    return out


@pytest.mark.parametrize("rows", [1, 5, 16, 17, 40])
def test_short_rows_sum_bit_for_bit_as_vec_dot_f32_does(ggml_cpu: ctypes.CDLL, rows: int) -> None:
    rng = np.random.default_rng(rows)
    for n in range(1, ggml_cpu.ggml_vec_dot_f32_rows_max() + 1):
        stride = n + int(rng.integers(0, 17))  # rows of a pool padded wider than the rank
        scale = 10.0 ** rng.integers(-6, 4, (rows, stride))  # magnitudes that round apart
        x = (rng.standard_normal((rows, stride)) * scale).astype(np.float32)
        y = (rng.standard_normal(n) * 10.0 ** rng.integers(-6, 4, n)).astype(np.float32)
        together, each = vec_dot_rows(ggml_cpu, x, y, stride), vec_dot_each(ggml_cpu, x, y)
        assert together.view(np.int32).tolist() == each.view(np.int32).tolist(), f"n={n}"


def test_trailing_zeros_leave_a_row_sum_unchanged(ggml_cpu: ctypes.CDLL) -> None:
    """An adapter padded to the pool's rank sums as it does at its own rank."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((16, 16)).astype(np.float32)
    y = rng.standard_normal(16).astype(np.float32)
    padded_x = np.concatenate([x, np.zeros((16, 48), np.float32)], axis=1)
    padded_y = np.concatenate([y, np.zeros(48, np.float32)])
    own = vec_dot_rows(ggml_cpu, x, y, 16)
    assert (vec_dot_rows(ggml_cpu, padded_x, padded_y, 64) == own).all()
