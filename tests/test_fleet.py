"""The fleet on Ray Serve: the routing policy and the router on their own, the seeded
simulation, and one real fleet (Ray, Serve's gRPC proxy, two replicas each running
`loraplex serve` on a tiny model) started once for the module inside a loopback-only network
namespace, since Serve's proxy listens on every interface."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from peft_adapters import ADAPTER_CONFIGS, save_adapter
from transformers import AutoModelForCausalLM

from loraplex.bench.fleet_bench import zipf_trace
from loraplex.server.fleet.affinity import AffinityPolicy, ReplicaView
from loraplex.server.fleet.router import AdapterAffinityRouter
from loraplex.server.fleet.simulate import SimReplica, simulate, table

SCENARIO = Path(__file__).with_name("fleet_scenario.py")
ADAPTERS = 16
TRACE = 800  # as fleet_scenario.py sends


def view(name: str, *adapters: str) -> ReplicaView:
    return ReplicaView(name, frozenset(adapters))


def names(ranks: list[list[ReplicaView]]) -> list[list[str]]:
    return [[str(r.replica_id) for r in rank] for rank in ranks]


# ---- the policy --------------------------------------------------------------------------


def test_holders_first_then_the_fewest_adapters_then_the_rest() -> None:
    replicas = [view("r0", "x", "y"), view("r1", "x"), view("r2"), view("r3", "z")]
    policy = AffinityPolicy()
    assert names(policy.rank("x", replicas, 0.0)) == [["r0", "r1"], ["r2"], ["r3"]]
    assert names(policy.rank("new", replicas, 0.0)) == [["r2"], ["r0", "r1", "r3"]]


def test_requests_for_a_new_adapter_routed_together_go_to_one_replica() -> None:
    """Before any of them is sent (and so before on_request_routed), the first ranking
    already reserves the adapter's home."""
    policy = AffinityPolicy()
    replicas = [view("r0"), view("r1"), view("r2")]
    firsts = [names(policy.rank("new", replicas, 0.0))[0] for _ in range(5)]
    assert len(firsts[0]) == 1 and all(first == firsts[0] for first in firsts)


def test_adapters_sent_but_not_yet_reported_count_as_held() -> None:
    policy = AffinityPolicy(memory_s=2.0)
    replicas = [view("r0"), view("r1")]
    for adapter_id in ("a", "b", "c"):
        policy.placed(adapter_id, "r0", now=0.0)  # r0 reports nothing yet
    assert names(policy.rank("d", replicas, 1.0))[0] == ["r1"]


def test_after_the_holders_only_idle_replicas_are_offered() -> None:
    replicas = [view("r0", "x", "y"), view("r1", "x"), view("r2"), view("r3", "z")]
    policy = AffinityPolicy()
    assert names(policy.rank("x", replicas, 0.0, idle={"r3"})) == [["r0", "r1"], ["r3"]]
    assert names(policy.rank("x", replicas, 0.0, idle=set())) == [["r0", "r1"]]


def test_a_base_request_may_go_anywhere() -> None:
    replicas = [view("r0", "x"), view("r1")]
    assert names(AffinityPolicy().rank("", replicas, 0.0)) == [["r0", "r1"]]


def test_a_recent_placement_counts_as_held_until_it_would_have_been_reported() -> None:
    policy = AffinityPolicy(memory_s=2.0)
    replicas = [view("r0", "a", "b"), view("r1")]
    policy.placed("new", "r0", now=10.0)  # sent there, not yet reported
    assert names(policy.rank("new", replicas, 11.0)) == [["r0"], ["r1"]]
    assert names(policy.rank("new", replicas, 12.5)) == [["r1"], ["r0"]]


def test_the_router_ranks_serves_replicas_and_remembers_placements() -> None:
    router = AdapterAffinityRouter.__new__(AdapterAffinityRouter)  # no Serve around it
    router.initialize_state(memory_s=5.0)
    r0 = SimpleNamespace(replica_id="r0", multiplexed_model_ids={"x"})
    r1 = SimpleNamespace(replica_id="r1", multiplexed_model_ids=set())

    def pending(adapter_id: str) -> Any:
        return SimpleNamespace(metadata=SimpleNamespace(multiplexed_model_id=adapter_id),
                               routing_context=SimpleNamespace(should_backoff=False))  # fmt: skip

    request = pending("x")
    ranks = asyncio.run(router.choose_replicas([r0, r1], request))  # type: ignore[arg-type]
    assert ranks == [[r0], [r1]] and request.routing_context.should_backoff
    router.on_request_routed(pending("y"), "r0", None)  # type: ignore[arg-type]
    assert asyncio.run(router.choose_replicas([r0, r1], pending("y")))[0] == [r0]  # type: ignore[arg-type]


# ---- the simulation ----------------------------------------------------------------------


def test_the_simulation_is_seeded_and_counts_what_an_lru_must_load() -> None:
    assert simulate("affinity", 4, 64, 8, 2000, seed=3) == simulate("affinity", 4, 64, 8, 2000, 3)
    # room for every adapter on the fleet and no duplicates: each adapter loads exactly once
    # (8 per 1000 requests), when replicas report at once
    for router in ("affinity", "stock"):
        cold = simulate(router, 2, adapters=8, max_resident=8, requests=1000, seed=1,
                        report_lag_s=0.0)  # fmt: skip
        assert cold == pytest.approx(8)
    # with reports 0.2 s late, remembered placements keep affinity at one load per adapter
    assert simulate("affinity", 2, 8, 8, 1000, seed=1) == pytest.approx(8)
    replica = SimReplica("r", max_resident=2)
    assert [replica.serve(a) for a in "abab" + "cab"] == [True, True, False, False, True, True,
                                                           True]  # fmt: skip


def test_affinity_loads_under_0_4x_of_rays_router_in_the_seeded_simulation() -> None:
    """2 replicas with room for 8 adapters each, a Zipf trace over 16, reports 0.2 s late:
    Ray's ranking sends a new adapter's second request, routed before the first is
    reported, to the other replica, and the duplicate's evictions come back as loads."""
    seeds = range(5)
    affinity = sum(simulate("affinity", 2, 16, 8, 1000, seed) for seed in seeds)
    stock = sum(simulate("stock", 2, 16, 8, 1000, seed) for seed in seeds)
    assert affinity == 16 * len(seeds)  # each adapter once
    assert affinity <= 0.4 * stock


def test_the_simulation_table_covers_the_asked_sizes() -> None:
    rows = table([4, 8], [256, 512], max_resident=16, requests=500, seed=0)
    assert [(r["replicas"], r["adapters"]) for r in rows] == [(4, 256), (4, 512), (8, 256),
                                                              (8, 512)]  # fmt: skip
    assert all(0 < r["affinity"] <= 1000 and 0 < r["stock"] <= 1000 for r in rows)


# ---- one real fleet ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def scenario(tiny_checkpoints: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
             ) -> dict[str, Any]:  # fmt: skip
    root = tmp_path_factory.mktemp("fleet-adapters")
    base = AutoModelForCausalLM.from_pretrained(tiny_checkpoints["llama"])
    for i in range(ADAPTERS):
        save_adapter(base, ADAPTER_CONFIGS["lora-qv-r4"], root / f"a{i:02d}", seed=i + 1, std=1.0)
    out = tmp_path_factory.mktemp("fleet") / "scenario.json"
    command = f"ip link set lo up && exec {sys.executable} {SCENARIO} {out} " \
              f"{tiny_checkpoints['llama']} {root}"  # fmt: skip
    run = subprocess.run(["unshare", "-n", "sh", "-c", command], capture_output=True,
                         text=True, timeout=1200)  # fmt: skip
    assert run.returncode == 0, (
        f"the fleet scenario failed:\n{run.stdout[-3000:]}\n{run.stderr[-5000:]}"
    )
    return dict(json.loads(out.read_text()))


def test_the_fleet_serves_as_one_server(scenario: dict[str, Any]) -> None:
    checks = scenario["checks"]
    assert checks["replicas"] == 2
    assert checks["same_tokens"] and checks["stream_same"] and checks["base_tokens"] == 3
    assert checks["same_tokenize"] and checks["same_info"]


def test_the_replicas_check_tokens_and_errors_keep_their_status(scenario: dict[str, Any]) -> None:
    checks = scenario["checks"]
    assert checks["no_token"] == "Unauthenticated"
    assert checks["load_as_user"] == "PermissionDenied"
    assert checks["unknown_adapter"] == "NotFound"


def test_adapter_commands_reach_every_replica(scenario: dict[str, Any]) -> None:
    checks = scenario["checks"]
    assert checks["loaded_on"] == 2 and checks["after_unload_on"] == 0
    assert "a05" in checks["listed_resident"]


def test_affinity_keeps_each_adapter_on_one_replica(scenario: dict[str, Any]) -> None:
    """The fleet holds 2 x 8 adapters: each of the trace's adapters loads once, on one
    replica, the fewest cold loads any router could reach (Ray's router's count is kept
    for the record; whether it blunders depends on timing)."""
    affinity, stock = scenario["affinity"], scenario["stock"]
    trace = zipf_trace([f"a{i:02d}" for i in range(ADAPTERS)], TRACE, seed=0)
    assert affinity["requests"] == TRACE and affinity["polls"] > 0
    assert affinity["duplicates"] == []
    assert affinity["cold_loads"] == len(set(trace))
    assert stock["requests"] == TRACE and stock["cold_loads"] >= len(set(trace))


def test_the_openai_api_through_the_fleet(scenario: dict[str, Any]) -> None:
    checks = scenario["checks"]
    assert checks["http_a07_holders"] == 1 and checks["http_a07_holders_after"] == 1
    assert checks["http_same_text"] and checks["http_stream_same"]
    assert checks["http_chat"] == 400
    assert {"a00", "a07"} <= set(checks["http_models"])
    assert checks["http_no_token"] == 401 and checks["http_load_as_user"] == 403
    assert checks["http_unknown_adapter"] == 404
    assert checks["http_loaded_on"] == 2 and checks["http_after_unload_on"] == 0


def test_an_http_burst_past_every_slot_is_answered(scenario: dict[str, Any]) -> None:
    """A request routed by adapter holds its first replica's slot while the routed one runs;
    had such waiters taken every slot, none would start: the burst would hang."""
    assert scenario["checks"]["http_burst_answered"] == 48


def test_a_full_holder_sends_the_request_to_the_other_replica(scenario: dict[str, Any]) -> None:
    assert scenario["full_holder"]["served_by_other"]
