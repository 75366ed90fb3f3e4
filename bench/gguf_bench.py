"""GGUF backend throughput against raw llama-cpp-python on the same GGUF file.

Each case runs in its own process, so its peak RSS is its own. Greedy decoding throughout;
tokens/s counts generated tokens over the wall time from the first prefill to the last token.

    python -m loraplex.bench.gguf_bench --quants q4_k_m,q5_k_m --tokens 64 --threads 2

The adapters are 8 random rank-16 LoRAs on every linear layer (--lora-rank, --lora-targets).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from loraplex.bench.gguf_random_lora import ALL_LINEAR, TARGETS, write_random_lora
from loraplex.bench.plain_llama import plain_llama
from loraplex.server.config import DEFAULT_MODEL, default_cache_dir
from loraplex.server.engine.api import AdapterRef, SamplingParams, SequenceRequest, StepPlan
from loraplex.server.engine.gguf import GGUFEngine
from loraplex.server.engine.gguf_quantize import quantized_path, requantize
from loraplex.server.engine.gguf_runtime import RuntimeConfig
from loraplex.server.models import resolve

PROMPT = "Write a long story about a lighthouse keeper who finds a message in a bottle."
STREAMS = 8
GROUPED = "ours_8_eight_adapters_grouped"  # one decode call per adapter, as stock llama.cpp
CASES = (
    "raw",
    "ours_1",
    "ours_1_repacked",
    "ours_1_adapter",
    "ours_1_adapter_grouped",
    "ours_8_one_adapter",
    "ours_8_eight_adapters",
    "ours_8_eight_adapters_grouped",
    "reload_8",
    "switch",
)


def main(argv: Sequence[str] | None = None) -> None:
    args = _parse(argv)
    base = resolve(args.model, default_cache_dir())
    assert base.sha256 is not None
    with tempfile.TemporaryDirectory(prefix="gguf-bench-") as scratch:
        targets = ALL_LINEAR if args.lora_targets == "all-linear" else TARGETS
        loras = [
            write_random_lora(
                base.path,
                Path(scratch) / f"l{i}.gguf",
                i,
                args.lora_rank,
                std=args.lora_std,
                targets=targets,
            )
            for i in range(STREAMS)
        ]
        report = {}
        for quant in args.quants.split(","):
            path = base.path
            if quant != "q4_k_m":  # the default model's own format
                target = quantized_path(base.path, quant, default_cache_dir(), base.sha256)
                path = requantize(base.path, target, quant)
            report[quant] = _run_quant(path, loras, args)
            _print_quant(quant, report[quant])
    print(json.dumps(report, indent=2))


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="loraplex bench gguf", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--quants", default="q4_k_m,q5_k_m")
    parser.add_argument("--tokens", type=int, default=64, help="new tokens per stream")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--rounds", type=int, default=3, help="rounds of every case, interleaved; medians"
    )
    parser.add_argument("--lora-rank", type=int, default=16)
    parser.add_argument(
        "--lora-std",
        type=float,
        default=0.02,
        help="the random adapters' weight spread; larger ones turn the text to noise, and "
        "streams that stop early at EOS would make the cases run unequal work",
    )
    parser.add_argument(
        "--lora-targets",
        choices=["all-linear", "q-v"],
        default="all-linear",
        help="the random adapters' targets: every linear of each block, or attn_q and attn_v",
    )
    parser.add_argument("--case", choices=CASES, help=argparse.SUPPRESS)  # child process
    parser.add_argument("--path", help=argparse.SUPPRESS)
    parser.add_argument("--loras", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def _run_quant(path: Path, loras: list[Path], args: argparse.Namespace) -> dict[str, dict]:
    """Every case once per round, rounds interleaved (this machine's speed drifts within
    minutes); each case reports its round of median throughput."""
    rounds: dict[str, list[dict]] = {case: [] for case in CASES}
    for _ in range(args.rounds):
        for case in CASES:
            if case == "ours_1_repacked" and _cpu_has_amx():
                continue
            rounds[case].append(_run_case(case, path, loras, args))
    skipped = {"skipped": "llama.cpp 0.3.36 crashes on repacked weights with AMX"}
    return {case: _median_round(runs) if runs else skipped for case, runs in rounds.items()}


def _run_case(case: str, path: Path, loras: list[Path], args: argparse.Namespace) -> dict:
    command = [sys.executable, "-m", "loraplex.bench.gguf_bench", "--case", case]
    command += ["--path", str(path), "--loras", ",".join(map(str, loras))]
    command += ["--tokens", str(args.tokens), "--threads", str(args.threads)]
    done = subprocess.run(command, check=True, capture_output=True, text=True)
    result: dict = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def _median_round(runs: list[dict]) -> dict:
    key = "tokens_per_s" if "tokens_per_s" in runs[0] else "switch_ms"
    ordered = sorted(runs, key=lambda r: float(r[key]))
    return {**ordered[len(ordered) // 2], "rounds": [round(float(r[key]), 2) for r in runs]}


def _cpu_has_amx() -> bool:
    import llama_cpp

    return "AMX_INT8 = 1" in llama_cpp.llama_print_system_info().decode()


def _print_quant(quant: str, r: dict[str, dict]) -> None:
    def tps(case: str) -> float:
        return float(r[case]["tokens_per_s"])

    one, eight, mixed = tps("ours_1"), tps("ours_8_one_adapter"), tps("ours_8_eight_adapters")
    one_adapter = tps("ours_1_adapter") / tps("ours_1_adapter_grouped")
    rows = [
        ("one stream, ours / raw", one / tps("raw"), 0.9),
        ("one stream on an adapter, per-sequence / grouped", one_adapter, 0.95),
        ("8 streams one adapter / ours one stream", eight / one, 2.0),
        ("8 streams 8 adapters / 8 streams one adapter", mixed / eight, 0.85),
        ("8 streams 8 adapters / reload baseline", mixed / tps("reload_8"), 3.5),
        ("8 streams 8 adapters, per-sequence / grouped", mixed / tps(GROUPED), 1.0),
    ]
    print(f"== {quant}", file=sys.stderr)
    for case, result in r.items():
        print(f"  {case:24s} {json.dumps(result)}", file=sys.stderr)
    for name, ratio, target in rows:
        verdict = "met" if ratio >= target else "MISSED"
        print(f"  {name:48s} {ratio:6.2f}x  (target >= {target}x, {verdict})", file=sys.stderr)


# ---- child cases ----------------------------------------------------------------------------


def _child(args: argparse.Namespace) -> None:
    path, loras = Path(args.path), [Path(p) for p in args.loras.split(",")]
    cases: dict[str, Callable[[], dict[str, float]]] = {
        "raw": lambda: _raw(path, args),
        "ours_1": lambda: _ours(path, [None], loras, args),
        "ours_1_repacked": lambda: _ours(path, [None], loras, args, repack_weights=True),
        "ours_1_adapter": lambda: _ours(path, [0], loras, args),
        "ours_1_adapter_grouped": lambda: _ours(path, [0], loras, args, per_sequence=False),
        "ours_8_one_adapter": lambda: _ours(path, [0] * STREAMS, loras, args),
        "ours_8_eight_adapters": lambda: _ours(path, list(range(STREAMS)), loras, args),
        GROUPED: lambda: _ours(path, list(range(STREAMS)), loras, args, per_sequence=False),
        "reload_8": lambda: _reload(path, loras, args),
        "switch": lambda: _switch_cost(path, loras, args),
    }
    result = cases[args.case]()
    result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(result))


def _raw(path: Path, args: argparse.Namespace, lora: Path | None = None) -> dict[str, float]:
    llm = plain_llama(
        str(path),
        n_ctx=512,
        n_threads=args.threads,
        lora_path=None if lora is None else str(lora),
        verbose=False,
    )
    started = time.perf_counter()
    tokens = _raw_generate(llm, args.tokens)
    elapsed = time.perf_counter() - started
    return {"tokens": tokens, "seconds": elapsed, "tokens_per_s": tokens / elapsed}


def _raw_generate(llm: object, n_tokens: int) -> int:
    """Greedy tokens through the high-level API, as a user of llama-cpp-python would."""
    prompt = llm.tokenize(PROMPT.encode())  # type: ignore[attr-defined]
    count = 0
    for token in llm.generate(prompt, top_k=1, temp=0.0):  # type: ignore[attr-defined]
        count += 1
        if count == n_tokens or llm.token_eos() == token:  # type: ignore[attr-defined]
            break
    return count


def _engine(
    path: Path,
    loras: list[Path],
    args: argparse.Namespace,
    repack_weights: bool = False,
    per_sequence: bool = True,
) -> GGUFEngine:
    config = RuntimeConfig(
        n_ctx_per_seq=512,
        n_seq_max=STREAMS,
        n_threads=args.threads,
        repack_weights=repack_weights,
    )
    engine = GGUFEngine(path, config, per_sequence_lora=per_sequence)
    for i, lora in enumerate(loras):
        engine.adapters.add(f"l{i}", 1, lora)
    return engine


def _ours(
    path: Path,
    adapters: list[int | None],
    loras: list[Path],
    args: argparse.Namespace,
    repack_weights: bool = False,
    per_sequence: bool = True,
) -> dict[str, float]:
    engine = _engine(path, loras, args, repack_weights, per_sequence)
    prompt = engine.encode(PROMPT)
    requests = [
        SequenceRequest(
            f"s{i}",
            prompt,
            SamplingParams(max_new_tokens=args.tokens),
            None if a is None else AdapterRef(f"l{a}", 1),
        )
        for i, a in enumerate(adapters)
    ]
    _warm_up(engine, requests)
    started = time.perf_counter()
    tokens, switches, steps, plan = 0, 0, 0, StepPlan(prefill=requests)
    while plan.prefill or plan.decode:
        events = engine.step(plan)
        tokens += sum(e.token_id is not None for e in events)
        switches += engine.last_step.adapter_switches
        steps += 1
        plan = StepPlan(decode=engine.running())
    elapsed = time.perf_counter() - started
    engine.close()
    return {
        "tokens": tokens,
        "seconds": elapsed,
        "tokens_per_s": tokens / elapsed,
        "adapter_switches": switches,
        "adapter_switches_per_step": switches / steps,
    }


def _warm_up(engine: GGUFEngine, requests: list[SequenceRequest]) -> None:
    """Load each adapter and run one token on it before the clock starts, as in a warm server
    (the per-sequence path writes an adapter into its slot once, at its first request)."""
    adapters = {r.adapter for r in requests if r.adapter is not None}
    prompt = requests[0].prompt_ids[:2]
    warm = [
        SequenceRequest(f"warm{i}", prompt, SamplingParams(max_new_tokens=1), ref)
        for i, ref in enumerate(adapters)
    ]
    for r in requests + warm:
        engine.check(r)
    if warm:
        engine.step(StepPlan(prefill=warm))  # each ends at its one token


def _reload(path: Path, loras: list[Path], args: argparse.Namespace) -> dict[str, float]:
    """8 requests on 8 adapters, served one after another by reloading Llama with lora_path."""
    started = time.perf_counter()
    tokens = sum(_raw(path, args, lora)["tokens"] for lora in loras[:STREAMS])
    elapsed = time.perf_counter() - started
    return {"tokens": tokens, "seconds": elapsed, "tokens_per_s": tokens / elapsed}


def _switch_cost(path: Path, loras: list[Path], args: argparse.Namespace) -> dict[str, float]:
    """Batch-1 decode time with the same adapter each call, and alternating two adapters."""
    engine = _engine(path, loras, args)
    prompt = engine.encode(PROMPT)
    timings = {}
    for name, ids in (("same", [0, 0]), ("alternating", [0, 1])):
        refs = [AdapterRef(f"l{i}", 1) for i in ids]
        requests = [
            SequenceRequest(f"{name}{j}", prompt, SamplingParams(max_new_tokens=1000), ref)
            for j, ref in enumerate(refs)
        ]
        engine.step(StepPlan(prefill=requests))
        samples = []
        for _ in range(args.tokens // 2):
            for request in requests:  # one sequence per step: each step may switch adapters
                started = time.perf_counter()
                engine.step(StepPlan(decode=[request.seq_id]))
                samples.append(time.perf_counter() - started)
        timings[name] = float(np.median(samples)) * 1000
        for request in requests:
            engine.release(request.seq_id)
    engine.close()
    return {
        "decode_ms_same_adapter": timings["same"],
        "decode_ms_alternating": timings["alternating"],
        "switch_ms": timings["alternating"] - timings["same"],
    }


if __name__ == "__main__":
    _child(_parse(None)) if "--case" in sys.argv else main()
