"""gRPC front-end figures on the real base (NF4): time to first token with concurrent clients,
and the server's throughput against the engine alone on the same workload (one run each).

    .venv/bin/python -m loraplex.bench.grpc_bench [--clients 8] [--requests 32] [--new-tokens 32]

Workload: REQUESTS greedy requests of NEW_TOKENS tokens over 4 LoRA adapters (rank 16,
all-linear) and the base, at most CLIENTS in flight. `loraplex serve` runs in a child process;
the engine alone (same settings, continuous refill up to CLIENTS sequences) runs the workload
in this process before and after CLIENTS client threads stream the same requests to the server.
Time to first token is measured by the clients, from sending the request to the first chunk.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import queue
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Sequence
from pathlib import Path

from loraplex.clients import Client
from loraplex.clients.errors import LoraplexClientError

PROMPTS = [
    "Write a short poem about the sea.",
    "Explain what a hash table is.",
    "List three uses of copper.",
    "Summarize the plot of Hamlet.",
]
ADAPTERS = 4


def workload(count: int, names: list[str]) -> list[tuple[str, str]]:
    choices = ["", *names]
    return [(PROMPTS[i % len(PROMPTS)], choices[i % len(choices)]) for i in range(count)]


def engine_alone(
    checkpoint: Path, root: Path, jobs: list[tuple[str, str]], args: argparse.Namespace
) -> float:
    """Tokens per second of the engine driven directly, refilling up to `clients` sequences."""
    from loraplex.adapters.store import AdapterStore
    from loraplex.server.engine.api import SamplingParams, SequenceRequest, StepPlan
    from loraplex.server.engine.hf import HFEngine

    engine = HFEngine.from_config(engine_config(checkpoint, root, args), AdapterStore([root]))
    params = SamplingParams(max_new_tokens=args.new_tokens)

    def request(i: int, prompt: str, adapter: str) -> SequenceRequest:
        ref = engine.store.acquire(adapter) if adapter else None
        return SequenceRequest(f"r{i}", engine.encode(prompt), params, ref)

    engine.step(StepPlan(prefill=[request(-1, "warm up", "")]))
    while engine.running():
        engine.step(StepPlan(decode=engine.running()))
    pending = deque(request(i, p, a) for i, (p, a) in enumerate(jobs))
    tokens, start = 0, time.perf_counter()
    while pending or engine.running():
        running = engine.running()
        room = args.clients - len(running)
        prefill = [pending.popleft() for _ in range(min(room, len(pending)))]
        events = engine.step(StepPlan(prefill=prefill, decode=running))
        tokens += sum(e.token_id is not None for e in events)
    return tokens / (time.perf_counter() - start)


def engine_config(checkpoint: Path, root: Path, args: argparse.Namespace):  # type: ignore[no-untyped-def]
    from loraplex.server.engine.config import EngineConfig

    return EngineConfig(
        checkpoint=checkpoint, quantization="nf4", adapter_mode="batched", max_lora_rank=16,
        adapter_slots=ADAPTERS, max_batch_size=args.clients, adapter_roots=[root],
    )  # fmt: skip


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server(root: Path, args: argparse.Namespace) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    command = [
        sys.executable, "-m", "loraplex.server.cli", "serve", "--quantization", "nf4",
        "--adapter-mode", "batched", "--max-lora-rank", "16", "--adapter-roots", str(root),
        "--max-batch-sequences", str(args.clients), "--max-adapters-per-step", str(ADAPTERS),
        "--port", str(port), "--metrics-port", str(free_port()), "--log-level", "warning",
    ]  # fmt: skip
    proc = subprocess.Popen(command)
    target = f"127.0.0.1:{port}"
    with Client(target, timeout=5) as client:
        for _ in range(600):
            try:
                if client.health() == "SERVING":
                    return proc, target
            except LoraplexClientError:
                time.sleep(0.5)
    proc.kill()
    raise RuntimeError("the server did not start")


def through_server(
    target: str, jobs: list[tuple[str, str]], args: argparse.Namespace
) -> tuple[float, list[float]]:
    """Tokens per second and each request's time to first token, with `clients` threads."""
    todo: queue.SimpleQueue[tuple[str, str]] = queue.SimpleQueue()
    for job in jobs:
        todo.put(job)
    ttfts: list[float] = []
    tokens: list[int] = []
    lock = threading.Lock()

    def client_thread(client: Client) -> None:
        while True:
            try:
                prompt, adapter = todo.get_nowait()
            except queue.Empty:
                return
            sent = time.perf_counter()
            stream = client.stream(prompt, adapter=adapter, max_new_tokens=args.new_tokens)
            first, count = None, 0
            for chunk in stream:
                first = first or time.perf_counter()
                count += len(chunk.token_ids)
            with lock:
                ttfts.append((first or sent) - sent)
                tokens.append(count)

    with Client(target, timeout=600) as client:
        client.generate("warm up", max_new_tokens=2)
        threads = [
            threading.Thread(target=client_thread, args=(client,)) for _ in range(args.clients)
        ]
        start = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        elapsed = time.perf_counter() - start
    return sum(tokens) / elapsed, ttfts


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def progress(**figures: object) -> None:
    """Each phase's figures as soon as they exist, so a cut-short run still reports them."""
    print(json.dumps(figures), file=sys.stderr, flush=True)


def main(argv: Sequence[str] | None = None) -> None:
    # A SIGTERM (e.g. from `timeout`) unwinds through the finally that stops the server.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    parser = argparse.ArgumentParser(
        prog="loraplex bench grpc",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--clients", type=int, default=8, help="concurrent clients")
    parser.add_argument("--requests", type=int, default=32, help="requests in the workload")
    parser.add_argument("--new-tokens", type=int, default=32, help="greedy tokens per request")
    args = parser.parse_args(argv)
    from loraplex.bench.peft_baselines import make_adapters
    from loraplex.server.config import DEFAULT_MODEL, default_cache_dir
    from loraplex.server.models import hf_checkpoint, resolve

    checkpoint = hf_checkpoint(resolve(DEFAULT_MODEL, default_cache_dir()), default_cache_dir())
    root = Path(tempfile.mkdtemp(prefix="loraplex-grpc-bench-"))
    names = make_adapters(checkpoint, root, ADAPTERS)
    jobs = workload(args.requests, names)
    load_before = os.getloadavg()
    # The idle server costs nothing while the engine runs alone before and after the served
    # run; two engine figures show how much the machine's load drifted meanwhile.
    proc, target = start_server(root, args)
    try:
        alone_before = engine_alone(checkpoint, root, jobs, args)
        progress(engine_alone_tok_s_before=alone_before)
        gc.collect()
        served, ttfts = through_server(target, jobs, args)
        progress(grpc_server_tok_s=served, ttfts_s=ttfts)
        alone_after = engine_alone(checkpoint, root, jobs, args)
    finally:
        proc.terminate()
        proc.wait(120)
    alone = statistics.fmean([alone_before, alone_after])
    report = {
        "clients": args.clients, "requests": args.requests, "new_tokens": args.new_tokens,
        "ttft_p50_s": percentile(ttfts, 0.5), "ttft_p99_s": percentile(ttfts, 0.99),
        "ttft_mean_s": statistics.fmean(ttfts),
        "engine_alone_tok_s_before": alone_before, "engine_alone_tok_s_after": alone_after,
        "grpc_server_tok_s": served, "server_over_engine_ratio": served / alone,
        "load_average_1m_before_after": [load_before[0], os.getloadavg()[0]],
    }  # fmt: skip
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
