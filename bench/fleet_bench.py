"""`loraplex bench fleet`: a fleet of loraplex replicas on Ray Serve, measured live.

    loraplex bench fleet [--model PATH --adapter-roots DIR] [--rounds 3] [--out FILE]

Run it inside a loopback-only network namespace (Serve's gRPC proxy listens on every
interface):  unshare -n sh -c 'ip link set lo up && loraplex bench fleet'

Parts, each in the one Ray session:
1. overhead: one replica; the same streamed requests sent to its `loraplex serve` directly
   and through Serve's proxy, in alternating rounds: TTFT added, throughput ratio
   (targets: <= 10 ms, >= 0.95);
2. placement: two replicas and a seeded Zipf trace over the adapters per seed, routed by
   adapter affinity and by Ray's stock router (fresh replicas each): cold adapter loads
   summed over the seeds, and adapters resident on both replicas while neither holds its
   maximum (target: affinity <= 0.4x stock's cold loads, and no such duplicates);
3. a full holder: with the replica holding an adapter at its `max_ongoing_requests`, how
   long a request for that adapter takes to start on the other one (target: <= 100 ms more
   than a cold request on an idle replica).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import threading
import time
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
from prometheus_client.parser import text_string_to_metric_families

from loraplex.clients import AsyncClient, Client

PROXY = "127.0.0.1:9000"
HTTP_PROXY = "http://127.0.0.1:8000"  # the OpenAI API through Serve's HTTP proxy


@dataclass(frozen=True)
class Sent:
    adapter_id: str
    ttft_s: float
    total_s: float
    tokens: int


def zipf_trace(adapters: list[str], n: int, seed: int, alpha: float = 1.1) -> list[str]:
    weights = 1.0 / np.arange(1, len(adapters) + 1) ** alpha
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(adapters))  # which adapter is the most popular: seeded too
    picks = rng.choice(len(adapters), size=n, p=weights / weights.sum())
    return [adapters[order[i]] for i in picks]


SendOne = Callable[[str], Awaitable[Sent]]  # one request for an adapter ("" for the base)


@contextlib.asynccontextmanager
async def sender(target: str, new_tokens: int, prompt: str = "Hi") -> AsyncIterator[SendOne]:
    """Requests to `target`: streamed over gRPC, or, for an http:// target, OpenAI
    completions over HTTP (`model` naming the adapter)."""
    if target.startswith("http://"):
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=300)) as session:
            base = await _base_model_name(session, target)  # the `model` of a base request
            yield lambda adapter_id: send_http(
                session, target, adapter_id, adapter_id or base, new_tokens, prompt
            )
    else:
        async with AsyncClient(target, timeout=300) as client:
            yield lambda adapter_id: send(client, adapter_id, new_tokens, prompt)


async def run_trace(
    target: str, adapters: list[str], concurrency: int, new_tokens: int, prompt: str = "Hi"
) -> list[Sent]:
    """Closed-loop clients sending one request each at a time, in trace order."""
    queue = list(enumerate(adapters))
    sent: list[Sent] = []
    async with sender(target, new_tokens, prompt) as send_one:

        async def worker() -> None:
            while queue:
                _, adapter_id = queue.pop(0)
                sent.append(await send_one(adapter_id))

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return sent


async def run_open_loop(
    target: str, adapters: list[str], rate: float, seed: int, new_tokens: int, prompt: str = "Hi"
) -> list[Sent]:
    """Requests arriving as a seeded Poisson process of `rate` a second, in trace order,
    each sent at its arrival whatever is still running (as users arrive)."""
    gaps = np.random.default_rng(seed).exponential(1.0 / rate, size=len(adapters))
    async with sender(target, new_tokens, prompt) as send_one:
        started = time.perf_counter()
        tasks = []
        for arrival, adapter_id in zip(np.cumsum(gaps), adapters, strict=True):
            await asyncio.sleep(max(0.0, started + arrival - time.perf_counter()))
            tasks.append(asyncio.ensure_future(send_one(adapter_id)))
        return list(await asyncio.gather(*tasks))


async def send(
    client: AsyncClient, adapter_id: str, new_tokens: int, prompt: str,
    running: asyncio.Event | None = None,
) -> Sent:  # fmt: skip
    """One streamed request; `running` is set at its first token."""
    started = time.perf_counter()
    first, tokens = None, 0
    async for chunk in client.stream(prompt, adapter=adapter_id, max_new_tokens=new_tokens):
        if chunk.token_ids and first is None:
            first = time.perf_counter()
            if running is not None:
                running.set()
        tokens += len(chunk.token_ids)
    end = time.perf_counter()
    return Sent(adapter_id, (first or end) - started, end - started, tokens)


async def send_http(
    session: aiohttp.ClientSession, url: str, adapter_id: str, model: str, new_tokens: int,
    prompt: str,
) -> Sent:  # fmt: skip
    """One OpenAI completion, whole, retried after a 503 as the openai SDK retries it."""
    started = time.perf_counter()
    body = {"model": model, "prompt": prompt, "max_tokens": new_tokens}
    while True:
        async with session.post(f"{url}/v1/completions", json=body) as reply:
            if reply.status == 503:
                await asyncio.sleep(float(reply.headers.get("retry-after", "1")))
                continue
            reply.raise_for_status()
            tokens = int((await reply.json())["usage"]["completion_tokens"])
            break
    took = time.perf_counter() - started
    return Sent(adapter_id, took, took, tokens)


async def _base_model_name(session: aiohttp.ClientSession, url: str) -> str:
    async with session.get(f"{url}/v1/models") as reply:
        reply.raise_for_status()
        return str((await reply.json())["data"][0]["id"])


def adapter_loads(metrics_ports: Sequence[int]) -> int:
    """Adapter loads so far, summed over the replicas' loraplex servers."""
    total = 0.0
    for port in metrics_ports:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as reply:
            text = reply.read().decode()
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == "loraplex_adapter_load_seconds_count":
                    total += sample.value
    return int(total)


class DuplicateWatch:
    """Polls every replica's resident adapters; counts adapters resident on two replicas
    while neither holds its maximum."""

    def __init__(self, targets: list[str], max_resident: int, period_s: float = 0.2) -> None:
        self.targets, self.max_resident, self.period_s = targets, max_resident, period_s
        self.duplicates: set[str] = set()
        self.polls = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> DuplicateWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        clients = [Client(t, timeout=30) for t in self.targets]
        while not self._stop.wait(self.period_s):
            held = [{a.adapter_id for a in c.list_adapters() if a.resident} for c in clients]
            self.polls += 1
            for i, mine in enumerate(held):
                for theirs in held[i + 1 :]:
                    if len(mine) < self.max_resident and len(theirs) < self.max_resident:
                        self.duplicates |= mine & theirs
        for client in clients:
            client.close()


def placement(
    config: Any, adapters: list[str], requests: int, seed: int, clients: int = 4,
    rate: float = 0.0, via: str = "grpc",
) -> dict[str, Any]:  # fmt: skip
    """The Zipf trace through Serve's gRPC proxy, or its HTTP proxy as OpenAI completions, on
    the fleet `config` describes, sent by `clients` closed-loop clients or, given a `rate`, as
    Poisson arrivals: cold loads and duplicates seen.

    Over gRPC one router (the proxy's) places every request. Over HTTP the proxy hands each
    request to any replica, whose own handle then routes it by adapter: each replica's
    router places on its own, with its own memory of recent placements."""
    from loraplex.server.fleet.registry import Registry

    replicas = Registry.named(config.registry).replicas()
    ports = [r.metrics_port for r in replicas.values()]
    before = adapter_loads(ports)
    trace = zipf_trace(adapters, requests, seed)
    targets = [r.grpc for r in replicas.values()]
    proxy = HTTP_PROXY if via == "http" else PROXY
    with DuplicateWatch(targets, config.max_resident_adapters) as watch:
        if rate > 0:
            sent = asyncio.run(run_open_loop(proxy, trace, rate, seed, new_tokens=4))
        else:
            sent = asyncio.run(run_trace(proxy, trace, concurrency=clients, new_tokens=4))
    return {"router": config.router, "via": via, "requests": len(sent),
            "cold_loads": adapter_loads(ports) - before,
            "duplicates": sorted(watch.duplicates), "polls": watch.polls}  # fmt: skip


def resident(target: str) -> set[str]:
    with Client(target, timeout=30) as client:
        return {a.adapter_id for a in client.list_adapters() if a.resident}


def full_holder(config: Any, adapter_id: str, cold_id: str) -> dict[str, Any]:
    """Fill the replica holding `adapter_id` to its max_ongoing_requests, then time one more
    request for it, and one for `cold_id` sent straight to the other replica's server."""
    from loraplex.server.fleet.registry import Registry

    targets = [r.grpc for r in Registry.named(config.registry).replicas().values()]
    with Client(PROXY, timeout=120) as client:
        client.generate("Hi", adapter=adapter_id, max_new_tokens=1)
    holder = next(t for t in targets if adapter_id in resident(t))
    other = next(t for t in targets if t != holder)

    async def probe() -> tuple[Sent, Sent]:
        async with AsyncClient(PROXY, timeout=300) as client, AsyncClient(other) as direct:
            running = [asyncio.Event() for _ in range(config.max_ongoing)]
            fill = [asyncio.ensure_future(send(client, adapter_id, 200, "Hi", event))
                    for event in running]  # fmt: skip
            # a full batch decoding and the rest queued behind it: the holder is at its
            # max_ongoing_requests (the queued ones start only as the batch finishes)
            while sum(e.is_set() for e in running) < config.max_batch_sequences:
                await asyncio.sleep(0.01)
            routed = await send(client, adapter_id, 1, "Hi")
            cold = await send(direct, cold_id, 1, "Hi")
            await asyncio.gather(*fill)
            return routed, cold

    routed, cold = asyncio.run(probe())
    return {"served_by_other": adapter_id in resident(other), "ttft_s": routed.ttft_s,
            "cold_ttft_s": cold.ttft_s, "added_s": routed.ttft_s - cold.ttft_s}  # fmt: skip


def overhead(config: Any, rounds: int, requests: int) -> dict[str, Any]:
    """One replica's server sent the same requests directly and through the fleet."""
    from loraplex.server.fleet.registry import Registry

    (replica,) = Registry.named(config.registry).replicas().values()
    target = replica.grpc
    results: dict[str, list[tuple[float, float]]] = {"direct": [], "fleet": []}
    for round_ in range(rounds):
        order = ("direct", "fleet") if round_ % 2 == 0 else ("fleet", "direct")
        for path in order:
            started = time.perf_counter()
            where = target if path == "direct" else PROXY
            sent = asyncio.run(run_trace(where, [""] * requests, concurrency=4, new_tokens=16))
            wall = time.perf_counter() - started
            ttft = statistics.median(s.ttft_s for s in sent)
            results[path].append((sum(s.tokens for s in sent) / wall, ttft))
    ratios = [f[0] / d[0] for f, d in zip(results["fleet"], results["direct"], strict=True)]
    added = [f[1] - d[1] for f, d in zip(results["fleet"], results["direct"], strict=True)]
    return {"throughput_ratio": statistics.median(ratios), "ttft_added_s": statistics.median(added),
            "rounds": results}  # fmt: skip


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="loraplex bench fleet",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add = parser.add_argument
    add("--model", default="", help="base model (default: the default model)")
    add(
        "--adapter-roots",
        default="",
        help="a folder of adapters for the model (all parts but the simulation need it)",
    )
    add("--serve-args", default="", help="more `loraplex serve` flags for each replica")
    add("--parts", default="simulation,overhead,placement,holder", help="which parts to run")
    add("--max-resident-adapters", type=int, default=8, help="per replica")
    add("--requests", type=int, default=800, help="requests in each placement trace")
    add("--seeds", default="0,1,2", help="placement traces, one per seed, for each router")
    add("--clients", type=int, default=4, help="closed-loop clients sending the trace")
    add(
        "--rate",
        type=float,
        default=0.0,
        help="send the trace as Poisson arrivals of this many a second instead of by clients",
    )
    add(
        "--via",
        choices=("grpc", "http"),
        default="grpc",
        help="send the placement trace over gRPC or as OpenAI completions over HTTP",
    )
    add("--max-batch-sequences", type=int, default=4, help="per replica (the fleet's: 16)")
    add("--max-queue", type=int, default=4, help="per replica, beyond a batch (the fleet's: 64)")
    add("--rounds", type=int, default=3, help="overhead rounds (alternating order)")
    add("--seed", type=int, default=0)
    add("--out", type=Path, default=None, help="also write the figures here as JSON")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    from loraplex.server.fleet import app

    args = parse(argv)
    if args.parts != "simulation" and not args.adapter_roots:
        raise SystemExit("loraplex bench fleet: give --adapter-roots, a folder of adapters")
    parts = set(args.parts.split(","))
    results: dict[str, Any] = {}
    if "simulation" in parts:
        results["simulation"] = simulation(args.seed)
        parts.discard("simulation")
        if not parts:
            print(json.dumps(results, indent=2))
            return results
    roots = Path(args.adapter_roots)
    adapters = sorted(p.name for p in roots.iterdir() if (p / "adapter_config.json").is_file())
    serve_args = [*(["--model", args.model] if args.model else []),
                  "--adapter-roots", str(roots), "--log-level", "warning",
                  *args.serve_args.split()]  # fmt: skip
    base = app.FleetConfig(replicas=2, max_resident_adapters=args.max_resident_adapters,
                           max_batch_sequences=args.max_batch_sequences,
                           max_queue=args.max_queue, serve_args=serve_args)  # fmt: skip
    # Ray CPUs for two deployments at once: Serve starts a new one before it stops the old
    cpus = 2 * (os.cpu_count() or 1)
    app.start(replace(base, replicas=1, registry="fleet-bench-one"), num_cpus=cpus)
    try:
        if "overhead" in parts:
            results["overhead"] = overhead(replace(base, replicas=1, registry="fleet-bench-one"),
                                           args.rounds, 32)  # fmt: skip
        if "placement" in parts:
            seeds = [int(s) for s in args.seeds.split(",")]
            results["placement"] = placements(
                base, adapters, args.requests, seeds, args.clients, args.rate, args.via
            )
        if "holder" in parts:
            affinity = replace(base, registry="fleet-bench-holder")
            app.deploy(affinity)
            results["full_holder"] = full_holder(affinity, adapters[-1], adapters[-2])
    finally:
        app.stop(base)
    print(json.dumps(results, indent=2))
    if args.out:
        args.out.write_text(json.dumps(results))
    return results


def placements(
    base: Any,
    adapters: list[str],
    requests: int,
    seeds: list[int],
    clients: int,
    rate: float = 0.0,
    via: str = "grpc",
) -> dict[str, Any]:
    """The placement trace once per seed and router, each on fresh replicas: cold loads
    summed over the seeds, and their ratio."""
    from loraplex.server.fleet import app

    runs: dict[str, list[dict[str, Any]]] = {"affinity": [], "ray": []}
    for seed in seeds:
        for router, seen in runs.items():
            config = replace(base, router=router, registry=f"fleet-bench-{router}-{seed}")
            app.deploy(config)  # a new registry name: a new version, fresh replicas
            seen.append(
                {"seed": seed, **placement(config, adapters, requests, seed, clients, rate, via)}
            )
            print(f"placement seed {seed} {router}: {seen[-1]['cold_loads']} cold loads, "
                  f"duplicates {seen[-1]['duplicates']}", flush=True)  # fmt: skip
    cold = {router: sum(r["cold_loads"] for r in seen) for router, seen in runs.items()}
    return {"cold_loads": cold, "cold_load_ratio": cold["affinity"] / max(cold["ray"], 1),
            "runs": runs}  # fmt: skip


def simulation(seed: int) -> list[dict[str, float]]:
    """Cold loads per 1000 requests in the seeded simulation, by fleet size (32 adapters
    resident per replica, Zipf 1.1 over the adapters, 10,000 requests)."""
    from loraplex.server.fleet.simulate import table

    rows = table([4, 8, 16, 32, 64], [256, 1024, 4096], max_resident=32, requests=10_000,
                 seed=seed)  # fmt: skip
    print(f"{'replicas':>8} {'adapters':>8} {'affinity':>9} {'stock':>9}  cold loads / 1000")
    for row in rows:
        print(f"{row['replicas']:>8} {row['adapters']:>8} {row['affinity']:>9.1f} "
              f"{row['stock']:>9.1f}")  # fmt: skip
    return rows
