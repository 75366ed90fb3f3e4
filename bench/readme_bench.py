"""`loraplex bench readme`: the load-benchmark figures in the README, in one command.

1. Saturation: closed-loop clients sweep over concurrency on 256 adapters; the highest request
   rate reached is the server's saturation rate.
2. Load: Poisson arrivals at 70% of that rate, Zipf popularity α=1, swept over 8 and 256
   registered adapters, with the naive PEFT loop, PEFT's static batches and llama-cpp-python
   reloading its model per adapter change run on the same 256-adapter trace.

Writes bench/results/readme/{saturation,load}/ and bench/results/readme/summary.md, which
lists every figure beside its target.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from loraplex.bench import load_bench

SERVE_ARGS = (
    "--max-batch-sequences 32 --max-adapters-per-step 32 --max-batch-tokens 4096 --output-head int8"
)
COMMON = ["--alpha", "1", "--ranks", "8,16", "--prompt-tokens", "16,64",
          "--output-tokens", "16,64", "--serve-args", SERVE_ARGS]  # fmt: skip


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="loraplex bench readme",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--out", type=Path, default=Path("bench/results/readme"))
    parser.add_argument("--model", default="gemma3-270m")
    parser.add_argument("--requests", type=int, default=64, help="requests per load run")
    parser.add_argument("--concurrency", default="4,16,32", help="saturation sweep")
    args = parser.parse_args(argv)
    model = ["--model", args.model]
    saturation = load_bench.main([
        *model, *COMMON, "--num-adapters", "256", "--arrival", "closed",
        "--requests", "48", "--sweep", f"concurrency={args.concurrency}",
        "--out", str(args.out / "saturation"),
    ])  # fmt: skip
    peak = max(p["summary"]["throughput_req_s"] for p in saturation["points"])
    load = load_bench.main([
        *model, *COMMON, "--arrival", "poisson", "--rate", f"{0.7 * peak:.4f}",
        "--requests", str(args.requests), "--sweep", "num_adapters=8,256",
        "--baselines", "naive,static,llama-reload", "--baselines-at", "256",
        "--out", str(args.out / "load"),
    ])  # fmt: skip
    text = summary(peak, load)
    (args.out / "summary.md").write_text(text)
    print(text)


def summary(peak_req_s: float, load: dict[str, Any]) -> str:
    by_adapters = {p["value"]: p for p in load["points"]}
    at8, at256 = by_adapters[8]["summary"], by_adapters[256]["summary"]
    baselines = by_adapters[256]["baselines"]
    ours = at256["throughput_tok_s"]
    ttft = at256["ttft_s"]
    cost = 1 - ours / at8["throughput_tok_s"]
    rows = [
        versus("naive PEFT loop (256 adapters)", ours, baselines["naive"], 5.0),
        versus("PEFT static batches", ours, baselines["static"]),
        *([versus("llama-cpp-python reloading per adapter", ours, baselines["llama-reload"])]
          if "llama-reload" in baselines else []),
        ("TTFT p99 / p50 (256 adapters)", f"{ttft['p99'] / ttft['p50']:.2f}", "<= 2",
         ttft["p99"] <= 2 * ttft["p50"]),
        ("throughput cost, 8 -> 256 adapters", f"{100 * cost:.1f}%", "<= 10%", cost <= 0.10),
    ]  # fmt: skip
    env = load["environment"]
    rates = ", ".join(f"{kind} {b['throughput_tok_s']:.2f}" for kind, b in baselines.items())
    lines = [
        f"Load at 70% of saturation ({0.7 * peak_req_s:.3f} of {peak_req_s:.3f} req/s), "
        f"Poisson arrivals, Zipf α=1, {env['model']} ({env['backend']}, "
        f"{env['quantization']}), {env['cpu_count']} CPUs, commit `{env['git_commit'][:12]}`.",
        "",
        "| figure | measured | target | |",
        "|---|---|---|---|",
        *[
            f"| {name} | {value} | {target} | {_verdict(met)} |"
            for name, value, target, met in rows
        ],
        "",
        f"loraplex {ours:.2f} tok/s, {rates}; TTFT p50 {ttft['p50']:.2f} s, "
        f"p99 {ttft['p99']:.2f} s; TPOT p50 {at256['tpot_s']['p50']:.3f} s.",
    ]
    return "\n".join(lines) + "\n"


Row = tuple[str, str, str, bool | None]


def versus(name: str, ours: float, baseline: dict[str, Any], goal: float | None = None) -> Row:
    """loraplex's throughput over a baseline's; a baseline that failed requests has no ratio."""
    figure = f"throughput vs {name}"
    target = f">= {goal:g}x" if goal else "reported"
    failed = {s: n for s, n in baseline["statuses"].items() if s != "OK"}
    if failed or not baseline["throughput_tok_s"]:
        counts = ", ".join(f"{n} {status}" for status, n in sorted(failed.items()))
        value = f"baseline failed: {counts or 'no tokens'} of {baseline['requests']} requests"
        return figure, value, target, False if goal else None
    ratio = ours / baseline["throughput_tok_s"]
    return figure, f"{ratio:.2f}x", target, ratio >= goal if goal else None


def _verdict(met: bool | None) -> str:
    return "" if met is None else ("met" if met else "NOT met")


if __name__ == "__main__":
    main()
