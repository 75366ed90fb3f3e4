"""Seeded multi-adapter workloads: which adapter each request uses, when it arrives, how long it is.

Modelled on S-LoRA's trace generator, with two deliberate differences: popularity follows
a Zipf law p(i) ∝ (i+1)^-alpha (alpha=0 is uniform, alpha=1 the classic long tail), and all
randomness comes from one seed, so a seed alone fixes the whole trace. Each aspect (adapters,
arrivals, adapter picks, lengths, prompts) draws from its own stream spawned from that seed:
traces that differ only in their number of adapters share arrivals, lengths and prompts, so
a sweep over adapters compares like with like.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

Popularity = Literal["uniform", "zipf"]
Arrival = Literal["poisson", "gamma", "closed"]
WORDS = ("alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india")


@dataclass(frozen=True)
class WorkloadSpec:
    """Everything that defines a trace; equal specs give equal traces."""

    seed: int = 0
    num_adapters: int = 8
    popularity: Popularity = "zipf"
    alpha: float = 1.0
    base_fraction: float = 0.0  # share of requests that ask for no adapter
    vera_fraction: float = 0.0  # share of adapters that are VeRA rather than LoRA
    ranks: tuple[int, ...] = (8, 16)
    arrival: Arrival = "poisson"
    rate: float = 1.0  # requests per second (open loop)
    cv: float = 1.0  # coefficient of variation of inter-arrival gaps (gamma)
    concurrency: int = 8  # clients in flight (closed loop)
    num_requests: int | None = 64
    duration_s: float | None = None  # open loop: stop generating arrivals after this
    prompt_tokens: tuple[int, int] = (16, 64)  # inclusive range
    output_tokens: tuple[int, int] = (16, 64)  # inclusive range

    def __post_init__(self) -> None:
        if self.num_requests is None and (self.duration_s is None or self.arrival == "closed"):
            raise ValueError("give num_requests, or duration_s with an open-loop arrival process")
        if self.num_adapters < 1 or self.rate <= 0 or self.cv <= 0 or self.concurrency < 1:
            raise ValueError("num_adapters, rate, cv and concurrency must be positive")
        for low, high in (self.prompt_tokens, self.output_tokens):
            if not 1 <= low <= high:
                raise ValueError(f"token range ({low}, {high}) must satisfy 1 <= low <= high")


@dataclass(frozen=True)
class AdapterSpec:
    adapter_id: str
    kind: Literal["lora", "vera"]
    rank: int


@dataclass(frozen=True)
class TraceRequest:
    index: int
    arrival_s: float | None  # None in closed-loop traces: sent when a client frees up
    adapter_id: str  # "" means the base model
    prompt: str
    prompt_tokens: int
    output_tokens: int


@dataclass
class Trace:
    spec: WorkloadSpec
    adapters: list[AdapterSpec]
    requests: list[TraceRequest] = field(default_factory=list)

    def save(self, path: Path) -> None:
        """One JSON object per line: the spec, then each adapter, then each request."""
        with path.open("w") as f:
            f.write(json.dumps({"spec": asdict(self.spec)}) + "\n")
            for adapter in self.adapters:
                f.write(json.dumps({"adapter": asdict(adapter)}) + "\n")
            for request in self.requests:
                f.write(json.dumps({"request": asdict(request)}) + "\n")

    @classmethod
    def load(cls, path: Path) -> Trace:
        lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        if not lines or "spec" not in lines[0]:
            raise ValueError(f"{path}: the first line must hold the workload spec")
        raw = lines[0]["spec"]
        spec = WorkloadSpec(
            **{**raw, **{k: tuple(raw[k]) for k in ("ranks", "prompt_tokens", "output_tokens")}}
        )
        adapters = [AdapterSpec(**line["adapter"]) for line in lines if "adapter" in line]
        requests = [TraceRequest(**line["request"]) for line in lines if "request" in line]
        return cls(spec, adapters, requests)


def adapter_popularity(spec: WorkloadSpec) -> np.ndarray:
    """Probability of each adapter index, most popular first."""
    if spec.popularity == "uniform":
        weights = np.ones(spec.num_adapters)
    else:
        weights = np.arange(1, spec.num_adapters + 1, dtype=float) ** -spec.alpha
    return weights / weights.sum()


def generate(spec: WorkloadSpec) -> Trace:
    streams = np.random.SeedSequence(spec.seed).spawn(5)
    adapter_rng, arrival_rng, pick_rng, length_rng, prompt_rng = map(np.random.default_rng, streams)
    adapters = _adapters(spec, adapter_rng)
    arrivals = _arrivals(spec, arrival_rng)
    count = len(arrivals)
    picks = pick_rng.choice(spec.num_adapters, size=count, p=adapter_popularity(spec))
    use_base = pick_rng.random(count) < spec.base_fraction
    prompt_lens = length_rng.integers(spec.prompt_tokens[0], spec.prompt_tokens[1] + 1, size=count)
    output_lens = length_rng.integers(spec.output_tokens[0], spec.output_tokens[1] + 1, size=count)
    requests = [
        TraceRequest(
            index=i,
            arrival_s=arrivals[i],
            adapter_id="" if use_base[i] else adapters[picks[i]].adapter_id,
            prompt=_prompt(prompt_rng, int(prompt_lens[i])),
            prompt_tokens=int(prompt_lens[i]),
            output_tokens=int(output_lens[i]),
        )
        for i in range(count)
    ]
    return Trace(spec, adapters, requests)


def _adapters(spec: WorkloadSpec, rng: np.random.Generator) -> list[AdapterSpec]:
    is_vera = rng.random(spec.num_adapters) < spec.vera_fraction
    ranks = rng.choice(np.array(spec.ranks), size=spec.num_adapters)
    return [
        AdapterSpec(
            f"{'vera' if is_vera[i] else 'lora'}-{i:04d}",
            "vera" if is_vera[i] else "lora",
            int(ranks[i]),
        )
        for i in range(spec.num_adapters)
    ]


def _arrivals(spec: WorkloadSpec, rng: np.random.Generator) -> list[float | None]:
    if spec.arrival == "closed":
        assert spec.num_requests is not None
        return [None] * spec.num_requests
    # Gamma gaps with shape 1/cv² and mean 1/rate; cv=1 is the Poisson process.
    cv = 1.0 if spec.arrival == "poisson" else spec.cv
    limit = spec.num_requests if spec.num_requests is not None else 1 << 30
    times: list[float | None] = []
    clock = 0.0
    while len(times) < limit:
        clock += float(rng.gamma(1.0 / cv**2, cv**2 / spec.rate))
        if spec.duration_s is not None and clock > spec.duration_s:
            break
        times.append(clock)
    return times


def _prompt(rng: np.random.Generator, words: int) -> str:
    return " ".join(WORDS[i] for i in rng.integers(0, len(WORDS), size=words))
