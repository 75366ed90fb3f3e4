"""An int8 output projection for CPU serving: the vocabulary-sized matmul reading a quarter
of the bytes, and the measurement that decides whether it pays on this machine
(output_head=auto).

bitsandbytes leaves `lm_head` in full precision. For Gemma 3 (262,144 tokens × 640) that is a
671 MB fp32 matrix read on every decode step, a large share of a CPU decode step. fbgemm's
dynamic int8 linear reads a quarter of the bytes, but it quantizes the whole
input with one scale, and a few hidden channels run 10x larger than the rest (Gemma 3 270M:
peaks near 70, median 6): on real text the top token then changed at 20% of positions. As
in LLM.int8(), those outlier channels stay in fp32: the 5% of input channels with the
largest values over one calibration forward (timings: docs/measurements.md).
llama.cpp's Q4_K_M files quantize the same matrix (to Q6_K).
"""

from __future__ import annotations

import warnings

import torch
from torch import nn
from torch.nn import functional as F

from loraplex.server.engine.cpu_matmul import seconds_to_run, weight_first, weight_first_pays

OUTLIER_FRACTION = 0.05
# Rows whose largest values are within this ratio share one quantization range (see _apart).
SHARED_RANGE_RATIO = 16.0
CALIBRATION_REPEATS = 3  # output_head=auto: timings of each head
# int8 must win by this much: a tie keeps the exact head.
REQUIRED_GAIN = 1.1


class OutputHeadError(ValueError):
    """The requested output head cannot run on this model or device."""


def int8_head_pays(full: nn.Linear, int8: nn.Module, rows: int) -> bool:
    """Whether `int8` computes `rows` rows of logits faster than `full` here (output_head=auto),
    timed on the whole weight: the int8 head wins by reading a quarter of the bytes, which a
    slice small enough for the caches would not show. The full head is timed in the
    orientation it would run in (cpu_matmul.faster_output_head)."""
    weight = full.weight.detach()
    x = torch.randn(rows, weight.shape[1], generator=torch.Generator().manual_seed(0))
    x = x.to(weight.dtype)
    product = weight_first if weight_first_pays() else F.linear
    full_runs: list[float] = []
    int8_runs: list[float] = []
    with torch.inference_mode():
        for _ in range(CALIBRATION_REPEATS):  # alternated, so drift in speed hits both
            full_runs.append(seconds_to_run(lambda: product(x, weight)))
            int8_runs.append(seconds_to_run(lambda: int8(x)))
    return min(int8_runs) * REQUIRED_GAIN < min(full_runs)  # the least disturbed runs


def int8_head_possible(model: nn.Module) -> bool:
    """Whether `model.lm_head` is one the int8 head can replace: bias-free, on the CPU."""
    head = getattr(model, "lm_head", None)
    return type(head) is nn.Linear and head.bias is None and head.weight.device.type == "cpu"


def quantize_output_head(model: nn.Module, calibration_ids: torch.Tensor) -> None:
    """Replace `model.lm_head` with an int8 head that keeps outlier channels in fp32.

    The outlier channels are those with the largest inputs to lm_head over one forward of
    `calibration_ids` [1, tokens] (any ordinary text: they are a property of the model).
    """
    head = getattr(model, "lm_head", None)
    if type(head) is not nn.Linear or head.bias is not None:
        raise OutputHeadError(f"output_head=int8 needs a bias-free nn.Linear lm_head, got {head}")
    if head.weight.device.type != "cpu":
        raise OutputHeadError(
            "output_head=int8 runs on the CPU only (fbgemm); use output_head=full on "
            f"{head.weight.device.type}"
        )
    peak = _input_peaks(model, head, calibration_ids)
    outliers = peak.topk(max(1, int(head.in_features * OUTLIER_FRACTION))).indices
    model.lm_head = SplitInt8Head(head.weight.detach(), outliers.sort().values)


def _input_peaks(model: nn.Module, head: nn.Linear, ids: torch.Tensor) -> torch.Tensor:
    """Per input channel, the largest |value| lm_head sees over a forward of `ids`."""
    seen: list[torch.Tensor] = []
    hook = head.register_forward_hook(lambda _m, args, _out: seen.append(args[0].detach()))
    try:
        with torch.inference_mode():
            model(input_ids=ids.to(head.weight.device), logits_to_keep=0)
    finally:
        hook.remove()
    return seen[0].float().abs().flatten(0, -2).amax(0)


class SplitInt8Head(nn.Module):
    """logits = x[:, outliers] · W[:, outliers]ᵀ (fp32) + int8(x[:, rest] · W[:, rest]ᵀ)."""

    outliers: torch.Tensor  # buffers, registered in __init__
    rest: torch.Tensor
    outlier_weight_t: torch.Tensor

    def __init__(self, weight: torch.Tensor, outliers: torch.Tensor) -> None:
        super().__init__()
        rest = torch.ones(weight.shape[1], dtype=torch.bool)
        rest[outliers] = False
        self.dtype = weight.dtype
        self.register_buffer("outliers", outliers)
        self.register_buffer("rest", rest.nonzero().flatten())
        self.register_buffer("outlier_weight_t", weight[:, outliers].float().T.contiguous())
        # Two zero-weight input channels that every row sets to +1 and -1 (see forward).
        rest_weight = weight[:, self.rest].float()
        self.int8 = _dynamic_int8(
            torch.cat([rest_weight, rest_weight.new_zeros(len(weight), 2)], 1)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1]).float()
        rest = flat.index_select(1, self.rest)
        peak = rest.abs().amax(1, keepdim=True)
        if _apart(peak):
            y = self._rows_apart(rest, peak)
        else:
            y = self.int8(torch.cat([rest, rest.new_zeros(len(rest), 2)], 1))
        y = y.addmm_(flat.index_select(1, self.outliers), self.outlier_weight_t)
        return y.view(*x.shape[:-1], -1).to(self.dtype)

    def _rows_apart(self, rest: torch.Tensor, peak: torch.Tensor) -> torch.Tensor:
        """Each row brought to a peak of 1 and given the extra channels +1 and -1, so the
        input spans exactly [-1, 1] whatever its rows; the logits are scaled back after. A
        non-finite row gets NaN logits, never plausible ones."""
        finite = torch.isfinite(peak)
        peak = torch.where(finite & (peak > 0), peak, 1.0)
        span = torch.tensor([1.0, -1.0], device=rest.device).expand(len(rest), 2)
        y = self.int8(torch.cat([torch.where(finite, rest / peak, 0.0), span], 1)).mul_(peak)
        return y if bool(finite.all()) else y.masked_fill_(~finite, float("nan"))


def _apart(peak: torch.Tensor) -> bool:
    """Whether rows must be quantized apart: fbgemm quantizes its whole input with one scale
    and zero point, from its minimum and maximum, so a row far larger than the rest (an
    overflowing request) would round the others to nothing, and one NaN spoils them all.
    Rows of ordinary, comparable size share the range as before: rescaling each row costs a
    pass over the [rows, vocabulary] logits, a cost worth skipping on most steps."""
    if not bool(torch.isfinite(peak).all()):
        return True
    return len(peak) > 1 and float(peak.max()) > SHARED_RANGE_RATIO * float(peak.min())


def _dynamic_int8(weight: torch.Tensor) -> nn.Module:
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    linear.weight = nn.Parameter(weight, requires_grad=False)
    linear.qconfig = torch.ao.quantization.per_channel_dynamic_qconfig  # type: ignore[assignment]
    with warnings.catch_warnings():
        # torch marks eager-mode quantization deprecated in favour of torchao; the kernel
        # (fbgemm, per-channel int8 weights) is the same and torch is pinned in pyproject.toml.
        warnings.simplefilter("ignore", (DeprecationWarning, UserWarning))
        return torch.ao.nn.quantized.dynamic.Linear.from_float(linear)
