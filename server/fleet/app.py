"""Build and start the fleet: Ray, Serve's gRPC proxy with loraplex's own service, and the
replicas (server/fleet/deployments.py), routed by adapter affinity."""

from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass, field
from typing import Any, Literal

import ray
from ray import serve
from ray.serve.config import AutoscalingConfig

from loraplex.server.auth import Role
from loraplex.server.fleet.deployments import APP, DEPLOYMENT, LoraplexReplica
from loraplex.server.fleet.registry import Registry

SERVICER = "loraplex.proto.v1.loraplex_pb2_grpc.add_LoraplexServicer_to_server"
ROUTERS = {
    "affinity": "loraplex.server.fleet.router:AdapterAffinityRouter",
    "ray": "loraplex.server.fleet.router:StockRouter",
}


# Serve's own throughput settings (as its RAY_SERVE_THROUGHPUT_OPTIMIZED mode sets them, less
# direct ingress, which would bypass the router): the proxy reaches replicas over gRPC
# rather than Ray actor calls, and user code and routers run on their process's main loop.
# Each streamed token crosses the proxy and a replica, and on a small machine their CPU time
# is the engine's: this halves it (`loraplex bench fleet`, docs/measurements.md).
SERVE_ENV = {
    "RAY_SERVE_USE_GRPC_BY_DEFAULT": "1",
    "RAY_SERVE_PROXY_USE_GRPC": "1",
    "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0",
    "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "0",
    "RAY_SERVE_REQUEST_PATH_LOG_BUFFER_SIZE": "1000",
}


@dataclass
class FleetConfig:
    replicas: int = 2
    max_replicas: int = 0  # > replicas: autoscale between the two
    max_resident_adapters: int = 8  # per replica; `serve --max-resident-adapters`
    max_batch_sequences: int = 16  # per replica; `serve --max-batch-sequences`
    max_queue: int = 64  # per replica; `serve --max-queue`
    serve_args: list[str] = field(default_factory=list)  # more `loraplex serve` flags
    grpc_port: int = 9000
    http_port: int = 8000  # the OpenAI HTTP API, through Serve's HTTP proxy
    http_host: str = "127.0.0.1"
    router: Literal["affinity", "ray"] = "affinity"  # "ray": Serve's stock router
    tokens: dict[str, Role] = field(default_factory=dict)
    replica_cpus: float = 0.0  # Ray CPUs per replica; 0: this machine's, shared out
    registry: str = "loraplex-fleet-registry"

    @property
    def max_ongoing(self) -> int:
        """Requests a replica takes at once: a full batch plus its queue."""
        return self.max_batch_sequences + self.max_queue

    @property
    def cpus_per_replica(self) -> float:
        if self.replica_cpus > 0:
            return self.replica_cpus
        return max(1, (os.cpu_count() or 1) // max(self.replicas, self.max_replicas))

    @property
    def server_threads(self) -> int:
        """The server's threads: the replica's CPUs but one, which Serve's proxy and the
        replica's relay use for every streamed token (an OpenMP pool on every core stalls
        whenever they run: on 2 cores, 2 threads gave 0.94x of direct throughput and 17 ms
        more TTFT, 1 thread 0.99x and 10 ms; docs/measurements.md)."""
        return max(1, math.ceil(self.cpus_per_replica) - 1)

    @property
    def server_args(self) -> list[str]:
        """`loraplex serve` flags for each replica's server: its threads (Ray's workers run
        with OMP_NUM_THREADS=1 otherwise), a queue that holds all that Serve may send at
        once, so a replica never refuses a request."""
        threads = [] if "--threads" in self.serve_args else ["--threads", str(self.server_threads)]
        return [*self.serve_args, *threads, "--max-batch-sequences",
                str(self.max_batch_sequences), "--max-queue", str(self.max_ongoing)]  # fmt: skip


def build(config: FleetConfig) -> Any:
    """The Serve application: the replica deployment, its own ingress."""
    Registry.create(config.registry)
    options: dict[str, Any] = {
        "name": DEPLOYMENT,
        "max_ongoing_requests": config.max_ongoing,
        "ray_actor_options": {"num_cpus": config.cpus_per_replica},
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
    options["request_router_config"] = {"request_router_class": ROUTERS[config.router]}
    if config.router == "affinity":
        options["request_router_config"]["request_router_kwargs"] = {
            "batch": config.max_batch_sequences}  # fmt: skip
    replica: Any = serve.deployment(LoraplexReplica, **options)
    return replica.bind(
        config.server_args,
        config.max_resident_adapters,
        config.tokens,
        config.registry,
        max(1, config.max_ongoing // 2),
    )


def start(config: FleetConfig, address: str | None = None, num_cpus: int | None = None) -> None:
    """Start (or join, with `address`) Ray, then the proxy and the application; returns once
    every replica serves."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    for name, value in SERVE_ENV.items():  # Serve's processes started here inherit them
        os.environ.setdefault(name, value)
    if not ray.is_initialized():
        replicas = max(config.replicas, config.max_replicas)
        cpus = num_cpus or max(math.ceil(config.cpus_per_replica * replicas), 1)
        ray.init(address=address or "local", num_cpus=None if address else cpus,
                 include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": SERVE_ENV},
                 object_store_memory=None if address else 256 << 20)  # fmt: skip
    serve.start(
        proxy_location="HeadOnly",
        http_options={"host": config.http_host, "port": config.http_port},
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
