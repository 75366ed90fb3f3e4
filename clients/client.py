"""Python clients for a loraplex server: `Client` (blocking) and `AsyncClient` (asyncio).

    with Client("127.0.0.1:50051") as client:
        print(client.generate("Hello", adapter="my-adapter", max_new_tokens=32).text)
        for chunk in client.stream("Hello"):
            print(chunk.text, end="")

Failed calls raise a subclass of `LoraplexClientError` (clients/errors.py).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import grpc.aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from loraplex.clients import messages
from loraplex.clients.errors import from_rpc_error
from loraplex.clients.messages import Adapter, Chunk, GenerateArgs, Generation
from loraplex.clients.security import Security, read_token
from loraplex.proto.v1 import loraplex_pb2 as pb
from loraplex.proto.v1 import loraplex_pb2_grpc as pb_grpc

DEFAULT_TARGET = "127.0.0.1:50051"


@dataclass(frozen=True)
class ServerInfo:
    model: str
    backend: str
    quantization: str
    max_context: int
    max_new_tokens_limit: int
    max_batch_sequences: int
    max_batch_tokens: int
    max_adapters_per_step: int
    max_queue: int
    chat_template: bool
    version: str
    running: int
    waiting: int

    @classmethod
    def from_message(cls, msg: pb.GetServerInfoResponse) -> ServerInfo:
        return cls(**{name: getattr(msg, name) for name in cls.__dataclass_fields__})


def _unload_request(
    adapter_id: str, wait: bool, timeout_s: float | None, force: bool
) -> pb.UnloadAdapterRequest:
    request = pb.UnloadAdapterRequest(adapter_id=adapter_id, no_wait=not wait, force=force)
    if timeout_s is not None:
        request.timeout_s = timeout_s
    return request


class _Collector:
    """Accumulates stream messages into chunks and the final Generation."""

    def __init__(self) -> None:
        self.text: list[str] = []
        self.token_ids: list[int] = []
        self.logprobs: list[float] = []
        self.top_logprobs: list[list[tuple[int, float]]] = []
        self.request_id: str | None = None  # the server sends it in the first message only
        self.result: Generation | None = None

    def add(self, msg: pb.GenerateStreamResponse) -> Chunk | None:
        if self.request_id is None:
            self.request_id = msg.request_id
        self.text.append(msg.text)
        self.token_ids.extend(msg.token_ids)
        self.logprobs.extend(msg.logprobs)
        top = messages.top_logprobs(msg.top_logprobs)
        self.top_logprobs.extend(top)
        if msg.finish_reason != pb.FINISH_REASON_UNSPECIFIED:
            self.result = messages.generation(
                msg, "".join(self.text), self.token_ids, self.logprobs, self.request_id,
                self.top_logprobs,
            )  # fmt: skip
        if msg.token_ids or msg.text:
            return Chunk(msg.text, list(msg.token_ids), list(msg.logprobs), top)
        return None


class GenerationStream:
    """Iterate for `Chunk`s; `result` holds the `Generation` once the stream has ended."""

    def __init__(self, call: Any) -> None:
        self._call = call
        self._collector = _Collector()

    @property
    def result(self) -> Generation | None:
        return self._collector.result

    def __iter__(self) -> Iterator[Chunk]:
        try:
            for msg in self._call:
                chunk = self._collector.add(msg)
                if chunk is not None:
                    yield chunk
        except grpc.RpcError as err:
            raise from_rpc_error(err) from None

    def cancel(self) -> None:
        self._call.cancel()


class Client:
    """Blocking client; `timeout` (seconds) is the default deadline of every call."""

    def __init__(
        self, target: str = DEFAULT_TARGET, timeout: float | None = None,
        security: Security | None = None,
    ) -> None:  # fmt: skip
        security = security or Security(token=read_token(None))
        self._channel = security.channel(target)
        self._metadata = security.metadata()
        self._stub = pb_grpc.LoraplexStub(self._channel)
        self.timeout = timeout

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def _call(self, method: str, request: object, timeout: float | None = None) -> Any:
        try:
            return getattr(self._stub, method)(
                request, timeout=timeout or self.timeout, metadata=self._metadata
            )
        except grpc.RpcError as err:
            raise from_rpc_error(err) from None

    def generate(
        self, prompt: str = "", *, timeout: float | None = None, **options: Any
    ) -> Generation:
        """Generate and wait; options are the fields of `GenerateArgs`."""
        args = GenerateArgs(prompt=prompt, **options)
        msg = self._call("Generate", pb.GenerateRequest(**messages.request_fields(args)), timeout)
        return messages.generation(
            msg, msg.text, list(msg.token_ids), list(msg.logprobs), msg.request_id,
            messages.top_logprobs(msg.top_logprobs),
        )  # fmt: skip

    def stream(
        self, prompt: str = "", *, timeout: float | None = None, **options: Any
    ) -> GenerationStream:
        """Generate, receiving tokens as they come; options are the fields of `GenerateArgs`."""
        args = GenerateArgs(prompt=prompt, **options)
        request = pb.GenerateStreamRequest(**messages.request_fields(args))
        return GenerationStream(
            self._stub.GenerateStream(
                request, timeout=timeout or self.timeout, metadata=self._metadata
            )
        )

    def tokenize(self, text: str) -> list[int]:
        return list(self._call("Tokenize", pb.TokenizeRequest(text=text)).token_ids)

    def server_info(self) -> ServerInfo:
        return ServerInfo.from_message(self._call("GetServerInfo", pb.GetServerInfoRequest()))

    def list_adapters(self) -> list[Adapter]:
        msg = self._call("ListAdapters", pb.ListAdaptersRequest())
        return [messages.adapter(a) for a in msg.adapters]

    def load_adapter(self, adapter_id: str) -> Adapter:
        msg = self._call("LoadAdapter", pb.LoadAdapterRequest(adapter_id=adapter_id))
        return messages.adapter(msg.adapter)

    def unload_adapter(
        self,
        adapter_id: str,
        wait: bool = True,
        timeout_s: float | None = None,
        force: bool = False,
    ) -> None:
        """`force` unloads a pinned adapter too; without it the server refuses one."""
        self._call("UnloadAdapter", _unload_request(adapter_id, wait, timeout_s, force))

    def pin_adapter(self, adapter_id: str, pinned: bool = True) -> Adapter:
        msg = self._call(
            "PinAdapter", pb.PinAdapterRequest(adapter_id=adapter_id, unpin=not pinned)
        )
        return messages.adapter(msg.adapter)

    def drain(self) -> int:
        """Ask the server to stop gracefully (admin); returns the requests it will finish first."""
        return int(self._call("Drain", pb.DrainRequest()).in_flight)

    def health(self, service: str = "") -> str:
        """The grpc.health.v1 status name, e.g. "SERVING"."""
        stub = health_pb2_grpc.HealthStub(self._channel)
        try:
            reply = stub.Check(
                health_pb2.HealthCheckRequest(service=service),
                timeout=self.timeout, metadata=self._metadata,
            )  # fmt: skip
        except grpc.RpcError as err:
            raise from_rpc_error(err) from None
        return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


class AsyncGenerationStream:
    """`async for` the `Chunk`s; `result` holds the `Generation` once the stream has ended."""

    def __init__(self, call: Any) -> None:
        self._call = call
        self._collector = _Collector()

    @property
    def result(self) -> Generation | None:
        return self._collector.result

    async def __aiter__(self) -> AsyncIterator[Chunk]:
        try:
            async for msg in self._call:
                chunk = self._collector.add(msg)
                if chunk is not None:
                    yield chunk
        except grpc.RpcError as err:
            raise from_rpc_error(err) from None

    def cancel(self) -> None:
        self._call.cancel()


class AsyncClient:
    """asyncio client with the same calls as `Client`."""

    def __init__(
        self, target: str = DEFAULT_TARGET, timeout: float | None = None,
        security: Security | None = None,
    ) -> None:  # fmt: skip
        security = security or Security(token=read_token(None))
        self._channel = security.aio_channel(target)
        self._metadata = security.metadata()
        self._stub = pb_grpc.LoraplexStub(self._channel)
        self.timeout = timeout

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close()

    async def _call(self, method: str, request: object, timeout: float | None = None) -> Any:
        try:
            return await getattr(self._stub, method)(
                request, timeout=timeout or self.timeout, metadata=self._metadata
            )
        except grpc.RpcError as err:
            raise from_rpc_error(err) from None

    async def generate(
        self, prompt: str = "", *, timeout: float | None = None, **options: Any
    ) -> Generation:
        args = GenerateArgs(prompt=prompt, **options)
        request = pb.GenerateRequest(**messages.request_fields(args))
        msg = await self._call("Generate", request, timeout)
        return messages.generation(
            msg, msg.text, list(msg.token_ids), list(msg.logprobs), msg.request_id,
            messages.top_logprobs(msg.top_logprobs),
        )  # fmt: skip

    def stream(
        self, prompt: str = "", *, timeout: float | None = None, **options: Any
    ) -> AsyncGenerationStream:
        args = GenerateArgs(prompt=prompt, **options)
        request = pb.GenerateStreamRequest(**messages.request_fields(args))
        call = self._stub.GenerateStream(
            request, timeout=timeout or self.timeout, metadata=self._metadata
        )
        return AsyncGenerationStream(call)

    async def tokenize(self, text: str) -> list[int]:
        return list((await self._call("Tokenize", pb.TokenizeRequest(text=text))).token_ids)

    async def server_info(self) -> ServerInfo:
        return ServerInfo.from_message(await self._call("GetServerInfo", pb.GetServerInfoRequest()))

    async def list_adapters(self) -> list[Adapter]:
        msg = await self._call("ListAdapters", pb.ListAdaptersRequest())
        return [messages.adapter(a) for a in msg.adapters]

    async def load_adapter(self, adapter_id: str) -> Adapter:
        msg = await self._call("LoadAdapter", pb.LoadAdapterRequest(adapter_id=adapter_id))
        return messages.adapter(msg.adapter)

    async def unload_adapter(
        self,
        adapter_id: str,
        wait: bool = True,
        timeout_s: float | None = None,
        force: bool = False,
    ) -> None:
        await self._call("UnloadAdapter", _unload_request(adapter_id, wait, timeout_s, force))

    async def pin_adapter(self, adapter_id: str, pinned: bool = True) -> Adapter:
        request = pb.PinAdapterRequest(adapter_id=adapter_id, unpin=not pinned)
        return messages.adapter((await self._call("PinAdapter", request)).adapter)

    async def drain(self) -> int:
        return int((await self._call("Drain", pb.DrainRequest())).in_flight)
