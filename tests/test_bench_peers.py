"""The peers benchmark's loads and report, without starting any server."""

from __future__ import annotations

import argparse
from pathlib import Path

from loraplex.bench import peers_bench


def args(**overrides: object) -> argparse.Namespace:
    parsed = peers_bench.parse(["--requests", "6", "--clients", "3"])
    for name, value in overrides.items():
        setattr(parsed, name, value)
    return parsed


def test_the_loads_have_prompts_of_their_own_of_equal_lengths_and_differ_in_adapters() -> None:
    ids = [f"lora-{i:04d}" for i in range(peers_bench.NUM_ADAPTERS)]
    loads = peers_bench.traces(args(), ids)
    mixed, one, base = (loads[name].requests for name in peers_bench.LOADS)
    prompts = [r.prompt for load in (mixed, one, base) for r in load]
    assert len(set(prompts)) == len(prompts)  # a server's prompt cache never helps it
    assert {len(r.prompt.split()) for r in mixed + one + base} == {64}
    assert {r.output_tokens for r in mixed} == {64}
    assert {r.adapter_id for r in mixed} <= set(ids) and len({r.adapter_id for r in mixed}) > 1
    assert {r.adapter_id for r in one} == {ids[0]}
    assert {r.adapter_id for r in base} == {""}
    assert loads["mixed"].spec.concurrency == 3 and len(mixed) == 6
    next_round = peers_bench.traces(args(), ids, round_index=1)
    assert not set(prompts) & {r.prompt for r in next_round["mixed"].requests}


def run(tok_s: float, p99: float = 1.0) -> dict:
    ttft = {"p50": p99 / 2, "p99": p99}
    return {"throughput_tok_s": tok_s, "ttft_s": ttft, "requests": 4, "statuses": {"OK": 4}}


def test_ratios_are_taken_round_by_round_then_the_median() -> None:
    rounds = [
        {"loraplex": {load: run(100.0) for load in peers_bench.LOADS},
         "vllm": {load: run(50.0 if load == "mixed" else 200.0) for load in peers_bench.LOADS}},
        {"loraplex": {load: run(60.0, p99=3.0) for load in peers_bench.LOADS},
         "vllm": {load: run(40.0 if load == "mixed" else 100.0) for load in peers_bench.LOADS}},
    ]  # fmt: skip
    summary = peers_bench.summarize(rounds)
    ratios = {(r["peer"], r["load"]): r for r in summary["ratios"]}
    assert set(ratios) == {("vllm", "mixed"), ("vllm", "base")}  # no llama-server ran
    assert ratios["vllm", "mixed"]["rounds"] == [2.0, 1.5]
    assert ratios["vllm", "mixed"]["ratio"] == 1.75
    assert ratios["vllm", "base"]["ratio"] == 0.55  # median of 0.5 and 0.6
    text = peers_bench.report({"workload": {}, "summary": summary})
    assert "loraplex / vllm, base: 0.55x" in text and "MISSED" in text
    assert "TTFT p99, worst load: 2.00s" in text  # the median round of 1 s and 3 s


def test_a_peer_that_is_not_installed_is_skipped_with_the_way_to_install_it(
    tmp_path: Path,
) -> None:
    missing = peers_bench._missing("vllm", args(vllm_python=tmp_path / "none" / "python"))
    assert "scripts/install-peers.sh" in missing
    assert peers_bench._missing("loraplex", args()) == ""
    assert peers_bench._missing("tgi", args()) == "unknown server name"
