"""Throughput of the hf engine against PEFT baselines, on the real base in NF4 (one run, ratios).

    .venv/bin/python -m loraplex.bench.engine_bench [--new-tokens 64] [--requests 16]

Workload: REQUESTS concurrent requests spread over 8 adapters (rank 16, all-linear), NEW_TOKENS
greedy tokens each. Prints a JSON report with each figure beside the issue's target.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from loraplex.adapters.peft_format import read_adapter
from loraplex.adapters.store import AdapterStore
from loraplex.server.config import DEFAULT_MODEL, default_cache_dir
from loraplex.server.engine.api import SamplingParams, SequenceRequest, StepPlan
from loraplex.server.engine.config import EngineConfig
from loraplex.server.engine.hf import HFEngine
from loraplex.server.engine.hf_model import quantization_kwargs
from loraplex.server.models import hf_checkpoint, resolve
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

PROMPTS = [
    "Write a short poem about the sea.",
    "Explain what a hash table is.",
    "List three uses of copper.",
    "Summarize the plot of Hamlet.",
]


def make_adapters(checkpoint: Path, root: Path, count: int) -> list[str]:
    base = AutoModelForCausalLM.from_pretrained(checkpoint)
    names = []
    for i in range(count):
        config = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear")
        model = get_peft_model(base, config)
        generator = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for param in model.parameters():
                if param.requires_grad:
                    param.copy_(torch.randn(param.shape, generator=generator) * 0.02)
        model.save_pretrained(root / f"lora-{i}")
        base = model.unload()
        names.append(f"lora-{i}")
    return names


def timed(fn: Callable[[], int]) -> float:
    start = time.perf_counter()
    tokens = fn()
    return tokens / (time.perf_counter() - start)


def engine_run(
    engine: HFEngine, prompts: list[list[int]], adapters: list[str | None], n: int
) -> int:
    requests = []
    for i, (prompt, adapter) in enumerate(zip(prompts, adapters, strict=True)):
        ref = engine.store.acquire(adapter) if adapter else None
        params = SamplingParams(max_new_tokens=n)
        requests.append(SequenceRequest(f"r{i}", prompt, params, ref))
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


def peft_model(checkpoint: Path, root: Path, names: list[str], config: EngineConfig) -> PeftModel:
    kwargs = quantization_kwargs(config, torch.device("cpu"))
    base = AutoModelForCausalLM.from_pretrained(checkpoint, **kwargs).eval()
    model = PeftModel.from_pretrained(base, root / names[0], adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(root / name, adapter_name=name)
    return model.eval()


def peft_naive(model: PeftModel, prompts: list[list[int]], adapters: list[str], n: int) -> int:
    tokens = 0
    for prompt, adapter in zip(prompts, adapters, strict=True):
        model.set_adapter(adapter)
        out = model.generate(input_ids=torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n,
                             do_sample=False)  # fmt: skip
        tokens += out.shape[1] - len(prompt)
    return tokens


def peft_static(model: PeftModel, prompts: list[list[int]], adapters: list[str], n: int) -> int:
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    out = model.generate(input_ids=ids, attention_mask=mask, adapter_names=adapters,
                         max_new_tokens=n, min_new_tokens=n, do_sample=False)  # fmt: skip
    return int((out.shape[1] - width) * len(prompts))


def load_times(root: Path, engine: HFEngine, name: str, repeats: int = 9) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        read_adapter(name, root / name, engine.base.spec)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--skip-naive", action="store_true")
    args = parser.parse_args()
    torch.manual_seed(0)
    checkpoint = hf_checkpoint(resolve(DEFAULT_MODEL, default_cache_dir()), default_cache_dir())
    root = Path(tempfile.mkdtemp(prefix="loraplex-bench-"))
    names = make_adapters(checkpoint, root, 64)
    config = EngineConfig(checkpoint=checkpoint, quantization="nf4", adapter_slots=64,
                          max_lora_rank=16, adapter_mode="batched")  # fmt: skip
    engine = HFEngine.from_config(config, AdapterStore([root], max_resident=64))
    n, count = args.new_tokens, args.requests
    prompts = [engine.encode(PROMPTS[i % len(PROMPTS)]) for i in range(count)]
    over8 = [names[i % 8] for i in range(count)]
    over64 = [names[(i * 4) % 64] for i in range(count)]  # 16 distinct of 64 resident
    report: dict[str, object] = {"requests": count, "new_tokens": n, "device": str(engine.device)}
    engine_run(engine, prompts[:2], over8[:2], 4)  # warm-up
    mixed = timed(lambda: engine_run(engine, prompts, over8, n))
    base = timed(lambda: engine_run(engine, prompts, [None] * count, n))
    for name in names:
        engine.store.load(name)
        engine.slots.hold(engine.store.get(engine.store.acquire(name)))
    mixed64 = timed(lambda: engine_run(engine, prompts, over64, n))
    model = peft_model(checkpoint, root, names[:8], config)
    static = timed(lambda: peft_static(model, prompts, over8, n))
    naive = None if args.skip_naive else timed(lambda: peft_naive(model, prompts, over8, n))
    report.update(
        engine_mixed_tok_s=mixed, engine_base_only_tok_s=base, engine_64_resident_tok_s=mixed64,
        peft_static_tok_s=static, peft_naive_tok_s=naive,
        vs_naive=None if naive is None else mixed / naive, vs_naive_target=4.0,
        vs_static=mixed / static, vs_static_target=1.5,
        mixed_vs_base=mixed / base, mixed_vs_base_target=0.85,
        drop_64_vs_8=1 - mixed64 / mixed, drop_64_vs_8_target=0.10,
        load_rank16_all_linear_p50_s=load_times(root, engine, names[0]),
        peak_rss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    )  # fmt: skip
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
