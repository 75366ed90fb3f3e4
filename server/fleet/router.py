"""The fleet's Ray Serve request router: `affinity.AffinityPolicy` over Serve's replicas.

Serve takes the least busy replica of the first rank that has one below its
`max_ongoing_requests`, so a request whose holders are all full goes on at once to the
next rank; Ray's stock router instead keeps waiting for a holder for 1-2 s
(RAY_SERVE_MULTIPLEXED_MODEL_ID_MATCHING_TIMEOUT_S) even while another replica is idle.
"""

from __future__ import annotations

import time
from typing import Any

from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica

from loraplex.server.fleet.affinity import RECENT_PLACEMENT_S, AffinityPolicy, ReplicaView


class AdapterAffinityRouter(RequestRouter):
    def initialize_state(self, memory_s: float = RECENT_PLACEMENT_S, **_: Any) -> None:
        self.policy = AffinityPolicy(memory_s)

    async def choose_replicas(
        self,
        candidate_replicas: list[RunningReplica],
        pending_request: PendingRequest | None = None,
    ) -> list[list[RunningReplica]]:
        if pending_request is None:
            return [candidate_replicas]
        # without the stock mixins, nothing else makes a retry wait between rounds
        pending_request.routing_context.should_backoff = True
        adapter_id = pending_request.metadata.multiplexed_model_id
        by_view = {_view(r): r for r in candidate_replicas}
        ranks = self.policy.rank(adapter_id, list(by_view), time.monotonic())
        return [[by_view[v] for v in rank] for rank in ranks]

    def on_request_routed(
        self, pending_request: PendingRequest, replica_id: ReplicaID, result: Any
    ) -> None:
        adapter_id = pending_request.metadata.multiplexed_model_id
        self.policy.placed(adapter_id, replica_id, time.monotonic())


def _view(replica: RunningReplica) -> ReplicaView:
    return ReplicaView(replica.replica_id, frozenset(replica.multiplexed_model_ids))
