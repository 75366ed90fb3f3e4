"""Decode steps while another thread loads adapters: overlapping against taking turns.

    .venv/bin/python -m loraplex.bench.turns_bench [--rows 8] [--load-gap 0.25]

The hf engine decodes --rows sequences on the real base in NF4 while a second thread loads a
cold rank-16 all-linear LoRA every --load-gap seconds, as gRPC threads do for requests naming
adapters not yet resident. Three modes, interleaved over --rounds: no loads; loads
overlapping the steps; loads taking turns with the steps (loraplex.server.cpu_turns, what the
server does on a CPU). Prints step and load times per mode, and each mode's step time over
the time with no loads.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from loraplex.adapters.errors import AdapterNotFound
from loraplex.adapters.store import AdapterStore
from loraplex.bench.engine_bench import RESIDENT, adapters_in_child
from loraplex.server.config import DEFAULT_MODEL, default_cache_dir
from loraplex.server.cpu_turns import CpuTurns
from loraplex.server.engine.api import SamplingParams, SequenceRequest, StepPlan
from loraplex.server.engine.config import EngineConfig
from loraplex.server.engine.hf import HFEngine
from loraplex.server.models import hf_checkpoint, resolve

MODES = ("no loads", "overlapping", "taking turns")


def start_rows(engine: HFEngine, names: list[str], rows: int) -> list[SequenceRequest]:
    """Prefill `rows` sequences, each on its own adapter, long enough for the whole run."""
    sampling = SamplingParams(max_new_tokens=4096)
    requests = [
        SequenceRequest(f"row-{i}", list(range(10, 42)), sampling, engine.store.acquire(name))
        for i, name in enumerate(names[:rows])
    ]
    engine.step(StepPlan(prefill=requests, decode=[]))
    return requests


def cold_loads(store: AdapterStore, names: list[str], gap_s: float, stop: threading.Event,
               seconds: list[float]) -> None:  # fmt: skip
    """Unload, then load again, one idle adapter after another."""
    i = 0
    while not stop.wait(gap_s):
        name = names[i % len(names)]
        with contextlib.suppress(AdapterNotFound):  # not loaded yet
            store.unload(name)
        started = time.perf_counter()
        store.load(name)
        seconds.append(time.perf_counter() - started)
        i += 1


def run_mode(engine: HFEngine, names: list[str], mode: str,
             args: argparse.Namespace) -> tuple[list[float], list[float]]:  # fmt: skip
    """Step times and load times of --steps decode steps of fresh rows in one mode."""
    requests, idle = start_rows(engine, names, args.rows), names[args.rows :]
    turns = CpuTurns() if mode == "taking turns" else None
    engine.store.side_work = turns.side_work if turns else contextlib.nullcontext
    steps: list[float] = []
    loads: list[float] = []
    stop = threading.Event()
    loader = threading.Thread(
        target=cold_loads, args=(engine.store, idle, args.load_gap, stop, loads)
    )
    if mode != "no loads":
        loader.start()
    plan = StepPlan(prefill=[], decode=[r.seq_id for r in requests])
    for _ in range(args.steps):
        started = time.perf_counter()
        with turns.step() if turns else contextlib.nullcontext():
            engine.step(plan)
        steps.append(time.perf_counter() - started)
    stop.set()
    if loader.is_alive():
        loader.join()
    ended = args.rows - len(engine.running())
    for request in requests:
        engine.release(request.seq_id)
        if request.adapter is not None:
            engine.store.release(request.adapter)
    if ended:
        print(f"note: {ended} of {args.rows} rows ended early (EOS) in a {mode} run")
    return steps, loads


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="loraplex bench turns",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--rows", type=int, default=8, help="sequences decoding")
    parser.add_argument("--load-gap", type=float, default=0.25, help="seconds between loads")
    parser.add_argument("--steps", type=int, default=16, help="decode steps per mode and round")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    cache = default_cache_dir()
    checkpoint = hf_checkpoint(resolve(DEFAULT_MODEL, cache), cache)
    root = Path(tempfile.mkdtemp(prefix="loraplex-turns-"))
    names = adapters_in_child(root, checkpoint)
    config = EngineConfig(checkpoint=checkpoint, adapter_roots=[root], max_lora_rank=16,
                          adapter_slots=RESIDENT, max_batch_size=args.rows,
                          max_resident_adapters=RESIDENT)  # fmt: skip
    engine = HFEngine.from_config(config)
    times: dict[str, list[float]] = {mode: [] for mode in MODES}
    loads: dict[str, list[float]] = {mode: [] for mode in MODES}
    for _ in range(args.rounds):
        for mode in MODES:
            step_s, load_s = run_mode(engine, names, mode, args)
            times[mode] += step_s
            loads[mode] += load_s
    report(times, loads, args)


def report(times: dict[str, list[float]], loads: dict[str, list[float]],
           args: argparse.Namespace) -> None:  # fmt: skip
    alone = statistics.median(times["no loads"])
    result = {
        mode: {
            "step_p50_ms": 1000 * statistics.median(times[mode]),
            "step_max_ms": 1000 * max(times[mode]),
            "step_vs_no_loads": statistics.median(times[mode]) / alone,
            "loads": len(loads[mode]),
            "load_p50_ms": 1000 * statistics.median(loads[mode]) if loads[mode] else None,
        }
        for mode in MODES
    }
    print(f"{args.rows} rows decoding, a cold rank-16 all-linear LoRA load every "
          f"{args.load_gap} s, {args.rounds} interleaved rounds of {args.steps} steps")  # fmt: skip
    print(f"{'mode':<14} {'step p50 ms':>12} {'step max ms':>12} {'x no loads':>11} "
          f"{'loads':>6} {'load p50 ms':>12}")  # fmt: skip
    for mode, r in result.items():
        load = f"{r['load_p50_ms']:.0f}" if r["load_p50_ms"] is not None else "-"
        print(f"{mode:<14} {r['step_p50_ms']:>12.0f} {r['step_max_ms']:>12.0f} "
              f"{r['step_vs_no_loads']:>11.2f} {r['loads']:>6} {load:>12}")  # fmt: skip
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
