"""Both ways MultiAdapterLinear applies per-row adapters (one dense matmul over the slot span
in decode, per-row gathers otherwise) against each row's own delta weight, computed apart
from the stacks: W x + scale · ΔW x."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from loraplex.adapters.weights import LoraModule, VeraModule, VeraProjection
from loraplex.server.engine.multi_linear import MultiAdapterLinear
from loraplex.server.engine.routing import RoutingContext

IN, OUT, SLOTS, MAX_RANK = 12, 10, 7, 8
LORA_RANKS = {1: 8, 2: 3, 4: 5, 6: 2}  # slot -> rank; slot 3 holds VeRA, slot 5 nothing


def _layer() -> tuple[MultiAdapterLinear, RoutingContext, dict[int, torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    base = nn.Linear(IN, OUT, bias=True)
    routing = RoutingContext()
    layer = MultiAdapterLinear(base, (IN, OUT), routing, SLOTS, MAX_RANK, torch.float32)
    deltas: dict[int, torch.Tensor] = {}
    for slot, rank in LORA_RANKS.items():
        lora = LoraModule(
            a=torch.randn(rank, IN, generator=gen),
            b=torch.randn(OUT, rank, generator=gen),
            scaling=0.5 + slot / 10,
        )
        layer.set_lora(slot, lora)
        deltas[slot] = lora.delta_weight().float()
    projection = VeraProjection(
        prng_key=0,
        a=torch.randn(4, IN + 3, generator=gen),
        b=torch.randn(OUT + 2, 4, generator=gen),
    )
    vera = VeraModule(
        lambda_d=torch.randn(4, generator=gen), lambda_b=torch.randn(OUT, generator=gen)
    )
    layer.set_vera(3, vera, projection)
    deltas[3] = vera.delta_weight(projection, IN)
    return layer, routing, deltas


def _expected(layer: MultiAdapterLinear, x: torch.Tensor, slots: list[int], scales: list[float],
              deltas: dict[int, torch.Tensor]) -> torch.Tensor:  # fmt: skip
    rows = [
        layer.base_layer(x[i]) + (scales[i] * x[i] @ deltas[s].T if s in deltas else 0.0)
        for i, s in enumerate(slots)
    ]
    return torch.stack(rows)


@pytest.mark.parametrize(
    ("slots", "tokens", "dense"),
    [
        ([1, 0, 2, 4, 3, 1, 0, 2], 1, True),  # decode, slots 0-4 for 8 rows: one dense matmul
        ([2, 4, 0, 2, 3, 6, 4, 5], 1, True),  # ranks below the maximum: the stacks are sliced
        ([6, 1], 1, False),  # decode, 7 slot blocks for 2 rows: gathered per row
        ([1, 0, 2, 4, 3, 1, 0, 2], 5, False),  # prefill: gathered per row
        ([2, 4, 5], 3, False),  # prefill, ranks below the maximum
    ],
)
def test_rows_get_their_own_adapter_either_way(slots: list[int], tokens: int, dense: bool) -> None:
    layer, routing, deltas = _layer()
    x = torch.randn(len(slots), tokens, IN, generator=torch.Generator().manual_seed(1))
    scales = [1.5 - 0.5 * i for i in range(len(slots))]  # negative and zero too
    rank = max((LORA_RANKS.get(s, 0) for s in slots), default=0)
    routing.set(slots, scales, rank, x.device, tokens_per_row=tokens, dtype=torch.float32)
    assert routing.current is not None and (routing.current.block_mask is not None) is dense
    with torch.no_grad():
        got = layer(x)
        want = _expected(layer, x, slots, scales, deltas)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)


def test_a_zero_rule_gathers_even_where_dense_would_be_picked() -> None:
    routing = RoutingContext(dense_slots_per_row=0.0)  # what bench engine's gathered run uses
    routing.set([1, 2, 1, 2], [1.0] * 4, 8, torch.device("cpu"), dtype=torch.float32)
    assert routing.current is not None and routing.current.block_mask is None
