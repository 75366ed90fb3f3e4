"""The fleet's Serve deployments: an ingress that reads a request's adapter id, and replicas
that each supervise one unchanged `loraplex serve` process on 127.0.0.1.

The engine needs its process's main thread and one OpenMP pool, so a replica forwards gRPC
calls to a server process of its own rather than hosting the engine in Ray's worker. The
ingress sets `multiplexed_model_id` from the request's `adapter_id` (base-model requests
carry none, so any replica takes them), which the affinity router reads; each replica
notes the ids it has served in Serve's multiplexing LRU, sized like its
`--max-resident-adapters`, which tells Serve what it holds, while loraplex's adapter store
still decides what is loaded and evicted.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator, Mapping
from typing import Any

import grpc
from ray import serve

from loraplex.proto.v1 import loraplex_pb2 as pb
from loraplex.proto.v1 import loraplex_pb2_grpc as pb_grpc
from loraplex.server.auth import ADMIN_METHODS, Role, role_of
from loraplex.server.fleet.registry import Registry

START_TIMEOUT_S = 600
PR_SET_PDEATHSIG = 1


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _end_with_parent() -> None:
    """In the server's process before it starts: a SIGTERM when the replica's process dies,
    however it dies (Linux), so that no server outlives its replica."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


class LoraplexReplica:
    """One `loraplex serve` process, its gRPC calls forwarded."""

    def __init__(self, serve_args: list[str], max_adapters: int, registry: str) -> None:
        self.port, self.metrics_port = _free_port(), _free_port()
        self.target = f"127.0.0.1:{self.port}"
        # the server's output, for when it fails to start; kept after the replica ends
        self._log = tempfile.NamedTemporaryFile(  # noqa: SIM115
            prefix="loraplex-replica-", suffix=".log", delete=False
        )
        command = [sys.executable, "-m", "loraplex.server.cli", "serve", *serve_args,
                   "--host", "127.0.0.1", "--port", str(self.port),
                   "--metrics-port", str(self.metrics_port),
                   "--max-resident-adapters", str(max_adapters)]  # fmt: skip
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.process = subprocess.Popen(command, stdout=self._log, stderr=subprocess.STDOUT,
                                        env=env, preexec_fn=_end_with_parent)  # fmt: skip
        self._wait_until_serving()
        self.channel = grpc.aio.insecure_channel(self.target)
        self.stub = pb_grpc.LoraplexStub(self.channel)
        self.replica_id = serve.get_replica_context().replica_id.unique_id
        self.registry = Registry.named(registry)
        self.registry.add(self.replica_id, self.target, self.metrics_port)

        @serve.multiplexed(max_num_models_per_replica=max_adapters)
        async def note(adapter_id: str) -> str:
            return adapter_id  # loraplex's store loads it; Serve only learns that it is here

        self._note = note

    def _wait_until_serving(self) -> None:
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        deadline = time.monotonic() + START_TIMEOUT_S
        with grpc.insecure_channel(self.target) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    raise RuntimeError(f"loraplex serve exited at start; log: {self._log.name}")
                with contextlib.suppress(grpc.RpcError):
                    reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=1)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                time.sleep(0.25)
        raise RuntimeError(f"loraplex serve did not start in {START_TIMEOUT_S} s")

    async def _noted(self) -> None:
        adapter_id = serve.get_multiplexed_model_id()
        if adapter_id:
            await self._note(adapter_id)

    async def Generate(self, request: pb.GenerateRequest) -> pb.GenerateResponse:
        await self._noted()
        return await self.stub.Generate(request)

    async def GenerateStream(
        self, request: pb.GenerateStreamRequest
    ) -> AsyncIterator[pb.GenerateStreamResponse]:
        await self._noted()
        async for message in self.stub.GenerateStream(request):
            yield message

    async def call(self, method: str, request: Any) -> Any:
        """A unary call that any replica can answer (Tokenize, GetServerInfo)."""
        return await getattr(self.stub, method)(request)

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.registry.remove(self.replica_id)
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()


class Ingress:
    """Serve's gRPC proxy hands loraplex's calls here: generation goes to a replica chosen
    by adapter, adapter commands to every replica. Bearer tokens are checked here, since
    Serve's proxy checks none."""

    def __init__(self, replicas: Any, tokens: Mapping[str, Role], registry: str) -> None:
        self.replicas = replicas
        self.tokens = dict(tokens)
        self.registry = Registry.named(registry)

    def _check(self, grpc_context: Any, method: str) -> None:
        if not self.tokens:
            return
        metadata = dict(grpc_context.invocation_metadata())
        role = role_of(self.tokens, str(metadata.get("authorization", "")))
        needed = Role.ADMIN if method in ADMIN_METHODS else Role.GENERATE
        if role is None:
            grpc_context.set_code(grpc.StatusCode.UNAUTHENTICATED)
            raise PermissionError("a valid token is required: 'authorization: Bearer TOKEN'")
        if role < needed:
            grpc_context.set_code(grpc.StatusCode.PERMISSION_DENIED)
            raise PermissionError(f"{method} needs an admin token")

    def _to(self, adapter_id: str, stream: bool = False) -> Any:
        return self.replicas.options(multiplexed_model_id=adapter_id, stream=stream)

    async def Generate(self, request: pb.GenerateRequest, grpc_context: Any) -> Any:
        self._check(grpc_context, "Generate")
        with relayed(grpc_context):
            return await self._to(request.adapter_id).Generate.remote(request)

    async def GenerateStream(
        self, request: pb.GenerateStreamRequest, grpc_context: Any
    ) -> AsyncIterator[Any]:
        self._check(grpc_context, "GenerateStream")
        with relayed(grpc_context):
            async for message in self._to(request.adapter_id, True).GenerateStream.remote(request):
                yield message

    # ---- on every replica -----------------------------------------------------------------

    async def _each(self, method: str, request: Any, grpc_context: Any) -> list[Any]:
        """The replies of every replica that answered; the first error when none did."""
        self._check(grpc_context, method)

        async def call(target: str) -> Any:
            async with grpc.aio.insecure_channel(target) as channel:
                return await getattr(pb_grpc.LoraplexStub(channel), method)(request)

        targets = [t for t, _ in (await self.registry.replicas_async()).values()]
        replies = await asyncio.gather(*(call(t) for t in targets), return_exceptions=True)
        answered = [r for r in replies if not isinstance(r, BaseException)]
        if not answered:
            with relayed(grpc_context):
                raise replies[0] if replies else RuntimeError("the fleet has no replicas")
        return answered

    async def Tokenize(self, request: pb.TokenizeRequest, grpc_context: Any) -> Any:
        return await self._any("Tokenize", request, grpc_context)

    async def GetServerInfo(self, request: pb.GetServerInfoRequest, grpc_context: Any) -> Any:
        return await self._any("GetServerInfo", request, grpc_context)

    async def _any(self, method: str, request: Any, grpc_context: Any) -> Any:
        self._check(grpc_context, method)
        with relayed(grpc_context):
            return await self._to("").call.remote(method, request)

    async def ListAdapters(self, request: pb.ListAdaptersRequest, grpc_context: Any) -> Any:
        """Each adapter once: resident or pinned where any replica has it so, its uses
        summed."""
        merged: dict[str, pb.AdapterInfo] = {}
        for reply in await self._each("ListAdapters", request, grpc_context):
            for info in reply.adapters:
                seen = merged.setdefault(info.adapter_id, info)
                if seen is not info:
                    seen.resident |= info.resident
                    seen.pinned |= info.pinned
                    seen.in_use += info.in_use
        adapters = sorted(merged.values(), key=lambda a: a.adapter_id)
        return pb.ListAdaptersResponse(adapters=adapters)

    async def LoadAdapter(self, request: pb.LoadAdapterRequest, grpc_context: Any) -> Any:
        return (await self._each("LoadAdapter", request, grpc_context))[0]

    async def UnloadAdapter(self, request: pb.UnloadAdapterRequest, grpc_context: Any) -> Any:
        return (await self._each("UnloadAdapter", request, grpc_context))[0]

    async def PinAdapter(self, request: pb.PinAdapterRequest, grpc_context: Any) -> Any:
        return (await self._each("PinAdapter", request, grpc_context))[0]


@contextlib.contextmanager
def relayed(grpc_context: Any) -> Iterator[None]:
    """A replica's gRPC error keeps its status code on the way out of the ingress."""
    try:
        yield
    except Exception as err:
        cause = _rpc_error(err)
        if cause is not None:
            grpc_context.set_code(cause.code())
            grpc_context.set_details(cause.details() or "")
        raise


def _rpc_error(err: BaseException | None) -> grpc.aio.AioRpcError | None:
    """The loraplex server's error inside what Ray raised (Ray wraps it as the cause)."""
    while err is not None:
        if isinstance(err, grpc.aio.AioRpcError):
            return err
        err = err.__cause__ or getattr(err, "cause", None)
    return None
