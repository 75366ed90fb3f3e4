"""The two ways MultiAdapterLinear applies LoRA, side by side: the figures behind the
grouping rule in server/engine/routing.py.

    .venv/bin/python -m loraplex.bench.lora_bench [--threads 2] [--rank 16]

For each case (rows, adapters, tokens per row, slots in use) it times the LoRA deltas of
one forward through every adapted linear of Gemma 3 270M (18 layers x 7 projections, stacks
in the dtype the engine gives them on the CPU, fp32, unless --dtype says otherwise; random
weights: the cost does not depend on the values), once with the rows grouped by adapter
and once gathered per row, alternating, and prints the ratio. `routes` says which one the
engine's rule picks.

Then, for prefills of a few prompts (one adapter each), it times the engine's packed prefill
(the prompts back to back in one row, each prompt's delta over its own span) against one
row per prompt padded to the longest (gathered per row). The deltas alone are timed; the
padding also costs base work, which comes on top.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time
from collections.abc import Sequence

import torch
from torch import nn

from loraplex.adapters.weights import LoraModule
from loraplex.server.device import compute_dtype
from loraplex.server.engine.multi_linear import MultiAdapterLinear
from loraplex.server.engine.routing import Routing, RoutingContext, group_rows

# (in, out) of q, k, v, o, gate, up, down in Gemma 3 270M; 18 decoder layers
SHAPES = [(640, 1024), (640, 256), (640, 256), (1024, 640), (640, 2048), (640, 2048), (2048, 640)]
LAYERS = 18
DTYPES = {
    "engine": compute_dtype(torch.device("cpu")),
    "bf16": torch.bfloat16,
    "fp32": torch.float32,
}
CASES = [  # rows, adapters, tokens per row, stride between the adapters' slots
    (16, 8, 1, 1), (16, 8, 1, 2), (16, 16, 1, 1), (8, 8, 1, 1), (32, 8, 1, 1), (12, 8, 1, 1),
    (4, 4, 1, 1), (4, 4, 1, 2), (2, 2, 1, 1), (8, 4, 20, 1), (8, 8, 20, 1), (3, 3, 90, 1),
]  # fmt: skip
PREFILL_CASES = [(74,), (40, 74), (30, 50, 70), (64, 64)]  # prompt lengths, one adapter each
CPU = torch.device("cpu")


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="loraplex bench lora",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--rank", type=int, default=16, help="rank of every adapter")
    parser.add_argument("--repeats", type=int, default=7, help="timed turns of each path")
    parser.add_argument(
        "--dtype",
        choices=sorted(DTYPES),
        default="engine",
        help="adapter stacks and activations: engine (the hf engine's own on the CPU), bf16, fp32",
    )
    return parser.parse_args(argv)


class _NoBase(nn.Module):
    """Stands in for the base weights, which both paths share: only the deltas are timed."""

    def __init__(self, out_features: int) -> None:
        super().__init__()
        self.out_features = out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.new_zeros(*x.shape[:-1], self.out_features)


def layers(
    slots: int, rank: int, routing: RoutingContext, dtype: torch.dtype
) -> list[MultiAdapterLinear]:
    built = []
    for fan_in, fan_out in SHAPES * LAYERS:
        layer = MultiAdapterLinear(_NoBase(fan_out), (fan_in, fan_out), routing, slots, rank, dtype)
        for slot in range(1, slots):
            layer.set_lora(slot, LoraModule(torch.randn(rank, fan_in) / 30,
                                            torch.randn(fan_out, rank) / 30, 1.0))  # fmt: skip
        built.append(layer)
    return built


def time_case(
    rows: int, adapters: int, tokens: int, stride: int, args: argparse.Namespace
) -> dict[str, object]:
    routing = RoutingContext()
    dtype = DTYPES[args.dtype]
    stack = layers(adapters * stride + 1, args.rank, routing, dtype)
    slots = [stride * (adapters - i % adapters) for i in range(rows)]
    chosen, forced = routes(routing, slots, args.rank, dtype)
    inputs = [torch.randn(rows, tokens, layer.in_features, dtype=dtype) for layer in stack]
    seconds = timed(stack, {name: (route, inputs) for name, route in forced.items()}, args)
    grouped, gather = seconds["grouped"], seconds["gather"]
    return {
        "rows": rows, "adapters": adapters, "tokens": tokens, "slot_stride": stride,
        "grouped_ms": grouped, "gather_ms": gather, "grouped_vs_gather": grouped / gather,
        "routes": chosen,
    }  # fmt: skip


def time_prefill(lengths: tuple[int, ...], args: argparse.Namespace) -> dict[str, object]:
    routing = RoutingContext()
    dtype = DTYPES[args.dtype]
    stack = layers(len(lengths) + 1, args.rank, routing, dtype)
    slots, scales = list(range(1, len(lengths) + 1)), [1.0] * len(lengths)
    routing.set_packed(slots, scales, list(lengths), args.rank, CPU)
    packed = routing.current
    routing.set(slots, scales, args.rank, CPU, dtype=dtype)
    padded = routing.current
    assert packed is not None and padded is not None
    width, total = max(lengths), sum(lengths)
    fan_ins = [layer.in_features for layer in stack]
    seconds = timed(stack, {
        "packed": (packed, [torch.randn(1, total, n, dtype=dtype) for n in fan_ins]),
        "padded": (padded, [torch.randn(len(lengths), width, n, dtype=dtype) for n in fan_ins]),
    }, args)  # fmt: skip
    return {
        "prompt_tokens": list(lengths), "packed_ms": seconds["packed"],
        "padded_ms": seconds["padded"], "packed_vs_padded": seconds["packed"] / seconds["padded"],
    }  # fmt: skip


def timed(
    stack: list[MultiAdapterLinear],
    runs: dict[str, tuple[Routing, list[torch.Tensor]]],
    args: argparse.Namespace,
) -> dict[str, float]:
    """Median ms of one forward through `stack` per run, the runs taking turns (the first
    turn warms up and is not counted)."""
    routing = stack[0].routing
    seconds: dict[str, list[float]] = {name: [] for name in runs}
    with torch.inference_mode():
        for _ in range(args.repeats):
            for name, (route, inputs) in runs.items():
                routing.current = route
                started = time.perf_counter()
                for layer, x in zip(stack, inputs, strict=True):
                    layer(x)
                seconds[name].append(time.perf_counter() - started)
    return {name: statistics.median(times[1:]) * 1e3 for name, times in seconds.items()}


def routes(
    routing: RoutingContext, slots: list[int], rank: int, dtype: torch.dtype
) -> tuple[str, dict[str, Routing]]:
    """The path the engine's rule picks, and a routing that forces each path."""
    scales = [1.0] * len(slots)
    routing.set(slots, scales, rank, torch.device("cpu"), dtype=dtype)
    current = routing.current
    assert current is not None
    forced = {
        "grouped": dataclasses.replace(
            current, groups=group_rows(slots, scales, torch.device("cpu"), dtype)
        ),
        "gather": dataclasses.replace(current, groups=None),
    }
    return ("grouped" if current.groups is not None else "gather"), forced


def main(argv: Sequence[str] | None = None) -> list[dict[str, object]]:
    args = parse(argv)
    torch.set_num_threads(args.threads)
    results = [time_case(*case, args) for case in CASES]
    print("| rows | adapters | tokens/row | slot stride | grouped ms | gathered ms "
          "| grouped/gathered | engine uses |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['rows']} | {r['adapters']} | {r['tokens']} | {r['slot_stride']} | "
              f"{r['grouped_ms']:.1f} | {r['gather_ms']:.1f} | {r['grouped_vs_gather']:.2f} "
              f"| {r['routes']} |")  # fmt: skip
    prefills = [time_prefill(lengths, args) for lengths in PREFILL_CASES]
    print("\n| prompt tokens | packed ms | padded ms | packed/padded |")
    print("|---|---|---|---|")
    for r in prefills:
        print(f"| {r['prompt_tokens']} | {r['packed_ms']:.1f} | {r['padded_ms']:.1f} | "
              f"{r['packed_vs_padded']:.2f} |")  # fmt: skip
    summary = {"threads": args.threads, "rank": args.rank, "dtype": str(DTYPES[args.dtype])}
    print(json.dumps({**summary, "cases": results, "prefills": prefills}, indent=2))
    return results + prefills


if __name__ == "__main__":
    main()
