"""The fleet's Ray Serve request routers: `affinity.AffinityPolicy` over Serve's replicas,
and Ray's stock router for comparison, both reading the adapter a request names.

The adapter is read from the request itself, in the proxy: Serve's gRPC proxy hands a
router the pickled request message, so no ingress deployment has to set
`multiplexed_model_id` (one Ray hop less for every streamed token).

Serve takes the least busy replica of the first rank that has one below its
`max_ongoing_requests`, so a request whose holders are all full goes on at once to the
next rank; Ray's stock router instead keeps waiting for a holder for 1-2 s
(RAY_SERVE_MULTIPLEXED_MODEL_ID_MATCHING_TIMEOUT_S) even while another replica is idle.
"""

from __future__ import annotations

import contextlib
import pickle
import time
from typing import Any

from ray.serve._private.request_router.pow_2_router import PowerOfTwoChoicesRequestRouter
from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica

from loraplex.server.fleet.affinity import RECENT_PLACEMENT_S, AffinityPolicy, ReplicaView


class AdapterAffinityRouter(RequestRouter):
    def initialize_state(
        self, memory_s: float = RECENT_PLACEMENT_S, batch: int = 0, **_: Any
    ) -> None:
        """`batch`: the sequences a replica's server runs at once (0: unknown, spill to any
        replica with room)."""
        self.policy = AffinityPolicy(memory_s)
        self.batch = batch

    async def choose_replicas(
        self,
        candidate_replicas: list[RunningReplica],
        pending_request: PendingRequest | None = None,
    ) -> list[list[RunningReplica]]:
        if pending_request is None:
            return [candidate_replicas]
        # without the stock mixins, nothing else makes a retry wait between rounds
        pending_request.routing_context.should_backoff = True
        adapter_id = requested_adapter(pending_request)
        by_view = {_view(r): r for r in candidate_replicas}
        ranks = self.policy.rank(adapter_id, list(by_view), time.monotonic(), self._idle())
        return [[by_view[v] for v in rank] for rank in ranks]

    def _idle(self) -> set[ReplicaID] | None:
        """Replicas with a free batch slot, as far as Serve's cached queue lengths say (a
        replica with none cached counts: Serve probes it before sending it anything)."""
        if not self.batch:
            return None
        cache = self.replica_queue_len_cache
        lengths = {r: cache.get(r) for r in self.curr_replicas}
        return {r for r, length in lengths.items() if length is None or length < self.batch // 2}

    def on_request_routed(
        self, pending_request: PendingRequest, replica_id: ReplicaID, result: Any
    ) -> None:
        adapter_id = requested_adapter(pending_request)
        self.policy.placed(adapter_id, replica_id, time.monotonic())


def _view(replica: RunningReplica) -> ReplicaView:
    return ReplicaView(replica.replica_id, frozenset(replica.multiplexed_model_ids))


class StockRouter(PowerOfTwoChoicesRequestRouter):
    """Ray's stock multiplexed routing, told the adapter as its ingress would tell it."""

    async def _choose_replica_for_request(  # type: ignore[override]
        self, pending_request: PendingRequest, *, is_retry: bool = False
    ) -> RunningReplica:
        # before Serve indexes the request by model id (private in ray 2.60, which is pinned)
        requested_adapter(pending_request)
        return await super()._choose_replica_for_request(pending_request, is_retry=is_retry)


def requested_adapter(request: PendingRequest) -> str:
    """The adapter a request names: the multiplexed model id a handle set, else the
    `adapter_id` of the loraplex message Serve's gRPC proxy forwards (pickled by the proxy
    itself, in this process), kept as the request's multiplexed model id so that the next
    call (each routing round, then on_request_routed) reads it without unpickling again."""
    if not request.metadata.multiplexed_model_id and request.args:
        with contextlib.suppress(Exception):  # another kind of request: it names none
            message = pickle.loads(request.args[0]).user_request_proto
            request.metadata.multiplexed_model_id = str(getattr(message, "adapter_id", ""))
    return str(request.metadata.multiplexed_model_id)
