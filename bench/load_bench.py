"""`loraplex bench load`: a seeded multi-adapter workload against a live server, swept over one
parameter, written as results.json, summary.md and PNG plots.

    loraplex bench load --num-adapters 64 --alpha 1 --arrival poisson --rate 2 --requests 200
    loraplex bench load --sweep num_adapters=1,8,64,256 --arrival closed --concurrency 8
    loraplex bench load --target 127.0.0.1:50051 --requests 50   # a server already running

Without --target the benchmark writes random adapters (the trace's LoRA/VeRA mix and ranks)
for --model, starts `loraplex serve` on them, and stops it at the end. With --target the
trace's adapters are mapped onto the adapters the server lists.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import shlex
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from loraplex.bench import report
from loraplex.bench.runner import run_trace
from loraplex.bench.workload import AdapterSpec, Trace, TraceRequest, WorkloadSpec, generate
from loraplex.clients import Client
from loraplex.clients.errors import LoraplexClientError

SWEEPABLE = {"num_adapters": int, "concurrency": int, "alpha": float, "rate": float}
START_TIMEOUT_S = 600


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="loraplex bench load",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add = parser.add_argument
    add("--target", help="address of a running server (default: start one)")
    add("--model", default="gemma3-270m", help="model spec for the server started here")
    add("--serve-args", default="", help="extra `loraplex serve` flags: --serve-args='--flag V'")
    add("--out", type=Path, help="results folder (default: bench/results/load-<time>)")
    add("--seed", type=int, default=0)
    add("--num-adapters", type=int, default=8)
    add("--popularity", choices=["uniform", "zipf"], default="zipf")
    add("--alpha", type=float, default=1.0, help="Zipf exponent of adapter popularity")
    add("--base-fraction", type=float, default=0.0, help="share of requests without adapter")
    add("--vera-fraction", type=float, default=0.0, help="share of adapters that are VeRA")
    add("--ranks", default="8,16", help="adapter ranks to draw from")
    add("--arrival", choices=["poisson", "gamma", "closed"], default="poisson")
    add("--rate", type=float, default=1.0, help="requests per second (open loop)")
    add("--cv", type=float, default=1.0, help="coefficient of variation (gamma arrivals)")
    add("--concurrency", type=int, default=8, help="clients in flight (closed loop)")
    add("--requests", type=int, default=64)
    add("--duration", type=float, help="open loop: stop sending after this many seconds")
    add("--prompt-tokens", default="16,64", help="inclusive range LOW,HIGH")
    add("--output-tokens", default="16,64", help="inclusive range LOW,HIGH")
    add("--sweep", help=f"PARAM=V1,V2,... with PARAM one of {', '.join(SWEEPABLE)}")
    add(
        "--baselines",
        default="",
        help="also run the trace on: naive, static, llama-reload (comma-separated)",
    )
    add("--baselines-at", help="run the baselines only at this value of the swept parameter")
    add("--baseline-batch-rows", type=int, default=16, help="rows per static PEFT batch")
    add("--no-progress", action="store_true")
    return parser.parse_args(argv)


def workload(args: argparse.Namespace) -> WorkloadSpec:
    def pair(text: str) -> tuple[int, int]:
        low, high = (int(v) for v in text.split(","))
        return low, high

    return WorkloadSpec(
        seed=args.seed, num_adapters=args.num_adapters, popularity=args.popularity,
        alpha=args.alpha, base_fraction=args.base_fraction, vera_fraction=args.vera_fraction,
        ranks=tuple(int(r) for r in args.ranks.split(",")), arrival=args.arrival,
        rate=args.rate, cv=args.cv, concurrency=args.concurrency,
        num_requests=None if args.duration else args.requests, duration_s=args.duration,
        prompt_tokens=pair(args.prompt_tokens), output_tokens=pair(args.output_tokens),
    )  # fmt: skip


def sweep(args: argparse.Namespace) -> tuple[str, list[Any]]:
    if not args.sweep:
        return "num_adapters", [args.num_adapters]
    name, _, values = args.sweep.partition("=")
    if name not in SWEEPABLE or not values:
        raise SystemExit(f"--sweep: expected PARAM=V1,V2 with PARAM in {list(SWEEPABLE)}")
    return name, [SWEEPABLE[name](v) for v in values.split(",")]


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run, write the report, and return the results (also in OUT/results.json)."""
    args = parse(argv)
    spec = workload(args)
    parameter, values = sweep(args)
    traces = [generate(replace(spec, **{parameter: value})) for value in values]
    baselines = [b for b in args.baselines.split(",") if b]
    if baselines and args.target:
        raise SystemExit("--baselines needs the servers started here: drop --target")
    out = args.out or Path("bench/results") / time.strftime("load-%Y%m%d-%H%M%S")
    with tempfile.TemporaryDirectory(prefix="loraplex-load-") as scratch:
        root = None if args.target else write_trace_adapters(args, traces, Path(scratch))
        with loraplex_server(args, root, traces) as (target, info):
            points = [
                {"value": value, **run_point(target, trace, info["adapters"], args)}
                for value, trace in zip(values, traces, strict=True)
            ]
        for kind in baselines:
            with baseline_server(args, root, kind) as (target, base_info):
                for point, trace in zip(points, traces, strict=True):
                    if args.baselines_at is not None and str(point["value"]) != args.baselines_at:
                        continue
                    run = run_point(target, trace, base_info["adapters"], args)
                    point.setdefault("baselines", {})[kind] = run["summary"]
    info.pop("adapters")
    results = {
        "environment": report.environment(info),
        "workload": asdict(spec),
        "sweep": {"parameter": parameter, "values": values},
        "baselines": baselines,
        "points": points,
    }
    files = report.write(results, out)
    print(report.markdown(results))
    print("wrote " + ", ".join(str(f) for f in files), file=sys.stderr)
    return results


def run_point(
    target: str, trace: Trace, available: list[str], args: argparse.Namespace
) -> dict[str, Any]:
    result = asyncio.run(run_trace(target, onto(trace, available), not args.no_progress))
    return {"summary": result.summary(), "records": [asdict(r) for r in result.records]}


def onto(trace: Trace, available: list[str]) -> Trace:
    """The trace with its adapter ids mapped onto the server's (identity when it has them)."""
    if not available:
        raise SystemExit("the server lists no adapters to run the trace's requests on")
    ids = {a.adapter_id: a.adapter_id for a in trace.adapters}
    if not set(ids) <= set(available):
        ids = {a.adapter_id: available[i % len(available)] for i, a in enumerate(trace.adapters)}
    requests = [
        TraceRequest(**{**asdict(r), "adapter_id": ids.get(r.adapter_id, "")})
        for r in trace.requests
    ]
    return Trace(trace.spec, trace.adapters, requests)


def write_trace_adapters(args: argparse.Namespace, traces: list[Trace], root: Path) -> Path:
    adapters = {a.adapter_id: a for trace in traces for a in trace.adapters}
    _write_adapters(args.model, root, list(adapters.values()), not args.no_progress)
    return root


@contextlib.contextmanager
def loraplex_server(
    args: argparse.Namespace, root: Path | None, traces: list[Trace]
) -> Iterator[tuple[str, dict[str, Any]]]:
    """The target, and what it serves: model, backend, quantization, adapter ids."""
    if args.target or root is None:
        yield args.target, describe(args.target)
        return
    max_rank = max(a.rank for trace in traces for a in trace.adapters)
    count = len({a.adapter_id for trace in traces for a in trace.adapters})
    port = _free_port()
    command = [
        "-m", "loraplex.server.cli", "serve", "--model", args.model,
        "--adapter-roots", str(root), "--max-lora-rank", str(max_rank),
        "--max-resident-adapters", str(count), "--port", str(port),
        "--metrics-port", "0", "--log-level", "warning", *shlex.split(args.serve_args),
    ]  # fmt: skip
    with running(command, port) as target:
        yield target, describe(target)


@contextlib.contextmanager
def baseline_server(
    args: argparse.Namespace, root: Path | None, kind: str
) -> Iterator[tuple[str, dict[str, Any]]]:
    assert root is not None
    port = _free_port()
    command = [
        "-m", "loraplex.bench.baseline_server", "--kind", kind, "--model", args.model,
        "--adapter-roots", str(root), "--port", str(port),
        "--batch-rows", str(args.baseline_batch_rows),
    ]  # fmt: skip
    with running(command, port) as target:
        yield target, describe(target)


def _write_adapters(model: str, root: Path, adapters: list[AdapterSpec], progress: bool) -> None:
    from loraplex.bench.trace_adapters import write_adapters  # torch and peft: only here
    from loraplex.server.config import default_cache_dir
    from loraplex.server.models import hf_checkpoint, resolve

    cache = default_cache_dir()
    write_adapters(hf_checkpoint(resolve(model, cache), cache), root, adapters, progress)


def describe(target: str) -> dict[str, Any]:
    with Client(target, timeout=60) as client:
        info = client.server_info()
        ids = [a.adapter_id for a in client.list_adapters()]
    return {
        "target": target,
        "model": info.model,
        "backend": info.backend,
        "quantization": info.quantization,
        "server_version": info.version,
        "adapters": ids,
    }


@contextlib.contextmanager
def running(command: list[str], port: int) -> Iterator[str]:
    """A server process (`python COMMAND`), SERVING on `port` until the block ends."""
    proc = subprocess.Popen([sys.executable, *command])
    target = f"127.0.0.1:{port}"
    try:
        wait_until_serving(proc, target)
        yield target
    finally:
        proc.terminate()
        proc.wait(120)


def wait_until_serving(proc: subprocess.Popen[bytes], target: str) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    with Client(target, timeout=5) as client:
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                if client.health() == "SERVING":
                    return
            except LoraplexClientError:
                time.sleep(0.5)
    raise SystemExit(f"the server did not start (exit code {proc.poll()}); see its output above")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


if __name__ == "__main__":
    main()
