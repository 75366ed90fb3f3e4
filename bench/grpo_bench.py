"""GRPO rollouts on loraplex's engine against TRL's own generate (`loraplex bench grpo`).

Both run the same GRPO steps on the default model (QLoRA: NF4 base, LoRA policy): the same
prompts (the concise task's, in the trainer's seeded order), generations per prompt and
tokens per completion. Every completion runs to its full length (TRL: `min_new_tokens`; the
engine: `ignore_eos`), so both sample the same number of tokens. Runs alternate between the
two in each round; each run's first step warms up (the engine's build, first kernels) and is
left out. Reports the median seconds per step spent generating and per whole step, and the
ratios trl / engine (targets: rollouts >= 3x, step >= 1.5x).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
TARGETS = {"rollout": 3.0, "step": 1.5}


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="loraplex bench grpo",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add = parser.add_argument
    add("--model", default="gemma3-270m", help="base model spec")
    add("--quantization", default="nf4", choices=["nf4", "int8", "none"])
    add("--rounds", type=int, default=2, help="rounds of both, alternating")
    add("--steps", type=int, default=3, help="GRPO steps per run (the first is warm-up)")
    add("--prompts", type=int, default=1, help="prompts per step (groups of --num-generations)")
    add("--num-generations", type=int, default=8, help="completions per prompt")
    add("--max-completion-length", type=int, default=32, help="tokens per completion")
    add("--out", type=Path, default=ROOT / "bench/results/grpo")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse(argv)
    runs: dict[str, list[dict[str, list[float]]]] = {"trl": [], "engine": []}
    with tempfile.TemporaryDirectory(prefix="loraplex-grpo-bench-") as scratch:
        for index in range(args.rounds):
            order = ("trl", "engine") if index % 2 == 0 else ("engine", "trl")
            for rollouts in order:
                scratch_dir = Path(scratch) / f"{rollouts}{index}"
                runs[rollouts].append(run_once(args, rollouts, scratch_dir))
                print(f"round {index + 1} {rollouts}: {runs[rollouts][-1]}", flush=True)
    summary = summarize(runs)
    results = {"workload": vars(args) | {"out": str(args.out)}, "runs": runs, "summary": summary}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "report.json").write_text(json.dumps(results, indent=2) + "\n")
    print(report(summary))
    return results


def run_once(args: argparse.Namespace, rollouts: str, scratch: Path) -> dict[str, list[float]]:
    """One GRPO run of `args.steps` steps: seconds generating and seconds per step, after the
    warm-up step."""
    from loraplex.adapters.trainer import train
    from loraplex.adapters.trainer.base import pick_device, resolve_base
    from loraplex.adapters.trainer.config import TrainConfig
    from loraplex.adapters.trainer.tasks import TASKS

    config = TrainConfig(
        model=args.model, quantization=args.quantization, method="grpo",
        data=TASKS["concise"].path("train"), reward=["length"], rollouts=rollouts,  # type: ignore[arg-type]
        max_steps=args.steps, batch_size=args.prompts * args.num_generations,
        num_generations=args.num_generations, max_completion_length=args.max_completion_length,
        output=scratch / "adapter", checkpoint_dir=scratch / "checkpoints", progress=False,
    )  # fmt: skip
    trainer = train.build_trainer(config, train.load_data(config), resolve_base(config),
                                  pick_device(config.device))  # fmt: skip
    if trainer.rollout_func is None:
        trainer.generation_config.min_new_tokens = args.max_completion_length
    else:
        trainer.rollout_func.full_length = True
    timings = _timed(trainer)
    trainer.train()
    return {name: seconds[1:] for name, seconds in timings.items()}


def _timed(trainer: Any) -> dict[str, list[float]]:
    """Seconds in each call of the trainer's `_generate` (both rollout paths pass through it)
    and per optimizer step."""
    from transformers import TrainerCallback

    timings: dict[str, list[float]] = {"rollout": [], "step": []}
    generate = trainer._generate

    def timed_generate(*call: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        try:
            return generate(*call, **kwargs)
        finally:
            timings["rollout"].append(time.perf_counter() - started)

    class StepTimer(TrainerCallback):  # type: ignore[misc]
        started = 0.0

        def on_step_begin(self, *_: Any, **__: Any) -> None:
            self.started = time.perf_counter()

        def on_step_end(self, *_: Any, **__: Any) -> None:
            timings["step"].append(time.perf_counter() - self.started)

    trainer._generate = timed_generate
    trainer.add_callback(StepTimer())
    return timings


def summarize(runs: dict[str, list[dict[str, list[float]]]]) -> dict[str, Any]:
    """Median seconds per step for each, and the trl / engine ratios against their targets."""
    medians = {
        rollouts: {name: statistics.median(s for run in done for s in run[name])
                   for name in TARGETS}
        for rollouts, done in runs.items()
    }  # fmt: skip
    ratios = {name: medians["trl"][name] / medians["engine"][name] for name in TARGETS}
    return {"median_s": medians, "ratios": ratios,
            "met": {name: ratios[name] >= TARGETS[name] for name in TARGETS}}  # fmt: skip


def report(summary: dict[str, Any]) -> str:
    lines = [f"{'rollouts':<8} {'generate s/step':>16} {'step s':>8}"]
    for rollouts, medians in summary["median_s"].items():
        lines.append(f"{rollouts:<8} {medians['rollout']:>16.2f} {medians['step']:>8.2f}")
    for name, ratio in summary["ratios"].items():
        met = "met" if summary["met"][name] else "not met"
        lines.append(f"trl / engine, {name}: {ratio:.2f}x (target >= {TARGETS[name]}x, {met})")
    return "\n".join(lines)
