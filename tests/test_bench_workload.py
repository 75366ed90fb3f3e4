"""Seeded traces are reproducible, shaped as asked, and survive a JSONL round trip."""

from __future__ import annotations

import statistics
from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from loraplex.bench.stats import Distribution, percentile
from loraplex.bench.workload import Trace, WorkloadSpec, adapter_popularity, generate


def test_same_seed_same_trace_other_seed_other_trace() -> None:
    spec = WorkloadSpec(seed=7, num_adapters=16, num_requests=200, vera_fraction=0.5)
    assert generate(spec) == generate(spec)
    assert generate(spec).requests != generate(replace(spec, seed=8)).requests


def test_an_adapter_sweep_changes_only_the_adapter_picks() -> None:
    """8 and 256 adapters get the same arrivals, lengths and prompts: a fair comparison."""
    few = generate(WorkloadSpec(seed=5, num_adapters=8, num_requests=100))
    many = generate(WorkloadSpec(seed=5, num_adapters=256, num_requests=100))

    def shape(trace: Trace) -> list[tuple[object, ...]]:
        return [(r.arrival_s, r.prompt, r.prompt_tokens, r.output_tokens) for r in trace.requests]

    assert shape(few) == shape(many)
    assert len({r.adapter_id for r in many.requests}) > len({r.adapter_id for r in few.requests})


def test_trace_round_trips_through_jsonl(tmp_path: Path) -> None:
    trace = generate(WorkloadSpec(seed=3, arrival="gamma", cv=2.0, vera_fraction=0.3))
    trace.save(tmp_path / "trace.jsonl")
    assert Trace.load(tmp_path / "trace.jsonl") == trace


def test_zipf_popularity_matches_the_requested_law() -> None:
    spec = WorkloadSpec(seed=1, num_adapters=8, alpha=1.0, num_requests=20000)
    counts = Counter(r.adapter_id for r in generate(spec).requests)
    observed = np.array([counts[f"lora-{i:04d}"] for i in range(8)]) / 20000
    expected = 1 / np.arange(1, 9)
    np.testing.assert_allclose(observed, expected / expected.sum(), atol=0.01)
    assert np.allclose(adapter_popularity(replace(spec, popularity="uniform")), 1 / 8)


@pytest.mark.parametrize(("arrival", "cv"), [("poisson", 1.0), ("gamma", 3.0)])
def test_arrival_gaps_have_the_requested_rate_and_cv(arrival: str, cv: float) -> None:
    spec = WorkloadSpec(seed=2, arrival=arrival, rate=4.0, cv=cv, num_requests=20000)  # type: ignore[arg-type]
    times = np.array([r.arrival_s for r in generate(spec).requests])
    gaps = np.diff(np.concatenate([[0.0], times]))
    assert gaps.mean() == pytest.approx(0.25, rel=0.05)
    assert gaps.std() / gaps.mean() == pytest.approx(cv, rel=0.08)


def test_duration_bounds_open_loop_traces_and_closed_loop_has_no_arrivals() -> None:
    timed = generate(WorkloadSpec(seed=4, rate=10.0, num_requests=None, duration_s=5.0))
    assert all(r.arrival_s is not None and r.arrival_s <= 5.0 for r in timed.requests)
    assert 30 < len(timed.requests) < 80
    closed = generate(WorkloadSpec(seed=4, arrival="closed", num_requests=12))
    assert len(closed.requests) == 12 and all(r.arrival_s is None for r in closed.requests)


def test_lengths_stay_in_range_and_prompts_have_the_drawn_word_count() -> None:
    spec = WorkloadSpec(seed=5, prompt_tokens=(3, 9), output_tokens=(1, 2), base_fraction=0.5)
    requests = generate(spec).requests
    assert all(3 <= r.prompt_tokens <= 9 and 1 <= r.output_tokens <= 2 for r in requests)
    assert all(len(r.prompt.split()) == r.prompt_tokens for r in requests)
    assert 0 < sum(r.adapter_id == "" for r in requests) < len(requests)


def test_invalid_specs_are_refused() -> None:
    with pytest.raises(ValueError, match="num_requests"):
        WorkloadSpec(arrival="closed", num_requests=None)
    with pytest.raises(ValueError, match="token range"):
        WorkloadSpec(prompt_tokens=(5, 2))


def test_percentiles_on_known_data() -> None:
    values = [float(v) for v in range(1, 101)]  # 1..100
    assert percentile(values, 0) == 1.0
    assert percentile(values, 100) == 100.0
    assert percentile(values, 50) == pytest.approx(50.5)
    assert percentile(values, 99) == pytest.approx(99.01)
    assert percentile([3.0, 1.0, 2.0], 50) == 2.0
    assert statistics.quantiles(values, n=100, method="inclusive")[49] == percentile(values, 50)
    summary = Distribution.of([4.0, 1.0, 3.0, 2.0])
    assert (summary.count, summary.mean, summary.p50, summary.max) == (4, 2.5, 2.5, 4.0)
