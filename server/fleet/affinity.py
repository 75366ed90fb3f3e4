"""Where an adapter's request should go among the replicas: the routing policy alone, with no
Ray in it, so that the seeded simulation runs the very code the fleet's router runs.

Ranks, most preferred first (the router takes the least busy replica of the first rank that
has one with room):
1. the replicas that hold the adapter, and the one it was last sent to within `memory_s`
   (its load may not have been reported yet);
2. for an adapter no replica holds: one replica among those holding the fewest adapters
   (where it evicts least), chosen at once and remembered as the adapter's placement, so
   that requests for it routed at the same moment, before any is sent, go there too;
   adapters sent to a replica within `memory_s` count as held, else a burst of new adapters
   would all count the same replica as the emptiest while reports lag;
3. when the holders are all full, the others holding the fewest adapters, then the rest.
A base-model request (no adapter) ranks every replica alike.
"""

from __future__ import annotations

import hashlib
from collections.abc import Collection, Hashable, Sequence
from dataclasses import dataclass, field

RECENT_PLACEMENT_S = 2.0  # how long a placement counts as "held" before replicas report it


@dataclass(frozen=True)
class ReplicaView:
    """What the policy needs of a replica."""

    replica_id: Hashable
    adapters: frozenset[str]  # what it reports holding


@dataclass
class AffinityPolicy:
    memory_s: float = RECENT_PLACEMENT_S
    _placed: dict[str, tuple[Hashable, float]] = field(default_factory=dict)

    def rank(
        self, adapter_id: str, replicas: Sequence[ReplicaView], now: float,
        idle: Collection[Hashable] | None = None,
    ) -> list[list[ReplicaView]]:  # fmt: skip
        """`idle`: the replicas that could start a request at once, when known; only they
        follow the first rank (a request waits for its holder rather than load its adapter
        on a replica that would only queue it)."""
        if not adapter_id:
            return [list(replicas)]
        ranks = self._ranks(adapter_id, replicas, now)
        if idle is None:
            return ranks
        later = [[r for r in rank if r.replica_id in idle] for rank in ranks[1:]]
        return [ranks[0], *(rank for rank in later if rank)]

    def _ranks(
        self, adapter_id: str, replicas: Sequence[ReplicaView], now: float
    ) -> list[list[ReplicaView]]:
        recent = self._recent(adapter_id, now)
        holders = [r for r in replicas if adapter_id in r.adapters or r.replica_id == recent]
        held = self._held(replicas, now)
        if holders:  # when they are all full: the emptiest of the others, then the rest
            others = [r for r in replicas if r not in holders]
            fewest = min((held[r.replica_id] for r in others), default=0)
            emptiest = [r for r in others if held[r.replica_id] == fewest]
            rest = [r for r in others if held[r.replica_id] != fewest]
            return [rank for rank in (holders, emptiest, rest) if rank]
        # among the emptiest, a stable choice per adapter (rendezvous hashing)
        home = min(replicas, key=lambda r: (held[r.replica_id], _score(adapter_id, r)))
        self.placed(adapter_id, home.replica_id, now)
        return [[home], [r for r in replicas if r is not home]]

    def placed(self, adapter_id: str, replica_id: Hashable, now: float) -> None:
        """Remember where an adapter's request went."""
        if adapter_id:
            self._placed[adapter_id] = (replica_id, now)
            if len(self._placed) > 4096:  # forget the stale ones now and then
                self._placed = {a: p for a, p in self._placed.items() if now - p[1] < self.memory_s}

    def _held(self, replicas: Sequence[ReplicaView], now: float) -> dict[Hashable, int]:
        """How many adapters each replica holds: reported, or sent to it within memory_s."""
        sent: dict[Hashable, set[str]] = {r.replica_id: set(r.adapters) for r in replicas}
        for adapter_id, (replica_id, when) in self._placed.items():
            if replica_id in sent and now - when < self.memory_s:
                sent[replica_id].add(adapter_id)
        return {replica_id: len(adapters) for replica_id, adapters in sent.items()}

    def _recent(self, adapter_id: str, now: float) -> Hashable | None:
        replica, when = self._placed.get(adapter_id, (None, 0.0))
        return replica if now - when < self.memory_s else None


def _score(adapter_id: str, replica: ReplicaView) -> bytes:
    return hashlib.blake2b(f"{adapter_id}|{replica.replica_id}".encode(), digest_size=8).digest()
