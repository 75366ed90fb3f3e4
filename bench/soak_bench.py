"""`loraplex bench soak`: a long run on loopback that must end with nothing failed or leaked.

A real `loraplex serve` process takes a seeded mixed LoRA/VeRA workload from closed-loop
clients for --minutes, while an admin loop unloads, loads and replaces (rewrites, then
reloads as a new version) adapters every --admin-every seconds. Fewer adapters stay resident
than the workload uses, so eviction runs throughout. The server's RSS is sampled all along.

The report (results.json, summary.md, rss.png under --out) gives requests served and failed,
RSS growth from the 5th minute to the last, and what the server still holds once the load
stops (sequences, KV-cache rows, adapter slot holds, adapters in use): all must be zero.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from loraplex.bench import report
from loraplex.bench.load_bench import _free_port, _write_adapters, wait_until_serving
from loraplex.bench.runner import RequestRecord, send
from loraplex.bench.workload import AdapterSpec, TraceRequest, WorkloadSpec, generate
from loraplex.clients import AsyncClient, Client, LoraplexClientError

RSS_EVERY_S = 5.0
WEIGHTS = "adapter_model.safetensors"
REPLACEMENT_OFFSET = 1000  # replacement weights are written as adapter-(i + offset)


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="loraplex bench soak", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    add = parser.add_argument
    add("--minutes", type=float, default=20.0, help="how long the load runs")
    add("--model", default="gemma3-270m")
    add("--adapters", type=int, default=12, help="adapters in the workload (LoRA and VeRA)")
    add("--resident", type=int, default=8, help="--max-resident-adapters of the server")
    add("--concurrency", type=int, default=6, help="closed-loop clients")
    add("--admin-every", type=float, default=15.0, help="seconds between admin actions")
    add("--prompt-tokens", type=token_range, default=(8, 48), help="inclusive range LOW,HIGH")
    add("--output-tokens", type=token_range, default=(4, 32), help="inclusive range LOW,HIGH")
    add("--seed", type=int, default=0)
    add("--serve-args", default="", help="more `loraplex serve` flags, in one quoted string")
    add("--out", type=Path, default=Path("bench/results/soak"))
    add("--no-progress", action="store_true")
    return parser.parse_args(argv)


def token_range(text: str) -> tuple[int, int]:
    try:
        low, high = (int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LOW,HIGH, got {text!r}") from None
    if not 1 <= low <= high:
        raise argparse.ArgumentTypeError(f"need 1 <= LOW <= HIGH, got {text!r}")
    return low, high


@dataclass
class Soak:
    """What the run observed, shared between the traffic, admin and RSS threads."""

    records: list[RequestRecord] = field(default_factory=list)
    admin: list[dict[str, Any]] = field(default_factory=list)
    rss: list[tuple[float, float]] = field(default_factory=list)  # (seconds, MiB)
    done: threading.Event = field(default_factory=threading.Event)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse(argv)
    spec = WorkloadSpec(
        seed=args.seed, num_adapters=args.adapters, vera_fraction=0.25, base_fraction=0.1,
        arrival="closed", concurrency=args.concurrency, num_requests=200_000,
        prompt_tokens=args.prompt_tokens, output_tokens=args.output_tokens,
    )  # fmt: skip
    trace = generate(spec)
    soak = Soak()
    with tempfile.TemporaryDirectory(prefix="loraplex-soak-") as scratch:
        root, spares = Path(scratch) / "adapters", Path(scratch) / "replacements"
        progress = not args.no_progress
        _write_adapters(args.model, root, trace.adapters, progress)
        _write_adapters(args.model, spares, [_replacement(a) for a in trace.adapters], progress)
        with (
            serving(args, root) as (proc, target, metrics_port),
            tqdm(
                total=round(60 * args.minutes), unit="s", desc="soak", disable=not progress
            ) as bar,
        ):
            started = time.monotonic()
            weights = WeightSets(root, spares, [a.adapter_id for a in trace.adapters])
            threads = [
                threading.Thread(target=sample_rss, args=(proc.pid, soak, started, bar)),
                threading.Thread(target=administer, args=(target, weights, soak, args.admin_every)),
            ]
            for thread in threads:
                thread.start()
            try:
                end = started + 60 * args.minutes
                asyncio.run(traffic(target, trace.requests, args.concurrency, soak, end))
            finally:
                soak.done.set()
                for thread in threads:
                    thread.join()
            held = leftovers(target, metrics_port)
    results = summarize(args, spec, soak, held)
    write(results, soak, args.out)
    return results


@contextlib.contextmanager
def serving(args: argparse.Namespace, root: Path) -> Iterator[tuple[Any, str, int]]:
    port, metrics_port = _free_port(), _free_port()
    command = [
        sys.executable, "-m", "loraplex.server.cli", "serve", "--model", args.model,
        "--adapter-roots", str(root), "--max-resident-adapters", str(args.resident),
        "--port", str(port), "--metrics-port", str(metrics_port), "--log-level", "warning",
        *args.serve_args.split(),
    ]  # fmt: skip
    proc = subprocess.Popen(command)
    target = f"127.0.0.1:{port}"
    try:
        wait_until_serving(proc, target)
        yield proc, target, metrics_port
    finally:
        proc.terminate()
        proc.wait(120)


async def traffic(
    target: str, requests: list[TraceRequest], concurrency: int, soak: Soak, end: float
) -> None:
    """Closed-loop clients taking the trace's requests in order until `end`."""
    todo = iter(requests)
    start = time.perf_counter()
    async with AsyncClient(target, timeout=600) as client:

        async def client_loop() -> None:
            for request in todo:
                if time.monotonic() >= end:
                    return
                soak.records.append(await send(client, request, start, time.perf_counter()))

        await asyncio.gather(*(client_loop() for _ in range(concurrency)))


def administer(target: str, weights: WeightSets, soak: Soak, every_s: float) -> None:
    """Cycle unload, load and replace over the adapters until the traffic stops."""
    actions = ("unload", "load", "replace")
    with Client(target, timeout=600) as client:
        for turn in range(1 << 30):
            if soak.done.wait(every_s):
                return
            ids = weights.ids
            action, adapter_id = actions[turn % 3], ids[(turn // 3) % len(ids)]
            entry: dict[str, Any] = {"action": action, "adapter_id": adapter_id}
            try:
                if action == "unload":
                    client.unload_adapter(adapter_id, wait=True, timeout_s=300)
                else:
                    if action == "replace":
                        weights.swap(adapter_id)
                    entry["version"] = client.load_adapter(adapter_id).version
                entry["status"] = "OK"
            except LoraplexClientError as err:
                entry["status"] = f"{err.code.name}: {err.details}"
                # traffic may have evicted it already: the server rightly says so
                entry["expected"] = action == "unload" and err.code.name == "NOT_FOUND"
            soak.admin.append(entry)


class WeightSets:
    """Two weight sets per adapter id (same config): replacing swaps the served files."""

    def __init__(self, root: Path, other: Path, ids: list[str]) -> None:
        self.root, self.ids = root, ids
        self._spare = {i: other / _replacement_id(i) / WEIGHTS for i in ids}

    def swap(self, adapter_id: str) -> None:
        served, spare = self.root / adapter_id / WEIGHTS, self._spare[adapter_id]
        scratch = served.with_name(f".{WEIGHTS}.swap")
        shutil.copyfile(spare, scratch)
        shutil.copyfile(served, spare)
        scratch.replace(served)  # one rename: a reader sees the old file or the new one


def _replacement(adapter: AdapterSpec) -> AdapterSpec:
    return AdapterSpec(_replacement_id(adapter.adapter_id), adapter.kind, adapter.rank)


def _replacement_id(adapter_id: str) -> str:
    return f"adapter-{int(adapter_id.rsplit('-', 1)[1]) + REPLACEMENT_OFFSET}"


def sample_rss(pid: int, soak: Soak, started: float, bar: tqdm) -> None:
    """Every RSS_EVERY_S: the server's resident set size, and the progress bar."""
    while True:
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            return
        kib = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS"))
        soak.rss.append((round(time.monotonic() - started, 1), kib / 1024))
        bar.update(min(bar.total, round(soak.rss[-1][0])) - bar.n)
        failed = sum(r.status != "OK" for r in soak.records)
        bar.set_postfix(served=len(soak.records) - failed, failed=failed, rss_mib=round(kib / 1024))
        if soak.done.wait(RSS_EVERY_S):
            return


def leftovers(target: str, metrics_port: int) -> dict[str, float]:
    """What the server still holds once the load has stopped and in-flight requests ended."""
    with Client(target, timeout=60) as client:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            info = client.server_info()
            if info.running == info.waiting == 0:
                break
            time.sleep(0.5)
        in_use = sum(a.in_use for a in client.list_adapters())
    held = engine_held(metrics_port)
    return {"running": info.running, "waiting": info.waiting, "adapters_in_use": in_use, **held}


def engine_held(metrics_port: int) -> dict[str, float]:
    """The loraplex_engine_held gauges, by resource, from a real Prometheus scrape."""
    from prometheus_client.parser import text_string_to_metric_families

    url = f"http://127.0.0.1:{metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=30) as reply:
        text = reply.read().decode()
    return {
        sample.labels["resource"]: sample.value
        for family in text_string_to_metric_families(text)
        if family.name == "loraplex_engine_held"
        for sample in family.samples
    }


def summarize(
    args: argparse.Namespace, spec: WorkloadSpec, soak: Soak, held: dict[str, float]
) -> dict[str, Any]:
    statuses = Counter(r.status for r in soak.records)
    after_warmup = [mib for t, mib in soak.rss if t >= 300] or [mib for _, mib in soak.rss]
    last_minute = [mib for t, mib in soak.rss if t >= soak.rss[-1][0] - 60]
    growth = max(last_minute) / after_warmup[0] - 1
    return {
        "environment": report.environment({"model": args.model, "backend": "hf"}),
        "settings": {k: str(v) for k, v in vars(args).items()},
        "workload": asdict(spec),
        "requests": {
            "served": statuses.get("OK", 0),
            "failed": len(soak.records) - statuses["OK"],
            "statuses": dict(statuses),
            "errors": dict(Counter(r.error for r in soak.records if r.error).most_common(10)),
        },
        "admin": {
            "actions": len(soak.admin),
            "failed": sum(a["status"] != "OK" and not a.get("expected") for a in soak.admin),
            "unloads_of_evicted": sum(bool(a.get("expected")) for a in soak.admin),
            "log": soak.admin,
        },
        "rss_mib": {
            "at_5_min": after_warmup[0],
            "last_minute_max": max(last_minute),
            "growth": growth,
            "peak": max(m for _, m in soak.rss),
        },
        "leaks": held,
    }


def write(results: dict[str, Any], soak: Soak, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "summary.md").write_text(markdown(results))
    plot_rss(soak.rss, out / "rss.png")
    print(markdown(results))


def plot_rss(rss: list[tuple[float, float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4))
    axis.plot([t / 60 for t, _ in rss], [m for _, m in rss])
    axis.axvline(5, linestyle=":", color="grey")
    axis.set(xlabel="minutes", ylabel="RSS (MiB)", title="loraplex serve during the soak")
    report._save(figure, path)


def markdown(results: dict[str, Any]) -> str:
    req, rss, leaks = results["requests"], results["rss_mib"], results["leaks"]
    admin = results["admin"]
    leaked = sum(leaks.values())
    rows = [
        ("requests served", f"{req['served']}", "", None),
        ("requests failed", f"{req['failed']}", "0", req["failed"] == 0),
        ("admin actions: unload, load, replace", f"{admin['actions']}, {admin['failed']} failed "
         f"({admin['unloads_of_evicted']} unloads found the adapter already evicted)", "0 failed",
         admin["failed"] == 0),
        ("RSS growth, 5th minute to last", f"{100 * rss['growth']:.1f}% "
         f"({rss['at_5_min']:.0f} -> {rss['last_minute_max']:.0f} MiB)", "<= 5%",
         rss["growth"] <= 0.05),
        ("held after the load stopped", ", ".join(f"{k} {v:g}" for k, v in leaks.items()), "all 0",
         leaked == 0),
    ]  # fmt: skip
    env = results["environment"]
    lines = [
        f"# loraplex soak ({results['settings']['minutes']} min, {env['model']}, "
        f"commit `{env['git_commit'][:12]}`)", "",
        "| figure | measured | target | |", "|---|---|---|---|",
        *[f"| {n} | {v} | {t} | {'' if ok is None else ('met' if ok else 'NOT met')} |"
          for n, v, t, ok in rows],
        "", f"Peak RSS {rss['peak']:.0f} MiB.",
    ]  # fmt: skip
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
