"""Both ways MultiAdapterLinear applies per-row adapters (rows grouped by adapter, or each
row's weights gathered) against each row's own delta weight, computed apart from the
stacks: W x + scale · ΔW x."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from loraplex.adapters.weights import LoraModule, VeraModule, VeraProjection
from loraplex.server.engine.multi_linear import MultiAdapterLinear
from loraplex.server.engine.routing import GROUPED_MIN_ROWS, RoutingContext, group_rows

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
    ("slots", "tokens", "grouped"),
    [
        ([1, 0, 2, 4, 3, 1, 0, 2], 1, True),  # decode, adapters in slots 1-4: views of stacks
        ([2, 4, 0, 2, 3, 6, 4, 5], 1, True),  # slots 2-6, ranks below the maximum: a copy
        ([1, 1, 1, 2, 0, 0, 0, 0], 1, True),  # unequal groups: padded cells
        ([6, 1], 1, False),  # too few rows to group: gathered per row
        ([1, 0, 2, 4, 3, 1, 0, 2], 5, True),  # prefill
        ([2, 4, 5], 3, False),  # prefill, ranks below the maximum
        ([1, 2, 4, 6, 1, 2, 4, 6, 1, 2, 4, 6, 1, 2, 4, 6], 1, True),  # the bench's shape
    ],
)
def test_rows_get_their_own_adapter_either_way(
    slots: list[int], tokens: int, grouped: bool
) -> None:
    layer, routing, deltas = _layer()
    x = torch.randn(len(slots), tokens, IN, generator=torch.Generator().manual_seed(1))
    scales = [1.5 - 0.5 * i for i in range(len(slots))]  # negative and zero too
    rank = max((LORA_RANKS.get(s, 0) for s in slots), default=0)
    routing.set(slots, scales, rank, x.device, dtype=torch.float32)
    chosen = routing.current
    assert chosen is not None and (chosen.groups is not None) is grouped
    groups = group_rows(slots, scales, x.device, torch.float32)
    want = _expected(layer, x, slots, scales, deltas)
    for forced in (dataclasses.replace(chosen, groups=groups),
                   dataclasses.replace(chosen, groups=None)):  # fmt: skip
        routing.current = forced
        with torch.no_grad():
            got = layer(x)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)


def test_padding_cells_touch_no_other_row() -> None:
    """A padded cell adds its (zero-scaled) delta back to the row it copied, so even a
    non-finite row spoils only itself."""
    layer, routing, deltas = _layer()
    slots = [1, 1, 1, 2, 4, 4, 6, 0]
    scales = [1.0] * len(slots)
    x = torch.randn(len(slots), 1, IN, generator=torch.Generator().manual_seed(2))
    x[3] = float("inf")  # the only row of slot 2: its group's padded cells copy it
    routing.set(slots, scales, 8, x.device, dtype=torch.float32)
    assert routing.current is not None and routing.current.groups is not None
    assert routing.current.groups.width == 3
    with torch.no_grad():
        got = layer(x)
    want = _expected(layer, x, slots, scales, deltas)
    others = [row for row in range(len(slots)) if row != 3]
    torch.testing.assert_close(got[others], want[others], rtol=1e-5, atol=1e-4)


def test_the_rule_groups_only_many_rows_that_share_adapters() -> None:
    routing = RoutingContext()
    many = GROUPED_MIN_ROWS
    cpu = torch.device("cpu")
    routing.set([1, 2] * (many // 2), [1.0] * many, 8, cpu)
    assert routing.current is not None and routing.current.groups is not None
    routing.set([1, 2] * (many // 2 - 1), [1.0] * (many - 2), 8, cpu)  # too few rows
    assert routing.current is not None and routing.current.groups is None
    routing.set([1] * (many - 2) + [2, 3], [1.0] * many, 8, cpu)  # 3 x 6 cells for 8 rows
    assert routing.current is not None and routing.current.groups is None
    gathered = RoutingContext(grouped_cells_per_row=0.0)  # what bench engine's gathered run uses
    gathered.set([1, 2] * (many // 2), [1.0] * many, 8, cpu)
    assert gathered.current is not None and gathered.current.groups is None


@pytest.mark.parametrize(
    ("slots", "lengths"),
    [
        ([1], [7]),  # one prompt
        ([2, 0, 3, 6, 2], [3, 5, 1, 4, 2]),  # LoRA of several ranks, VeRA, the base, a repeat
        ([0, 0], [2, 3]),  # the base only: nothing to route
    ],
)
def test_packed_prompts_get_their_own_adapter_on_their_own_tokens(
    slots: list[int], lengths: list[int]
) -> None:
    layer, routing, deltas = _layer()
    x = torch.randn(1, sum(lengths), IN, generator=torch.Generator().manual_seed(3))
    scales = [1.5 - 0.5 * i for i in range(len(slots))]  # negative and zero too
    rank = max((LORA_RANKS.get(s, 0) for s in slots), default=0)
    routing.set_packed(slots, scales, lengths, rank, x.device)
    with torch.no_grad():
        got = layer(x)
    prompts = x[0].split(lengths)  # each prompt alone, as one row of its own
    want = torch.cat([_expected(layer, p[None], [s], [c], deltas)[0]
                      for p, s, c in zip(prompts, slots, scales, strict=True)])  # fmt: skip
    torch.testing.assert_close(got[0], want, rtol=1e-5, atol=1e-4)
