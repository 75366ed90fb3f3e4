"""Throughput of the hf engine against PEFT baselines, on the real base in NF4, in one run.

    .venv/bin/python -m loraplex.bench.engine_bench [--threads 1] [--output-head int8]

Workload: 16 concurrent requests spread over 8 rank-16 all-linear LoRAs, 64 greedy
new tokens each. The engine runs and PEFT's static batches take turns over --rounds rounds;
each rate is its median over rounds and each ratio the median of the ratios within a round,
so the machine's drift in speed falls on both sides of every ratio. Prints
a table with every figure beside its target, then the raw JSON.
The mixed run is repeated with LoRA gathered per row at every step (`mixed_gathered`)
instead of grouped by adapter: the two paths the engine picks from (routing.py).
Also measures merged against batched mode while one adapter owns the batch (fp32 and NF4
bases), the figures behind `adapter_mode=auto`.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from loraplex.adapters.peft_format import read_adapter
from loraplex.adapters.store import AdapterStore
from loraplex.bench.peft_baselines import peft_model, peft_naive, peft_static
from loraplex.server.config import DEFAULT_MODEL, default_cache_dir
from loraplex.server.engine.api import SamplingParams, SequenceRequest, StepPlan
from loraplex.server.engine.config import EngineConfig
from loraplex.server.engine.hf import HFEngine
from loraplex.server.engine.routing import GROUPED_CELLS_PER_ROW
from loraplex.server.models import hf_checkpoint, resolve

PROMPTS = [
    "Write a short poem about the sea.",
    "Explain what a hash table is.",
    "List three uses of copper.",
    "Summarize the plot of Hamlet.",
]
RESIDENT = 64
DEVICE_SLOTS = 16  # distinct adapters one batch can hold (the batch has 16 rows)


def timed(fn: Callable[[], int]) -> float:
    """Tokens per second of one call of `fn` (which returns the tokens it produced)."""
    start = time.perf_counter()
    tokens = fn()
    rate = tokens / (time.perf_counter() - start)
    print(f"  {tokens} tokens at {rate:.2f} tok/s", file=sys.stderr, flush=True)
    return rate


def engine_run(
    engine: HFEngine, prompts: list[list[int]], adapters: Sequence[str | None], n: int
) -> int:
    """All requests join at step 0; each holds only its own adapter until it finishes."""
    requests = []
    for i, (prompt, adapter) in enumerate(zip(prompts, adapters, strict=True)):
        ref = engine.store.acquire(adapter) if adapter else None
        requests.append(SequenceRequest(f"r{i}", prompt, SamplingParams(max_new_tokens=n), ref))
    tokens = 0
    plan = StepPlan(prefill=requests)
    while True:
        tokens += sum(e.token_id is not None for e in engine.step(plan))
        if not engine.running():
            break
        plan = StepPlan(decode=engine.running())
    for request in requests:
        if request.adapter:
            engine.store.release(request.adapter)
    return tokens


def set_resident(engine: HFEngine, names: list[str], count: int) -> None:
    """Keep exactly the first `count` adapters in the store (the host tier); device slots
    fill as requests run."""
    for name in names[:count]:
        engine.store.load(name)
    extra = set(names[count:])
    for info in engine.store.list():
        if info.resident and info.adapter_id in extra:
            engine.store.unload(info.adapter_id)


def interleaved(rounds: int, runs: dict[str, Callable[[], float]]) -> dict[str, list[float]]:
    """Each run's rate in each of `rounds` rounds that take the runs in turn.

    A shared machine's speed drifts within minutes; one pass of each run in sequence turned
    that drift into the ratios (docs/measurements.md). Runs in one round are minutes apart
    at most, so ratios are taken within a round
    (`paired`).
    """
    rates: dict[str, list[float]] = {name: [] for name in runs}
    for round_ in range(rounds):
        for name, run in runs.items():
            print(f"round {round_ + 1}/{rounds}: {name}", file=sys.stderr, flush=True)
            rates[name].append(run())
    return rates


def paired(r: dict, a: str, b: str) -> float:
    """Median over rounds of run a's rate over run b's in the same round.

    Medians taken separately can come from different rounds: one run gave 1.87 that way
    where the three rounds' own ratios were 1.99, 1.45 and 1.49."""
    return statistics.median(x / y for x, y in zip(r["rounds"][a], r["rounds"][b], strict=True))


def with_mode(engine: HFEngine, mode: str) -> HFEngine:
    """Another engine over the same resident base and store, in another adapter mode."""
    config = engine.config.model_copy(update={"adapter_mode": mode})
    return HFEngine(engine.base, engine.store, config, engine.routing, engine.device)


def merge_seconds(engine: HFEngine, name: str, repeats: int = 3) -> float:
    """Median time to merge one adapter into the base and restore it."""
    ref = engine.store.acquire(name)
    adapter = engine.store.get(ref)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        engine.merges.merge(ref, adapter)
        engine.merges.unmerge()
        times.append(time.perf_counter() - start)
    engine.store.release(ref)
    return statistics.median(times)


def load_seconds(root: Path, engine: HFEngine, name: str, repeats: int = 9) -> float:
    """Median time to read and validate a rank-16 all-linear LoRA from disk."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        read_adapter(name, root / name, engine.base.spec)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def nf4_phase(
    checkpoint: Path, root: Path, names: list[str], args: argparse.Namespace
) -> dict[str, Any]:
    """Engine and PEFT figures on the NF4 base, in interleaved rounds, then one owner."""
    n, count, head = args.new_tokens, args.requests, args.output_head
    config = EngineConfig(checkpoint=checkpoint, quantization="nf4", adapter_slots=DEVICE_SLOTS,
                          max_lora_rank=16, adapter_mode="batched", output_head=head)  # fmt: skip
    engine = HFEngine.from_config(config, AdapterStore([root], max_resident=RESIDENT))
    prompts = [engine.encode(PROMPTS[i % len(PROMPTS)]) for i in range(count)]
    over8 = [names[i % 8] for i in range(count)]
    spread = [names[(i * 4) % RESIDENT] for i in range(count)]  # 16 distinct adapters of 64
    engine_run(engine, prompts[:2], over8[:2], 4)  # warm-up
    set_resident(engine, names, RESIDENT)
    engine_run(engine, prompts, spread, 4)  # every device slot filled
    r: dict[str, Any] = {"engine_peak_rss_mib": rss_mib()}  # before PEFT's model is loaded
    model = peft_model(checkpoint, root, names[:8], EngineConfig(
        checkpoint=checkpoint, quantization="nf4", output_head=head))  # fmt: skip

    def engine_rate(
        adapters: list[str | None], resident: int, grouped: float = GROUPED_CELLS_PER_ROW
    ) -> Callable[[], float]:
        def run() -> float:
            set_resident(engine, names, resident)
            engine.routing.grouped_cells_per_row = grouped
            return timed(lambda: engine_run(engine, prompts, adapters, n))

        return run

    r["rounds"] = interleaved(args.rounds, {
        "mixed": engine_rate(list(over8), 8),
        "mixed_gathered": engine_rate(list(over8), 8, grouped=0.0),  # gathered every step
        "base_only": engine_rate([None] * count, 8),
        "peft_static": lambda: timed(lambda: peft_static(model, prompts, over8, n)),
        "mixed_64_resident": engine_rate(list(over8), RESIDENT),
        "spread_16_of_64": engine_rate(list(spread), RESIDENT),
    })  # fmt: skip
    r |= {name: statistics.median(rates) for name, rates in r["rounds"].items()}
    k = args.naive_requests  # one pass: at a tenth of the others' rate it is as long as a round
    r["peft_naive"] = (
        timed(lambda: peft_naive(model, prompts[:k], over8[:k], n)) if k else float("nan")
    )
    # A merging base keeps the plain NF4 layout (nf4.py), so merged mode gets its own base.
    merging = config.model_copy(update={"adapter_mode": "merged"})
    merged = HFEngine.from_config(merging, AdapterStore([root], max_resident=8))
    r.update(one_owner(engine, merged, prompts, names[0], n, "nf4"))
    r["load_p50_s"] = load_seconds(root, engine, names[0])
    r["prompts"] = prompts
    return r


def one_owner(engine: HFEngine, merged: HFEngine, prompts: list[list[int]], name: str, n: int,
              tag: str) -> dict:  # fmt: skip
    """One adapter owns the whole batch: batched deltas against a merged base."""
    owner = [name] * len(prompts)
    figures = {
        f"{tag}_one_owner_batched": timed(lambda: engine_run(engine, prompts, owner, n)),
        f"{tag}_one_owner_merged": timed(lambda: engine_run(merged, prompts, owner, n)),
    }
    merged.merges.unmerge()  # the fp32 engines share one base
    figures[f"{tag}_merge_unmerge_s"] = merge_seconds(merged, name)
    return figures


def fp32_phase(
    checkpoint: Path, root: Path, names: list[str], prompts: list[list[int]], n: int
) -> dict:
    config = EngineConfig(checkpoint=checkpoint, quantization="fp32", adapter_slots=8,
                          max_lora_rank=16, adapter_mode="batched")  # fmt: skip
    engine = HFEngine.from_config(config, AdapterStore([root], max_resident=8))
    engine_run(engine, prompts[:2], names[:2], 4)  # warm-up
    return one_owner(engine, with_mode(engine, "merged"), prompts, names[0], n, "fp32")


TARGETS: list[tuple[str, str, str, float | None]] = [
    # (figure, label, comparison, target)
    ("vs_naive", "engine / naive PEFT loop (tok/s ratio)", ">=", 4.0),
    ("vs_static", "engine / PEFT static mixed batch", ">=", 1.5),
    ("mixed_vs_base", "mixed adapters / base-only (engine)", ">=", 0.85),
    ("drop_64_vs_8", "throughput drop, 64 vs 8 resident", "<=", 0.10),
    ("grouped_vs_gathered", "mixed, grouped / gathered LoRA (tok/s)", "", None),
    ("load_p50_ms", "p50 load, rank-16 all-linear LoRA (ms)", "", None),
    ("engine_peak_rss_mib", "peak RSS, engine with 64 resident (MiB)", "", None),
]


def ratios(r: dict) -> dict:
    return {
        "vs_naive": r["mixed"] / r["peft_naive"],
        "vs_static": paired(r, "mixed", "peft_static"),
        "mixed_vs_base": paired(r, "mixed", "base_only"),
        "drop_64_vs_8": 1 - paired(r, "mixed_64_resident", "mixed"),
        "grouped_vs_gathered": paired(r, "mixed", "mixed_gathered"),
        "load_p50_ms": r["load_p50_s"] * 1000,
        "nf4_merged_vs_batched": r["nf4_one_owner_merged"] / r["nf4_one_owner_batched"],
        "fp32_merged_vs_batched": r["fp32_one_owner_merged"] / r["fp32_one_owner_batched"],
    }


def table(r: dict) -> str:
    lines = [f"{'figure':<44} {'value':>10}  target", "-" * 68]
    for key, label, op, target in TARGETS:
        value = r[key]
        if target is None:
            lines.append(f"{label:<44} {value:>10.2f}  (reported)")
            continue
        met = value >= target if op == ">=" else value <= target
        lines.append(f"{label:<44} {value:>10.2f}  {op} {target}  {'met' if met else 'NOT met'}")
    lines.append("-" * 68)
    for key in ("mixed", "mixed_gathered", "base_only", "mixed_64_resident", "spread_16_of_64",
                "peft_static", "peft_naive", "nf4_one_owner_batched", "nf4_one_owner_merged",
                "fp32_one_owner_batched", "fp32_one_owner_merged"):  # fmt: skip
        lines.append(f"{key + ' (tok/s)':<44} {r[key]:>10.2f}")
    for key in ("nf4_merge_unmerge_s", "fp32_merge_unmerge_s"):
        lines.append(f"{key:<44} {r[key]:>10.3f}")
    return "\n".join(lines)


def adapters_in_child(root: Path, checkpoint: Path) -> list[str]:
    """Write the adapters in a child process, so the fp32 model it needs stays out of our RSS."""
    command = [sys.executable, "-m", "loraplex.bench.peft_baselines"]
    subprocess.run([*command, str(checkpoint), str(root), str(RESIDENT)], check=True)
    return [f"lora-{i}" for i in range(RESIDENT)]


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="loraplex bench engine", description=__doc__)
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument(
        "--naive-requests",
        type=int,
        default=8,
        help="requests for the sequential PEFT loop (its tok/s does not depend on it)",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    parser.add_argument(
        "--rounds", type=int, default=3, help="interleaved rounds; each figure is their median"
    )
    parser.add_argument("--adapters", type=Path, default=None, help="reuse adapters written before")
    parser.add_argument(
        "--output-head",
        choices=["full", "int8"],
        default="full",
        help="output head of the NF4 base, for the engine and PEFT alike",
    )
    args = parser.parse_args(argv)  # fmt: skip
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    checkpoint = hf_checkpoint(resolve(DEFAULT_MODEL, default_cache_dir()), default_cache_dir())
    root = args.adapters or Path(tempfile.mkdtemp(prefix="loraplex-bench-"))
    if args.adapters and (root / f"lora-{RESIDENT - 1}").is_dir():
        names = [f"lora-{i}" for i in range(RESIDENT)]
    else:
        names = adapters_in_child(root, checkpoint)
    r = nf4_phase(checkpoint, root, names, args)
    prompts = r.pop("prompts")
    r.update(fp32_phase(checkpoint, root, names, prompts, args.new_tokens))
    r.update(ratios(r))
    r.update(requests=args.requests, new_tokens=args.new_tokens, round_count=args.rounds,
             threads=torch.get_num_threads(), naive_requests=args.naive_requests,
             output_head=args.output_head, load_average=os.getloadavg())  # fmt: skip
    print(table(r))
    print(json.dumps(r, indent=2))


if __name__ == "__main__":
    main()
