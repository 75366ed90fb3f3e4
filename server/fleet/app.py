"""Build and start the fleet: Ray, Serve's gRPC proxy with loraplex's own service, the
ingress and the replicas (server/fleet/deployments.py), routed by adapter affinity."""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from typing import Any, Literal

import ray
from ray import serve
from ray.serve.config import AutoscalingConfig

from loraplex.server.auth import Role
from loraplex.server.fleet.deployments import Ingress, LoraplexReplica
from loraplex.server.fleet.registry import Registry

APP = "loraplex"
SERVICER = "loraplex.proto.v1.loraplex_pb2_grpc.add_LoraplexServicer_to_server"
ROUTER = "loraplex.server.fleet.router:AdapterAffinityRouter"


@dataclass
class FleetConfig:
    replicas: int = 2
    max_replicas: int = 0  # > replicas: autoscale between the two
    max_resident_adapters: int = 8  # per replica; `serve --max-resident-adapters`
    max_batch_sequences: int = 16  # per replica; `serve --max-batch-sequences`
    max_queue: int = 64  # per replica; `serve --max-queue`
    serve_args: list[str] = field(default_factory=list)  # more `loraplex serve` flags
    grpc_port: int = 9000
    router: Literal["affinity", "ray"] = "affinity"  # "ray": Serve's stock router
    tokens: dict[str, Role] = field(default_factory=dict)
    replica_cpus: float = 1.0
    registry: str = "loraplex-fleet-registry"

    @property
    def max_ongoing(self) -> int:
        """Requests a replica takes at once: a full batch plus its queue."""
        return self.max_batch_sequences + self.max_queue


def build(config: FleetConfig) -> Any:
    """The Serve application (ingress bound to the replica deployment)."""
    Registry.create(config.registry)
    options: dict[str, Any] = {
        "name": "LoraplexReplica",
        "max_ongoing_requests": config.max_ongoing,
        "ray_actor_options": {"num_cpus": config.replica_cpus},
        "graceful_shutdown_timeout_s": 60,
    }
    if config.max_replicas > config.replicas:
        options["autoscaling_config"] = AutoscalingConfig(
            min_replicas=config.replicas,
            max_replicas=config.max_replicas,
            # continuous batching serves a whole batch at once: scale when batches fill
            target_ongoing_requests=config.max_batch_sequences,
        )
    else:
        options["num_replicas"] = config.replicas
    if config.router == "affinity":
        options["request_router_config"] = {"request_router_class": ROUTER}
    replica: Any = serve.deployment(LoraplexReplica, **options)
    # The server's admission queue holds all that Serve may send it at once (requests wait
    # there before the loop admits them into the batch), so a replica never refuses one.
    serve_args = [*config.serve_args, "--max-batch-sequences", str(config.max_batch_sequences),
                  "--max-queue", str(config.max_ongoing)]  # fmt: skip
    ingress: Any = serve.deployment(Ingress, name="Ingress", max_ongoing_requests=100_000,
                               ray_actor_options={"num_cpus": 0})  # fmt: skip
    bound = replica.bind(serve_args, config.max_resident_adapters, config.registry)
    return ingress.bind(bound, config.tokens, config.registry)


def start(config: FleetConfig, address: str | None = None, num_cpus: int | None = None) -> None:
    """Start (or join, with `address`) Ray, then the proxy and the application; returns once
    every replica serves."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if not ray.is_initialized():
        cpus = num_cpus or max(
            int(config.replica_cpus * max(config.replicas, config.max_replicas)), 1
        )
        ray.init(address=address or "local", num_cpus=None if address else cpus,
                 include_dashboard=False, log_to_driver=False,
                 object_store_memory=None if address else 256 << 20)  # fmt: skip
    serve.start(
        proxy_location="HeadOnly",
        http_options={"host": "127.0.0.1", "port": 0},
        grpc_options={"port": config.grpc_port, "grpc_servicer_functions": [SERVICER]},
    )
    deploy(config)


def deploy(config: FleetConfig) -> None:
    """Deploy the application as `config` says, replacing the running one (fresh replicas)."""
    serve.run(build(config), name=APP, route_prefix="/")


def stop(config: FleetConfig) -> None:
    serve.shutdown()
    with contextlib.suppress(ValueError):  # never created
        Registry.named(config.registry).close()
    ray.shutdown()
