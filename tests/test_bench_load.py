"""`loraplex bench load` end to end: a tiny seeded trace against a real tiny-model server."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from loraplex.bench.load_bench import main
from loraplex.bench.workload import WorkloadSpec, generate


@pytest.fixture(scope="module")
def results(tiny_checkpoints: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("load-results")
    main([
        "--model", str(tiny_checkpoints["llama"]), "--serve-args", "--quantization fp32",
        "--arrival", "closed", "--concurrency", "3", "--requests", "10", "--seed", "7",
        "--vera-fraction", "0.5", "--ranks", "4,8", "--prompt-tokens", "2,6",
        "--output-tokens", "2,5", "--sweep", "num_adapters=1,4", "--out", str(out),
        "--baselines", "naive,static", "--baseline-batch-rows", "4", "--no-progress",
    ])  # fmt: skip
    return out


def test_every_request_is_accounted_for(results: Path) -> None:
    data = json.loads((results / "results.json").read_text())
    assert [p["value"] for p in data["points"]] == [1, 4]
    for point in data["points"]:
        summary, records = point["summary"], point["records"]
        assert summary["requests"] == len(records) == 10
        assert sum(summary["statuses"].values()) == 10
        assert summary["statuses"] == {"OK": 10}
        assert summary["completion_tokens"] == sum(r["completion_tokens"] for r in records)
        assert all(1 <= r["completion_tokens"] <= 5 for r in records)
        assert all(0 <= r["ttft_s"] <= r["e2e_s"] for r in records)
        assert summary["ttft_s"]["count"] == 10
        for kind in ("naive", "static"):  # the same trace, through the same client timing
            assert point["baselines"][kind]["statuses"] == {"OK": 10}


def test_records_follow_the_seeded_trace(results: Path) -> None:
    data = json.loads((results / "results.json").read_text())
    spec = WorkloadSpec(**{**data["workload"], "num_adapters": 4})
    trace = generate(spec)
    records = data["points"][1]["records"]
    assert [r["adapter_id"] for r in records] == [q.adapter_id for q in trace.requests]
    assert {q.adapter_id for q in trace.requests} - {""}  # adapters really were used


def test_report_files_and_environment(results: Path) -> None:
    data = json.loads((results / "results.json").read_text())
    env = data["environment"]
    assert env["backend"] == "hf" and env["quantization"] == "fp32"
    assert len(env["git_commit"]) == 40 and env["cpu_count"] >= 1
    summary = (results / "summary.md").read_text()
    assert "| num_adapters | requests | failed |" in summary
    assert "| num_adapters | loraplex tok/s | naive tok/s | loraplex / naive |" in summary
    for plot in ("throughput.png", "latency.png", "baselines.png"):
        assert (results / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_readme_summary_puts_each_figure_beside_its_target() -> None:
    from loraplex.bench.readme_bench import summary

    def point(value: int, tok_s: float, p50: float, p99: float, **baselines: float) -> dict:
        dist = {"p50": p50, "p99": p99}
        point = {"value": value, "summary": {"throughput_tok_s": tok_s, "ttft_s": dist,
                                             "tpot_s": {"p50": 0.1}}}  # fmt: skip
        if baselines:
            point["baselines"] = {k: served(v) for k, v in baselines.items()}
        return point

    def served(tok_s: float, failed: int = 0) -> dict:
        statuses = {"OK": 64 - failed, **({"UNAVAILABLE": failed} if failed else {})}
        return {"throughput_tok_s": tok_s, "requests": 64, "statuses": statuses}

    env = {"model": "m", "backend": "hf", "quantization": "nf4", "cpu_count": 2, "git_commit": "c"}
    load = {
        "environment": env,
        "points": [point(8, 50.0, 1.0, 1.5), point(256, 46.0, 1.0, 2.5, naive=8.0, static=23.0)],
    }
    text = summary(2.0, load)
    assert "(1.400 of 2.000 req/s)" in text
    assert "| throughput vs naive PEFT loop (256 adapters) | 5.75x | >= 5x | met |" in text
    assert "| throughput vs PEFT static batches | 2.00x | reported |  |" in text
    assert "| TTFT p99 / p50 (256 adapters) | 2.50 | <= 2 | NOT met |" in text
    assert "| throughput cost, 8 -> 256 adapters | 8.0% | <= 10% | met |" in text
    assert "naive 8.00, static 23.00;" in text
    # a baseline that failed requests shows as failed, never as a ratio or silently left out
    load["points"][1]["baselines"] |= {"naive": served(0.0, failed=64),
                                       "llama-reload": served(2.0, failed=3)}  # fmt: skip
    text = summary(2.0, load)
    assert ("| throughput vs naive PEFT loop (256 adapters) | baseline failed: "
            "64 UNAVAILABLE of 64 requests | >= 5x | NOT met |") in text  # fmt: skip
    assert ("| throughput vs llama-cpp-python reloading per adapter | baseline failed: "
            "3 UNAVAILABLE of 64 requests | reported |  |") in text  # fmt: skip


def test_baseline_table_marks_a_failed_baseline(results: Path) -> None:
    from loraplex.bench.report import markdown

    data = json.loads((results / "results.json").read_text())
    point = data["points"][1]
    point["baselines"]["static"]["statuses"] = {"OK": 7, "UNAVAILABLE": 3}
    ours = point["summary"]["throughput_tok_s"]
    naive = point["baselines"]["naive"]["throughput_tok_s"]
    static = point["baselines"]["static"]["throughput_tok_s"]
    row = f"| 4 | {ours:.2f} | {naive:.2f} | {ours / naive:.2f}x | {static:.2f} | n/a (3 failed) |"
    assert row in markdown(data)
