"""The fleet's Serve deployment: replicas that each supervise one unchanged `loraplex serve`
process on 127.0.0.1 and are themselves the application's ingress.

The engine needs its process's main thread and one OpenMP pool, so a replica forwards gRPC
calls to a server process of its own rather than hosting the engine in Ray's worker.
Serve's gRPC proxy hands each call straight to a replica: the affinity router reads the
request's `adapter_id` in the proxy (router.py), so no ingress hop sits between the proxy
and the replica that holds the adapter. Each replica notes the ids it has served in Serve's
multiplexing LRU, sized like its `--max-resident-adapters`, which tells Serve what it
holds, while loraplex's adapter store still decides what is loaded and evicted. Adapter
commands go from the replica that took them to every replica's server.
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

import aiohttp
import grpc
from ray import serve
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from loraplex.proto.v1 import loraplex_pb2 as pb
from loraplex.proto.v1 import loraplex_pb2_grpc as pb_grpc
from loraplex.server.auth import ADMIN_METHODS, HTTP_ROLES, Role, role_of
from loraplex.server.fleet import http_relay
from loraplex.server.fleet.http_relay import HttpRequest, ReplyHead
from loraplex.server.fleet.registry import Registry, ReplicaAddress
from loraplex.server.http_guard import error_response, refusal

APP = "loraplex"
DEPLOYMENT = "LoraplexReplica"
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
    """One `loraplex serve` process, its gRPC calls forwarded; bearer tokens are checked
    here, since Serve's proxy checks none."""

    def __init__(
        self, serve_args: list[str], max_adapters: int, tokens: Mapping[str, Role], registry: str,
        max_ingress: int,
    ) -> None:  # fmt: skip
        """`max_ingress`: OpenAI requests this replica takes in at once to route on (see
        `__call__`); fewer than Serve's `max_ongoing_requests`, so that routed ones always
        find room."""
        self.tokens = dict(tokens)
        self.max_ingress, self.ingress = max_ingress, 0
        self.port, self.metrics_port, http_port = _free_port(), _free_port(), _free_port()
        self.target, self.http_url = f"127.0.0.1:{self.port}", f"http://127.0.0.1:{http_port}"
        # the server's output, for when it fails to start; kept after the replica ends
        self._log = tempfile.NamedTemporaryFile(  # noqa: SIM115
            prefix="loraplex-replica-", suffix=".log", delete=False
        )
        command = [sys.executable, "-m", "loraplex.server.cli", "serve", *serve_args,
                   "--host", "127.0.0.1", "--port", str(self.port),
                   "--metrics-port", str(self.metrics_port), "--http-port", str(http_port),
                   "--max-resident-adapters", str(max_adapters)]  # fmt: skip
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        env.pop("OMP_NUM_THREADS", None)  # Ray's 1 for its workers; the server gets --threads
        self.process = subprocess.Popen(command, stdout=self._log, stderr=subprocess.STDOUT,
                                        env=env, preexec_fn=_end_with_parent)  # fmt: skip
        self._wait_until_serving()
        self.channel = grpc.aio.insecure_channel(self.target)
        self.stub = pb_grpc.LoraplexStub(self.channel)
        self.replica_id = serve.get_replica_context().replica_id.unique_id
        self.registry = Registry.named(registry)
        address = ReplicaAddress(self.target, self.http_url, self.metrics_port)
        self.registry.add(self.replica_id, address)
        self.base_model = ""  # the server's name for its base model, asked at the first use
        self._session: aiohttp.ClientSession | None = None  # made in the serving loop

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

    def _check(self, grpc_context: Any, method: str) -> None:
        if self.tokens:
            check_token(self.tokens, grpc_context, method)

    # ---- on this replica ------------------------------------------------------------------

    async def Generate(self, request: pb.GenerateRequest, grpc_context: Any) -> Any:
        self._check(grpc_context, "Generate")
        if request.adapter_id:
            await self._note(request.adapter_id)
        with relayed(grpc_context):
            return await self.stub.Generate(request)

    async def GenerateStream(
        self, request: pb.GenerateStreamRequest, grpc_context: Any
    ) -> AsyncIterator[Any]:
        self._check(grpc_context, "GenerateStream")
        if request.adapter_id:
            await self._note(request.adapter_id)
        with relayed(grpc_context):
            async for message in self.stub.GenerateStream(request):
                yield message

    async def Tokenize(self, request: pb.TokenizeRequest, grpc_context: Any) -> Any:
        self._check(grpc_context, "Tokenize")
        with relayed(grpc_context):
            return await self.stub.Tokenize(request)

    async def GetServerInfo(self, request: pb.GetServerInfoRequest, grpc_context: Any) -> Any:
        self._check(grpc_context, "GetServerInfo")
        with relayed(grpc_context):
            return await self.stub.GetServerInfo(request)

    # ---- on every replica -----------------------------------------------------------------

    async def _each(self, method: str, request: Any, grpc_context: Any) -> list[Any]:
        """The replies of every replica that answered; the first error when none did."""
        self._check(grpc_context, method)

        async def call(target: str) -> Any:
            if target == self.target:
                return await getattr(self.stub, method)(request)
            async with grpc.aio.insecure_channel(target) as channel:
                return await getattr(pb_grpc.LoraplexStub(channel), method)(request)

        targets = [r.grpc for r in (await self.registry.replicas_async()).values()]
        replies = await asyncio.gather(*(call(t) for t in targets), return_exceptions=True)
        answered = [r for r in replies if not isinstance(r, BaseException)]
        if not answered:
            with relayed(grpc_context):
                raise replies[0] if replies else RuntimeError("the fleet has no replicas")
        return answered

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

    # ---- the OpenAI HTTP API --------------------------------------------------------------

    async def __call__(self, request: Request) -> Response:
        refused = refusal(self.tokens, HTTP_ROLES, request.scope)
        if refused is not None:
            return refused
        query = f"?{request.url.query}" if request.url.query else ""
        http = HttpRequest(request.method, request.url.path + query,
                           http_relay.relayed_headers(request.headers.items()),
                           await request.body())  # fmt: skip
        if request.url.path in http_relay.EVERY_REPLICA_PATHS:
            return await self._http_everywhere(http)
        adapter = ""
        if request.url.path in http_relay.ROUTED_PATHS:
            adapter = http_relay.requested_model(http.body)
            adapter = "" if adapter == await self._base_model() else adapter
        if not adapter:
            reply: AsyncIterator[Any] = self.relay_http(http)
            head = await anext(reply)
            return StreamingResponse(reply, status_code=head.status, headers=dict(head.headers))
        return await self._route(http, adapter)

    async def _route(self, http: HttpRequest, adapter: str) -> Response:
        """Through Serve again, now that the router can see the adapter. The request holds
        one of this replica's Serve slots while it waits for the routed one, so only
        `max_ingress` may: were every slot held by such waiters, no routed request could
        start anywhere and none would ever finish. Past that, 503 (the openai SDK retries)."""
        if self.ingress >= self.max_ingress:
            busy = error_response(503, "server_error", "the fleet is at capacity; retry shortly")
            busy.headers["retry-after"] = "1"
            return busy
        self.ingress += 1
        try:
            handle = serve.get_deployment_handle(DEPLOYMENT, app_name=APP)
            streamed = handle.options(multiplexed_model_id=adapter, stream=True)
            reply: AsyncIterator[Any] = streamed.relay_http.remote(http)  # type: ignore
            head = await anext(reply)
        except BaseException:
            self.ingress -= 1
            raise
        body = self._released_at_end(reply)
        return StreamingResponse(body, status_code=head.status, headers=dict(head.headers))

    async def _released_at_end(self, reply: AsyncIterator[Any]) -> AsyncIterator[Any]:
        try:
            async for part in reply:
                yield part
        finally:
            self.ingress -= 1

    async def relay_http(self, request: HttpRequest) -> AsyncIterator[ReplyHead | bytes]:
        adapter_id = serve.get_multiplexed_model_id()
        if adapter_id:
            await self._note(adapter_id)
        async for part in http_relay.relay(self._http(), self.http_url, request):
            yield part

    async def _http_everywhere(self, request: HttpRequest) -> Response:
        """Every replica's server's reply; the first success is returned, else the first
        failure."""
        urls = [r.http for r in (await self.registry.replicas_async()).values()]
        replies = await asyncio.gather(*(http_relay.whole(self._http(), u, request)
                                         for u in urls), return_exceptions=True)  # fmt: skip
        answered = [r for r in replies if not isinstance(r, BaseException)]
        if not answered:
            failed = [r for r in replies if isinstance(r, BaseException)]
            raise failed[0] if failed else RuntimeError("the fleet has no replicas")
        head, body = min(answered, key=lambda r: r[0].status >= 400)
        return Response(body, status_code=head.status, headers=dict(head.headers))

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None))
        return self._session

    async def _base_model(self) -> str:
        if not self.base_model:
            self.base_model = (await self.stub.GetServerInfo(pb.GetServerInfoRequest())).model
        return self.base_model

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.registry.remove(self.replica_id)
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()


def check_token(tokens: Mapping[str, Role], grpc_context: Any, method: str) -> None:
    metadata = dict(grpc_context.invocation_metadata())
    role = role_of(tokens, str(metadata.get("authorization", "")))
    needed = Role.ADMIN if method in ADMIN_METHODS else Role.GENERATE
    if role is None:
        grpc_context.set_code(grpc.StatusCode.UNAUTHENTICATED)
        raise PermissionError("a valid token is required: 'authorization: Bearer TOKEN'")
    if role < needed:
        grpc_context.set_code(grpc.StatusCode.PERMISSION_DENIED)
        raise PermissionError(f"{method} needs an admin token")


@contextlib.contextmanager
def relayed(grpc_context: Any) -> Iterator[None]:
    """The server's gRPC error keeps its status code on the way out of the replica."""
    try:
        yield
    except grpc.aio.AioRpcError as err:
        grpc_context.set_code(err.code())
        grpc_context.set_details(err.details() or "")
        raise
