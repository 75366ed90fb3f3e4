"""A linear layer that runs its base weights once for the whole batch, then adds each row's
adapter delta from stacked per-slot adapter tensors (slot 0 is "no adapter").

LoRA:  y_i += scale_i · B[s_i] (A[s_i] x_i), with alpha/r (or alpha/sqrt r) folded into B.
The stacks hold A as PEFT does ([r, in] per slot) and B transposed ([r, out]). A forward
whose rows share adapters groups its rows by adapter and runs two batched matmuls over the
adapters in use, reading their stacks in place (Punica's SGMV, padded to a grid: routing.py
`Groups`). Other forwards gather each row's A and B (Punica's BGMV) and use batched matmuls.
`loraplex bench lora` measures both. A packed prefill (one row, prompts back to back) adds
each prompt's delta to its own span of tokens with plain matmuls, the SGMV idea unpadded.
VeRA:  y_i += scale_i · lambda_b[s_i] ⊙ (B (lambda_d[s_i] ⊙ (A x_i))), A/B shared by all slots.
DoRA:  a LoRA slot that also has a gain g = m / ||W + ΔW|| (per output row, computed when the
adapter takes its slot) scales its rows after the delta: y_i = g[s_i] ⊙ (W x_i + ΔW x_i) + bias.
Other slots' gain is 1, so one multiply covers a mixed batch.
"""

from __future__ import annotations

import weakref

import torch
from peft.utils.integrations import dequantize_module_weight
from torch import nn

from loraplex.adapters.weights import LoraModule, VeraModule, VeraProjection
from loraplex.server.engine.nf4 import base_forward
from loraplex.server.engine.routing import Groups, Routing, RoutingContext, Span


class MultiAdapterLinear(nn.Module):
    def __init__(
        self,
        base_layer: nn.Module,
        shape: tuple[int, int],
        routing: RoutingContext,
        num_slots: int,
        max_rank: int,
        dtype: torch.dtype,
    ) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.base_forward = base_forward(base_layer, self._device())
        self.in_features, self.out_features = shape
        self.routing = routing
        self.num_slots, self.max_rank, self.dtype = num_slots, max_rank, dtype
        self.lora_slots: set[int] = set()  # slots whose adapter targets this layer
        self.vera_slots: set[int] = set()
        # The LoRA stacks are allocated up front, as vLLM does: the memory they take shows at
        # start, and the first adapter does not pay for zeroing them all inside a request's
        # step (docs/measurements.md).
        device = self._device()
        self.lora_a = torch.zeros((num_slots, max_rank, shape[0]), dtype=dtype, device=device)
        self.lora_b = torch.zeros((num_slots, max_rank, shape[1]), dtype=dtype, device=device)
        self.vera_a: torch.Tensor | None = None  # [r, in] slice of the shared projection
        self.vera_b: torch.Tensor | None = None  # [out, r]
        self.vera_d: torch.Tensor | None = None  # [slots, r]
        self.vera_lb: torch.Tensor | None = None  # [slots, out]
        self.dora_slots: set[int] = set()
        self.dora_gain: torch.Tensor | None = None  # [slots, out], 1 where no DoRA
        # each DoRA version's gain while its weights live, by its magnitude tensor's identity
        self._gains: dict[int, tuple[weakref.ref[torch.Tensor], torch.Tensor]] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_forward(x)
        routing = self.routing.current
        if routing is None:
            return y
        if routing.spans is not None:
            self._add_span_deltas(y, x, routing.rank, routing.spans)
            return y
        if routing.used_slots & self.lora_slots:
            if routing.groups is not None:
                self._add_grouped_lora(y, x, routing.rank, routing.groups)
            else:
                y = y.add_(self._lora_delta(x, routing).to(y.dtype))
        if routing.used_slots & self.vera_slots:
            y = y.add_(self._vera_delta(x, routing).to(y.dtype))
        if routing.used_slots & self.dora_slots:
            assert self.dora_gain is not None and routing.slots is not None
            y = self._scaled(y, self.dora_gain.index_select(0, routing.slots)[:, None, :])
        return y

    def _scaled(self, y: torch.Tensor, gain: torch.Tensor) -> torch.Tensor:
        """gain ⊙ (y - bias) + bias: DoRA scales the weight's output, not the bias."""
        bias = getattr(self.base_layer, "bias", None)
        if bias is None:
            return y.mul_(gain.to(y.dtype))
        bias = bias.to(y.dtype)
        return y.sub_(bias).mul_(gain.to(y.dtype)).add_(bias)

    def _lora_delta(self, x: torch.Tensor, routing: Routing) -> torch.Tensor:
        assert routing.slots is not None
        rank = routing.rank
        a = self.lora_a[:, :rank].index_select(0, routing.slots)  # [rows, r, in]
        b = self.lora_b[:, :rank].index_select(0, routing.slots)  # [rows, r, out]
        h = torch.bmm(x.to(self.dtype), a.transpose(1, 2))
        if routing.scales is not None:
            h = h * routing.scales.to(self.dtype)
        return torch.bmm(h, b)

    def _add_grouped_lora(
        self, y: torch.Tensor, x: torch.Tensor, rank: int, groups: Groups
    ) -> None:
        a = groups.take(self.lora_a[:, :rank])  # [count, r, in]
        b = groups.take(self.lora_b[:, :rank])  # [count, r, out]
        tokens = x.shape[1]
        cells = x.to(self.dtype).index_select(0, groups.rows)  # [count * width, tokens, in]
        h = torch.bmm(cells.view(groups.count, -1, self.in_features), a.transpose(1, 2))
        h = h.view(groups.count, groups.width, tokens, rank) * groups.scales
        delta = torch.bmm(h.view(groups.count, -1, rank), b)
        y.index_add_(0, groups.rows, delta.view(-1, tokens, self.out_features).to(y.dtype))

    def _add_span_deltas(
        self, y: torch.Tensor, x: torch.Tensor, rank: int, spans: tuple[Span, ...]
    ) -> None:
        """y[span] += scale · ΔW x[span] for each prompt of a packed row ([1, tokens, ...])."""
        rows_x, rows_y = x.reshape(-1, self.in_features), y.view(-1, self.out_features)
        for span in spans:
            xs, ys = rows_x[span.start : span.stop].to(self.dtype), rows_y[span.start : span.stop]
            if span.slot in self.lora_slots:
                h = xs @ self.lora_a[span.slot, :rank].T
                _add_product(ys, h, self.lora_b[span.slot, :rank], span.scale)
            if span.slot in self.dora_slots:
                assert self.dora_gain is not None
                self._scaled(ys, self.dora_gain[span.slot])  # in place: ys is a view of y
            if span.slot in self.vera_slots:
                assert self.vera_a is not None and self.vera_b is not None
                assert self.vera_d is not None and self.vera_lb is not None
                h = (xs @ self.vera_a.T) * self.vera_d[span.slot]
                delta = (h @ self.vera_b.T) * self.vera_lb[span.slot]
                ys.add_(delta.to(ys.dtype), alpha=span.scale)

    def _vera_delta(self, x: torch.Tensor, routing: Routing) -> torch.Tensor:
        assert self.vera_a is not None and self.vera_b is not None
        assert self.vera_d is not None and self.vera_lb is not None
        assert routing.slots is not None
        d = self.vera_d.index_select(0, routing.slots)[:, None, :]  # [rows, 1, r]
        lb = self.vera_lb.index_select(0, routing.slots)[:, None, :]  # [rows, 1, out]
        h = (x.to(self.dtype) @ self.vera_a.T) * d
        if routing.scales is not None:
            h = h * routing.scales.to(self.dtype)
        return (h @ self.vera_b.T) * lb

    # ---- slot management (engine thread, between forward passes) -------------------------

    def _device(self) -> torch.device:
        return next(
            (t.device for t in self.base_layer.parameters()), torch.device("cpu")
        )  # base weights decide where the stacks live

    def set_lora(self, slot: int, module: LoraModule) -> None:
        rank = module.a.shape[0]
        self.lora_a[slot].zero_()
        self.lora_b[slot].zero_()
        self.lora_a[slot, :rank] = module.a.to(self.dtype)
        self.lora_b[slot, :rank] = (module.b.float() * module.scaling).T.to(self.dtype)
        self.lora_slots.add(slot)
        self._set_dora(slot, module)

    def _set_dora(self, slot: int, module: LoraModule) -> None:
        """The slot's DoRA gain, from the dense base weight (dequantized as PEFT does; the
        engine unmerges before a DoRA adapter takes a slot). Computed once per adapter
        version: about 1 ms a layer, which a loop step should not pay again."""
        if module.magnitude is None:
            self._clear_dora(slot)
            return
        if self.dora_gain is None:
            self.dora_gain = torch.ones((self.num_slots, self.out_features), device=self._device())
        self.dora_gain[slot] = self._gain_of(module)
        self.dora_slots.add(slot)

    def _gain_of(self, module: LoraModule) -> torch.Tensor:
        assert module.magnitude is not None and self.dora_gain is not None
        key = id(module.magnitude)
        cached = self._gains.get(key)
        if cached is not None and cached[0]() is module.magnitude:
            return cached[1]
        weight = dequantize_module_weight(self.base_layer).to(self.dora_gain.device)
        gain = module.dora_gain(weight)
        # drop the gains of versions whose weights are gone, then keep this one's
        self._gains = {k: v for k, v in self._gains.items() if v[0]() is not None}
        self._gains[key] = (weakref.ref(module.magnitude), gain)
        return gain

    def _clear_dora(self, slot: int) -> None:
        if slot in self.dora_slots and self.dora_gain is not None:
            self.dora_gain[slot] = 1.0
        self.dora_slots.discard(slot)

    def set_vera(self, slot: int, module: VeraModule, projection: VeraProjection) -> None:
        rank = projection.rank
        # With no VeRA slot left, a new projection (another key or rank) may replace the old.
        if self.vera_d is None or not self.vera_slots or self.vera_d.shape[1] != rank:
            device = self._device()
            a = projection.a[:, : self.in_features]
            self.vera_a = a.to(device=device, dtype=self.dtype).contiguous()
            b = projection.b[: self.out_features]
            self.vera_b = b.to(device=device, dtype=self.dtype).contiguous()
            self.vera_d = torch.zeros((self.num_slots, rank), dtype=self.dtype, device=device)
            self.vera_lb = torch.zeros(
                (self.num_slots, self.out_features), dtype=self.dtype, device=device
            )
        assert self.vera_lb is not None
        self.vera_d[slot] = module.lambda_d.to(self.dtype)
        self.vera_lb[slot] = module.lambda_b.to(self.dtype)
        self.vera_slots.add(slot)

    def clear_slot(self, slot: int) -> None:
        """Zero the slot so a stale adapter can never leak into a later row."""
        if slot in self.lora_slots:
            self.lora_a[slot].zero_()
            self.lora_b[slot].zero_()
        if slot in self.vera_slots and self.vera_d is not None and self.vera_lb is not None:
            self.vera_d[slot].zero_()
            self.vera_lb[slot].zero_()
        self._clear_dora(slot)
        self.lora_slots.discard(slot)
        self.vera_slots.discard(slot)


def _add_product(out: torch.Tensor, h: torch.Tensor, b: torch.Tensor, scale: float) -> None:
    """out += scale · h @ b, in one fused matmul when the dtypes allow (it skips writing and
    re-reading the delta)."""
    if out.dtype == h.dtype:
        out.addmm_(h, b, alpha=scale)
    else:
        out.add_((h @ b).to(out.dtype), alpha=scale)
