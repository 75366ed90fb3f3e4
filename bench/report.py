"""Load-benchmark results as files: JSON (everything), a Markdown table and PNG plots."""

from __future__ import annotations

import json
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

ROW_KEYS = [
    ("throughput_tok_s", "tok/s"),
    ("throughput_req_s", "req/s"),
    ("ttft_s.p50", "TTFT p50 (s)"),
    ("ttft_s.p99", "TTFT p99 (s)"),
    ("tpot_s.p50", "TPOT p50 (s)"),
    ("tpot_s.p99", "TPOT p99 (s)"),
    ("e2e_s.p50", "e2e p50 (s)"),
]


def environment(server_info: dict[str, Any]) -> dict[str, Any]:
    """Where and on what a result was measured."""
    return {
        "machine": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "load_average": os.getloadavg(),
        "git_commit": _git_commit(),
        **server_info,
    }


def _git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
            cwd=Path(__file__).parent,
        )
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def lookup(summary: dict[str, Any], dotted: str) -> float:
    value: Any = summary
    for part in dotted.split("."):
        value = value[part]
    return float(value)


def markdown(results: dict[str, Any]) -> str:
    """One row per measured point: its swept value, statuses and the headline figures."""
    env = results["environment"]
    swept = results["sweep"]["parameter"]
    lines = [
        f"# loraplex load benchmark ({env.get('model', '?')}, {env.get('backend', '?')}, "
        f"{env.get('quantization', '?')})",
        "",
        f"{env['machine']}, {env['cpu_count']} CPUs, commit `{env['git_commit'][:12]}`.",
        "",
        "| " + " | ".join([swept, "requests", "failed", *[label for _, label in ROW_KEYS]]) + " |",
        "|" + "---|" * (3 + len(ROW_KEYS)),
    ]
    for point in results["points"]:
        summary = point["summary"]
        cells = [str(point["value"]), str(summary["requests"]), str(failed_requests(summary))]
        cells += [f"{lookup(summary, key):.3f}" for key, _ in ROW_KEYS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines + _baseline_table(results)) + "\n"


def failed_requests(summary: dict[str, Any]) -> int:
    return int(summary["requests"] - summary["statuses"].get("OK", 0))


def _baseline_table(results: dict[str, Any]) -> list[str]:
    """loraplex's throughput beside each baseline's on the same trace, with the ratio."""
    kinds = results.get("baselines") or []
    if not kinds:
        return []
    head = [results["sweep"]["parameter"], "loraplex tok/s"]
    for kind in kinds:
        head += [f"{kind} tok/s", f"loraplex / {kind}"]
    lines = ["", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for point in (p for p in results["points"] if "baselines" in p):
        ours = point["summary"]["throughput_tok_s"]
        cells = [str(point["value"]), f"{ours:.2f}"]
        for kind in kinds:
            baseline = point["baselines"][kind]
            theirs = baseline["throughput_tok_s"]
            failed = failed_requests(baseline)
            ratio = f"{ours / theirs:.2f}x" if theirs and not failed else "n/a"
            cells += [f"{theirs:.2f}", ratio + (f" ({failed} failed)" if failed else "")]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def plots(results: dict[str, Any], out_dir: Path) -> list[Path]:
    """Throughput, and TTFT/TPOT percentiles, against the swept parameter."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    swept = results["sweep"]["parameter"]
    xs = [point["value"] for point in results["points"]]
    summaries = [point["summary"] for point in results["points"]]
    written = []
    figure, axis = plt.subplots(figsize=(6, 4))
    axis.plot(xs, [s["throughput_tok_s"] for s in summaries], marker="o")
    axis.set(xlabel=swept, ylabel="tokens/s", title=f"throughput against {swept}")
    written.append(_save(figure, out_dir / "throughput.png"))
    figure, axis = plt.subplots(figsize=(6, 4))
    for metric in ("ttft_s", "tpot_s"):
        for q in ("p50", "p99"):
            axis.plot(xs, [s[metric][q] for s in summaries], marker="o", label=f"{metric} {q}")
    axis.set(xlabel=swept, ylabel="seconds", title=f"latency against {swept}")
    axis.legend()
    written.append(_save(figure, out_dir / "latency.png"))
    if results.get("baselines"):
        figure, axis = plt.subplots(figsize=(6, 4))
        compared = [p for p in results["points"] if "baselines" in p]
        at = [str(p["value"]) for p in compared]
        series = {"loraplex": [p["summary"]["throughput_tok_s"] for p in compared]}
        for kind in results["baselines"]:
            series[kind] = [p["baselines"][kind]["throughput_tok_s"] for p in compared]
        width = 0.8 / len(series)
        for i, (name, rates) in enumerate(series.items()):
            axis.bar([j + i * width for j in range(len(at))], rates, width, label=name)
        axis.set_xticks([j + 0.4 - width / 2 for j in range(len(at))], at)
        axis.set(xlabel=swept, ylabel="tokens/s", title="loraplex against the baselines")
        axis.legend()
        written.append(_save(figure, out_dir / "baselines.png"))
    return written


def _save(figure: Any, path: Path) -> Path:
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    import matplotlib.pyplot as plt

    plt.close(figure)
    return path


def write(results: dict[str, Any], out_dir: Path) -> list[Path]:
    """results.json, summary.md and the plots, in `out_dir`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out_dir / "summary.md").write_text(markdown(results))
    return [out_dir / "results.json", out_dir / "summary.md", *plots(results, out_dir)]
