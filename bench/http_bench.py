"""`loraplex bench http`: the OpenAI-compatible HTTP front end against gRPC, on one server.

    loraplex bench http [--rounds 3] [--clients 16] [--requests 48] [--new-tokens 64]

One `loraplex serve --http-port` on the default model serves both front ends. Workload:
`--clients` closed-loop clients stream greedy requests of `--prompt-words` words and
`--new-tokens` tokens, each on an adapter drawn uniformly from the packaged default adapters
or the base. Each round runs the same trace over gRPC (loraplex's asyncio client) and over
HTTP (the official `openai` client, server-sent events), in alternating order so that drift
in the machine's load falls on both alike; the ratio of throughputs is taken round by round
and reported as their median.

The HTTP clients read the event stream with httpx2 and json (what the `openai` client runs
on, without its per-chunk model objects), so that on a small machine the client's own CPU
share, which the server competes with, costs about what the gRPC client's does. The `openai`
client itself drives the HTTP API's tests.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import replace
from typing import Any

import httpx2

from loraplex.bench import load_bench
from loraplex.bench.peers_bench import _grpc_sender, _run, _wait_http, _warm_up
from loraplex.bench.runner import RequestRecord
from loraplex.bench.workload import Trace, TraceRequest, WorkloadSpec, generate

PROTOCOLS = ("grpc", "http")
TARGET_RATIO = 0.95  # HTTP throughput over gRPC's, both streaming on one server


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="loraplex bench http",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add = parser.add_argument
    add("--rounds", type=int, default=3, help="rounds of both front ends, interleaved")
    add("--clients", type=int, default=16, help="closed-loop clients")
    add("--requests", type=int, default=48, help="requests per front end and round")
    add("--prompt-words", type=int, default=64)
    add("--new-tokens", type=int, default=64)
    add("--serve-args", default="", help="extra `loraplex serve` flags")
    return parser.parse_args(argv)


def trace(args: argparse.Namespace, adapter_ids: list[str]) -> Trace:
    spec = WorkloadSpec(
        num_adapters=len(adapter_ids) + 1, popularity="uniform", ranks=(16,),
        arrival="closed", concurrency=args.clients, num_requests=args.requests,
        prompt_tokens=(args.prompt_words, args.prompt_words),
        output_tokens=(args.new_tokens, args.new_tokens),
    )  # fmt: skip
    drawn = generate(spec)
    # The trace's adapter k is the k-th packaged adapter; the last one stands for the base.
    names = {a.adapter_id: ([*adapter_ids, ""])[k] for k, a in enumerate(drawn.adapters)}
    requests = [replace(r, adapter_id=names[r.adapter_id]) for r in drawn.requests]
    return Trace(spec, drawn.adapters, requests)


@contextlib.contextmanager
def server(args: argparse.Namespace) -> Iterator[dict[str, Callable[[], Any]]]:
    """One server; yields a sender factory per front end."""
    grpc_port, http_port = load_bench._free_port(), load_bench._free_port()
    command = [sys.executable, "-m", "loraplex.server.cli", "serve", "--port", str(grpc_port),
               "--http-port", str(http_port), "--metrics-port", "0", "--log-level", "warning",
               "--max-batch-sequences", str(args.clients), *args.serve_args.split()]  # fmt: skip
    proc = subprocess.Popen(command)
    try:
        target = f"127.0.0.1:{grpc_port}"
        load_bench.wait_until_serving(proc, target)
        base_url = f"http://127.0.0.1:{http_port}"
        _wait_http(proc, base_url + "/health")
        yield {
            "grpc": lambda: _grpc_sender(target),
            "http": lambda: http_sender(base_url + "/v1/completions"),
        }
    finally:
        proc.terminate()
        proc.wait(120)


@contextlib.asynccontextmanager
async def http_sender(url: str) -> AsyncIterator[Callable[[TraceRequest], Any]]:
    limits = httpx2.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx2.AsyncClient(timeout=3600, limits=limits) as client:

        async def sender(request: TraceRequest) -> RequestRecord:
            return await http_send(client, url, request)

        yield sender


async def http_send(client: httpx2.AsyncClient, url: str, request: TraceRequest) -> RequestRecord:
    """One streamed completion, timed as runner.send times a gRPC one."""
    body = {"model": request.adapter_id, "prompt": request.prompt, "stream": True,
            "max_tokens": request.output_tokens, "temperature": 0,
            "stream_options": {"include_usage": True}}  # fmt: skip
    sent = time.perf_counter()
    stamps: list[float] = []
    usage: dict[str, int] = {}
    status, error = "OK", ""
    async with client.stream("POST", url, json=body) as response:
        if response.status_code != 200:
            status, error = str(response.status_code), (await response.aread()).decode()[:200]
        async for line in response.aiter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if chunk["choices"] and chunk["choices"][0]["text"]:
                stamps.append(time.perf_counter())
            usage = chunk.get("usage") or usage
    end = time.perf_counter()
    gaps = len(stamps) - 1
    return RequestRecord(
        index=request.index, adapter_id=request.adapter_id, status=status, queue_s=0.0,
        ttft_s=(stamps[0] if stamps else end) - sent,
        tpot_s=(stamps[-1] - stamps[0]) / gaps if gaps > 0 else 0.0, e2e_s=end - sent,
        prompt_tokens=usage.get("prompt_tokens", 0),
        completion_tokens=usage.get("completion_tokens", len(stamps)), send_lag_s=0.0,
        error=error,
    )  # fmt: skip


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse(argv)
    from loraplex.server.serve import ServeConfig, packaged_adapter_ids

    adapter_ids = packaged_adapter_ids(ServeConfig())
    load = trace(args, adapter_ids)
    rounds: list[dict[str, Any]] = []
    with server(args) as senders:
        for factory in senders.values():
            _warm_up_quietly(factory, adapter_ids)
        for index in range(args.rounds):
            order = PROTOCOLS if index % 2 == 0 else PROTOCOLS[::-1]
            results = {name: _run(senders[name], load) for name in order}
            rounds.append(results)
            figures = {n: round(r["throughput_tok_s"], 1) for n, r in results.items()}
            print(f"round {index + 1}: {json.dumps(figures)}", file=sys.stderr, flush=True)
    report = summarize(args, adapter_ids, rounds)
    print(json.dumps(report, indent=2))
    return report


def _warm_up_quietly(factory: Callable[[], Any], adapter_ids: list[str]) -> None:
    import asyncio

    asyncio.run(_warm_up(factory, adapter_ids))


def summarize(
    args: argparse.Namespace, adapter_ids: list[str], rounds: list[dict[str, Any]]
) -> dict[str, Any]:
    ratios = [r["http"]["throughput_tok_s"] / r["grpc"]["throughput_tok_s"] for r in rounds]
    ratio = statistics.median(ratios)

    def median(protocol: str, key: str, sub: str | None = None) -> float:
        values = [r[protocol][key][sub] if sub else r[protocol][key] for r in rounds]
        return float(statistics.median(values))

    return {
        "workload": {"clients": args.clients, "requests": args.requests,
                     "prompt_words": args.prompt_words, "new_tokens": args.new_tokens,
                     "adapters": adapter_ids, "rounds": args.rounds, "cpus": os.cpu_count()},
        "throughput_tok_s": {p: median(p, "throughput_tok_s") for p in PROTOCOLS},
        "ttft_p50_s": {p: median(p, "ttft_s", "p50") for p in PROTOCOLS},
        # Each round's tokens, so that a ratio can be checked to compare like with like.
        "completion_tokens": {p: [r[p]["completion_tokens"] for r in rounds] for p in PROTOCOLS},
        "failed": {p: sum(r[p]["requests"] - r[p]["statuses"].get("OK", 0) for r in rounds)
                   for p in PROTOCOLS},
        "http_over_grpc_rounds": [round(x, 3) for x in ratios],
        "http_over_grpc": ratio,
        "target": TARGET_RATIO,
        "met": ratio >= TARGET_RATIO,
    }  # fmt: skip


if __name__ == "__main__":
    main()
