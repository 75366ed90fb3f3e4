"""A seeded simulation of adapter placement across a fleet, running the fleet router's own
policy (`affinity.AffinityPolicy`) against a model of Ray Serve's stock multiplexed routing,
to count cold adapter loads per 1000 requests at sizes no test machine holds.

The model: requests arrive one after another at `rate` per second (a Zipf draw over the
adapters); each replica keeps its `max_resident` adapters in LRU order, as loraplex's store
does, and the routers see what replicas hold as last reported, `report_lag_s` old (Serve
pushes multiplexed ids every 0.1 s and broadcasts them on its next control-loop tick); Serve
takes the least busy replica of the first rank, where busy is the count of the
replica's last few requests (continuous batching keeps a replica's recent requests running).
The stock model ranks as Ray's PowerOfTwoChoices router does once its matching timeout has
passed: replicas holding the adapter, else those with the fewest adapters, two drawn at
random from the rank and the less busy one taken.
"""

from __future__ import annotations

import random
from collections import OrderedDict, deque
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from loraplex.server.fleet.affinity import AffinityPolicy, ReplicaView

BUSY_WINDOW = 8  # a replica's load: how many of the fleet's last requests it took


@dataclass
class SimReplica:
    name: str
    max_resident: int
    resident: OrderedDict[str, None] = field(default_factory=OrderedDict)
    _view: ReplicaView | None = None  # what it reports, until its adapters change

    def serve(self, adapter_id: str) -> bool:
        """Run a request; True when the adapter had to be loaded."""
        cold = adapter_id not in self.resident
        self.resident[adapter_id] = None
        self.resident.move_to_end(adapter_id)
        while len(self.resident) > self.max_resident:
            self.resident.popitem(last=False)
        if cold:
            self._view = None
        return cold

    def view(self) -> ReplicaView:
        if self._view is None:
            self._view = ReplicaView(self.name, frozenset(self.resident))
        return self._view


def zipf_requests(adapters: int, n: int, seed: int, alpha: float = 1.1) -> list[str]:
    weights = 1.0 / np.arange(1, adapters + 1) ** alpha
    rng = np.random.default_rng(seed)
    picks = rng.choice(adapters, size=n, p=weights / weights.sum())
    return [f"a{i}" for i in picks]


def simulate(
    router: str, replicas: int, adapters: int, max_resident: int, requests: int, seed: int,
    rate: float = 50.0, report_lag_s: float = 0.2,
) -> float:  # fmt: skip
    """Cold loads per 1000 requests."""
    fleet = [SimReplica(f"r{i}", max_resident) for i in range(replicas)]
    by_name = {r.name: r for r in fleet}
    policy, rng = AffinityPolicy(), random.Random(seed)
    recent: deque[str] = deque(maxlen=BUSY_WINDOW)
    reported = [r.view() for r in fleet]
    lag = max(1, round(report_lag_s * rate))  # requests between two reports
    cold = 0
    for i, adapter_id in enumerate(zipf_requests(adapters, requests, seed)):
        if i % lag == 0:
            reported = [r.view() for r in fleet]
        busy = {r.name: recent.count(r.name) for r in fleet}
        if router == "affinity":
            ranks = policy.rank(adapter_id, reported, i / rate)
            name = str(min(ranks[0], key=lambda v: busy[str(v.replica_id)]).replica_id)
            policy.placed(adapter_id, name, i / rate)
        else:
            name = _stock_choice(adapter_id, reported, busy, rng)
        cold += by_name[name].serve(adapter_id)
        recent.append(name)
    return 1000 * cold / requests


def _stock_choice(
    adapter_id: str, reported: Sequence[ReplicaView], busy: dict[str, int], rng: random.Random
) -> str:
    rank = [r for r in reported if adapter_id in r.adapters]
    if not rank:
        fewest = min(len(r.adapters) for r in reported)
        rank = [r for r in reported if len(r.adapters) == fewest]
    pair = rng.sample(rank, min(2, len(rank)))
    return str(min(pair, key=lambda r: busy[str(r.replica_id)]).replica_id)


def table(
    replica_counts: Sequence[int], adapter_counts: Sequence[int], max_resident: int,
    requests: int, seed: int,
) -> list[dict[str, float]]:  # fmt: skip
    rows = []
    for replicas in replica_counts:
        for adapters in adapter_counts:
            figures = {
                router: simulate(router, replicas, adapters, max_resident, requests, seed)
                for router in ("affinity", "stock")
            }
            rows.append({"replicas": replicas, "adapters": adapters, **figures})
    return rows
