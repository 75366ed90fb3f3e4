"""A few rows times a large weight on the CPU, in the faster of two orientations.

A linear layer computes x·Wᵀ. BLAS can compute the same product as (W·xᵀ)ᵀ, and which of
the two runs faster depends on the BLAS library and the CPU: on some CPUs weight-first wins
clearly for a few rows times a large weight (the output head, the decoder's linears), on
others the two tie. So the process times both once, on a head-sized weight, and keeps the
faster (figures: docs/measurements.md).
"""

from __future__ import annotations

import functools
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn
from torch.nn import functional as F

# The calibration product: an eighth of Gemma 3's output head at a 16-row decode step.
CALIBRATION_SHAPE = (32_768, 640)
CALIBRATION_ROWS = 16
CALIBRATION_REPEATS = 5
# Weight-first must win by this much: a tie keeps the usual orientation.
REQUIRED_GAIN = 1.1


def weight_first(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x·Wᵀ computed as (W·xᵀ)ᵀ: the same values, up to rounding; a transposed view."""
    flat = x.reshape(-1, x.shape[-1])
    return (weight @ flat.T).T.reshape(*x.shape[:-1], weight.shape[0])


@functools.cache
def weight_first_pays() -> bool:
    """Whether this process's BLAS multiplies a few rows faster weight-first (CPU only)."""
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(CALIBRATION_SHAPE, generator=generator)
    x = torch.randn(CALIBRATION_ROWS, CALIBRATION_SHAPE[1], generator=generator)
    usual: list[float] = []
    flipped: list[float] = []
    with torch.inference_mode():
        for _ in range(CALIBRATION_REPEATS):  # alternated, so drift in speed hits both
            usual.append(seconds_to_run(lambda: F.linear(x, weight)))
            flipped.append(seconds_to_run(lambda: weight_first(x, weight)))
    return statistics.median(flipped) * REQUIRED_GAIN < statistics.median(usual)


def seconds_to_run(run: Callable[[], object]) -> float:
    started = time.perf_counter()
    run()
    return time.perf_counter() - started


class WeightFirstLinear(nn.Module):
    """A bias-free linear layer computed weight-first; shares the wrapped layer's weight (a
    tied output head stays one tensor)."""

    weight: nn.Parameter

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        if linear.bias is not None:
            raise ValueError("WeightFirstLinear wraps bias-free layers only")
        self.weight = linear.weight
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return weight_first(x, self.weight)


def faster_output_head(model: nn.Module) -> bool:
    """Compute a full-precision CPU `lm_head` weight-first where that is faster here; True
    when it did."""
    head = getattr(model, "lm_head", None)
    if type(head) is not nn.Linear or head.bias is not None or head.weight.device.type != "cpu":
        return False
    if not weight_first_pays():
        return False
    model.lm_head = WeightFirstLinear(head)
    return True
