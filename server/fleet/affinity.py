"""Where an adapter's request should go among the replicas: the routing policy alone, with no
Ray in it, so that the seeded simulation runs the very code the fleet's router runs.

Ranks, most preferred first (the router takes the least busy replica of the first rank that
has one with room):
1. the replicas that hold the adapter, and the one it was last sent to within `memory_s`
   (its load may not have been reported yet);
2. the replicas holding the fewest adapters (a new adapter lands where it evicts least);
3. every other replica.
A base-model request (no adapter) ranks every replica alike.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
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
        self, adapter_id: str, replicas: Sequence[ReplicaView], now: float
    ) -> list[list[ReplicaView]]:
        if not adapter_id:
            return [list(replicas)]
        recent = self._recent(adapter_id, now)
        holders = [r for r in replicas if adapter_id in r.adapters or r.replica_id == recent]
        others = [r for r in replicas if r not in holders]
        fewest = min((len(r.adapters) for r in others), default=0)
        emptiest = [r for r in others if len(r.adapters) == fewest]
        rest = [r for r in others if len(r.adapters) != fewest]
        return [rank for rank in (holders, emptiest, rest) if rank]

    def placed(self, adapter_id: str, replica_id: Hashable, now: float) -> None:
        """Remember where an adapter's request went."""
        if adapter_id:
            self._placed[adapter_id] = (replica_id, now)
            if len(self._placed) > 4096:  # forget the stale ones now and then
                self._placed = {a: p for a, p in self._placed.items() if now - p[1] < self.memory_s}

    def _recent(self, adapter_id: str, now: float) -> Hashable | None:
        replica, when = self._placed.get(adapter_id, (None, 0.0))
        return replica if now - when < self.memory_s else None
