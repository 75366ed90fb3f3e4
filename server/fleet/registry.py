"""Which replicas the fleet has and where their `loraplex serve` processes listen: a small
named Ray actor the replicas register with, so that adapter commands reach every replica."""

from __future__ import annotations

from typing import Any, NamedTuple

import ray

NAMESPACE = "serve"  # where Serve runs its replicas, so that they find the registry


class ReplicaAddress(NamedTuple):
    """Where a replica's `loraplex serve` listens, on its node's loopback."""

    grpc: str  # host:port
    http: str  # http://host:port
    metrics_port: int


@ray.remote(num_cpus=0)
class _RegistryActor:
    def __init__(self) -> None:
        self._replicas: dict[str, ReplicaAddress] = {}

    def add(self, replica_id: str, address: ReplicaAddress) -> None:
        self._replicas[replica_id] = address

    def remove(self, replica_id: str) -> None:
        self._replicas.pop(replica_id, None)

    def replicas(self) -> dict[str, ReplicaAddress]:
        return dict(self._replicas)


class Registry:
    """A handle on the named registry actor (created once by the fleet's driver)."""

    def __init__(self, actor: Any) -> None:
        self._actor = actor

    @classmethod
    def create(cls, name: str) -> Registry:
        actor = _RegistryActor.options(  # type: ignore[attr-defined]
            name=name, namespace=NAMESPACE, get_if_exists=True, lifetime="detached"
        )  # detached: it lives on while no driver holds a handle; `close` ends it
        return cls(actor.remote())

    @classmethod
    def named(cls, name: str) -> Registry:
        return cls(ray.get_actor(name, namespace=NAMESPACE))

    def add(self, replica_id: str, address: ReplicaAddress) -> None:
        ray.get(self._actor.add.remote(replica_id, address))

    def remove(self, replica_id: str) -> None:
        self._actor.remove.remote(replica_id)

    def replicas(self) -> dict[str, ReplicaAddress]:
        return dict(ray.get(self._actor.replicas.remote()))

    def close(self) -> None:
        ray.kill(self._actor)

    async def replicas_async(self) -> dict[str, ReplicaAddress]:
        return dict(await self._actor.replicas.remote())
