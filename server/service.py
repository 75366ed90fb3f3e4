"""The gRPC servicer: wire messages in, scheduler and adapter store calls, wire messages out.

A handler thread validates and tokenizes a request, submits it to the scheduler's loop and
reads the request's events; adapter loads, pins and unloads run on the loop as commands.

Every RPC runs inside `_guard`, which turns typed errors into status codes (server/status.py)
and any other exception into INTERNAL, so no request can take the server down. Requests are
parsed by `_parser`, which reports unparsable bytes (such as invalid UTF-8 in a string field)
as INVALID_ARGUMENT instead of grpc's generic deserialization failure.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import itertools
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
from google.protobuf.message import DecodeError, Message

from loraplex.proto.v1 import loraplex_pb2 as pb
from loraplex.server import convert
from loraplex.server.engine.api import AdapterAdmin, Engine, FinishReason, TokenEvent
from loraplex.server.errors import Cancelled, InvalidRequest
from loraplex.server.metrics import Metrics
from loraplex.server.scheduler import RequestHandle, Scheduler, Submission
from loraplex.server.status import status_for

log = logging.getLogger(__name__)
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Loraplex"].full_name
F = TypeVar("F", bound=Callable[..., Any])


@dataclass(frozen=True)
class ServerDescription:
    """Static facts GetServerInfo reports."""

    model: str
    backend: str
    quantization: str
    max_new_tokens_limit: int
    version: str
    max_prompt_chars: int = 1 << 20


class Unparsable:
    """Stands in for a request whose bytes did not parse."""

    def __init__(self, problem: str) -> None:
        self.problem = problem


def _parser(message_cls: type[Message]) -> Callable[[bytes], Message | Unparsable]:
    def parse(data: bytes) -> Message | Unparsable:
        try:
            return message_cls.FromString(data)
        except DecodeError as err:
            return Unparsable(f"{err}; every string field must be valid UTF-8")

    return parse


def _abort(context: grpc.ServicerContext, err: BaseException) -> None:
    code = status_for(err)
    if code is None:
        log.exception("unexpected error while serving a request", exc_info=err)
        code, err = grpc.StatusCode.INTERNAL, RuntimeError(f"internal error: {err!r}")
    context.abort(code, str(err))


def _guard(method: F) -> F:
    """Map errors to status codes; works for unary methods and streaming generators."""

    def check(request: object) -> None:
        if isinstance(request, Unparsable):
            raise InvalidRequest("request", request.problem)

    @functools.wraps(method)
    def unary(self: LoraplexService, request: object, context: grpc.ServicerContext) -> Any:
        try:
            check(request)
            return method(self, request, context)
        except Exception as err:
            _abort(context, err)

    @functools.wraps(method)
    def stream(self: LoraplexService, request: object, context: grpc.ServicerContext) -> Any:
        try:
            check(request)
            yield from method(self, request, context)
        except Exception as err:
            _abort(context, err)

    return stream if inspect.isgeneratorfunction(method) else unary  # type: ignore[return-value]


def _check_not_cancelled(handle: RequestHandle) -> None:
    if handle.finish_reason is FinishReason.CANCELLED:
        raise Cancelled("the request was cancelled before it finished")


def _token_ids(event: TokenEvent) -> list[int]:
    return [] if event.token_id is None else [event.token_id]


def _logprobs(event: TokenEvent) -> list[float]:
    """The chosen token's log-probability, when the request asked for it."""
    return [] if event.token_id is None or event.logprob is None else [event.logprob]


class LoraplexService:
    def __init__(
        self,
        scheduler: Scheduler,
        engine: Engine,
        adapters: AdapterAdmin | None,
        description: ServerDescription,
        metrics: Metrics | None = None,
        chat: convert.ChatTemplating | None = None,
        on_drain: Callable[[], int] | None = None,
    ) -> None:
        """`on_drain` starts draining the server and returns the requests in flight."""
        self.chat = chat
        self.scheduler = scheduler
        self.engine = engine
        self.adapters = adapters
        self.description = description
        self.metrics = metrics
        self.on_drain = on_drain

    # ---- generation ----------------------------------------------------------------

    @_guard
    def Generate(self, request: pb.GenerateRequest, context: grpc.ServicerContext) -> Message:
        with self._counted(request.adapter_id):
            handle = self._submit(request, context)
            token_ids: list[int] = []
            logprobs: list[float] = []
            text: list[str] = []
            for event in handle.events():
                token_ids.extend(_token_ids(event))
                logprobs.extend(_logprobs(event))
                text.append(event.text)
            _check_not_cancelled(handle)
            return pb.GenerateResponse(
                text="".join(text),
                token_ids=token_ids,
                logprobs=logprobs,
                request_id=request.request_id,
                **self._final_fields(handle, request),
            )

    @_guard
    def GenerateStream(
        self, request: pb.GenerateStreamRequest, context: grpc.ServicerContext
    ) -> Iterator[Message]:
        with self._counted(request.adapter_id):
            handle = self._submit(request, context)
            # The id goes in the first message only: repeating it in every token message
            # multiplied its size by the number of tokens.
            request_ids = itertools.chain([request.request_id], itertools.repeat(""))
            for event in handle.events():
                yield pb.GenerateStreamResponse(
                    text=event.text,
                    token_ids=_token_ids(event),
                    logprobs=_logprobs(event),
                    request_id=next(request_ids),
                )
            _check_not_cancelled(handle)
            yield pb.GenerateStreamResponse(
                request_id=next(request_ids), **self._final_fields(handle, request)
            )

    def _submit(
        self, request: convert.GenerationRequest, context: grpc.ServicerContext
    ) -> RequestHandle:
        convert.check_request_id(request.request_id)
        if request.adapter_id:
            convert.check_adapter_id(request.adapter_id)
        convert.check_prompt_size(request, self.description.max_prompt_chars)
        limit = self.description.max_new_tokens_limit
        sampling = convert.sampling_from_proto(request.sampling, limit)
        scale = convert.adapter_scale(request)
        text = convert.prompt_text(request, self.chat)
        ids = convert.prompt_ids(text, self.engine.encode, self.engine.max_context)
        remaining = context.time_remaining()
        deadline = None if remaining is None else self.scheduler.clock() + remaining
        handle = self.scheduler.submit(
            Submission(ids, sampling, request.adapter_id, scale, deadline)
        )
        # Runs when the RPC ends for any reason: a cancelled or expired call frees its slot.
        # False means the call already ended while the request was being queued.
        if not context.add_callback(handle.cancel):
            handle.cancel()
        return handle

    def _final_fields(self, handle: RequestHandle, request: convert.GenerationRequest) -> dict:
        return {
            "finish_reason": convert.finish_to_proto(handle.finish_reason),
            "usage": pb.Usage(
                prompt_tokens=handle.prompt_tokens, completion_tokens=handle.completion_tokens
            ),
            "timings": convert.timings_to_proto(handle.timings),
            "adapter_id": request.adapter_id,
            "adapter_version": handle.adapter_version,
        }

    @contextlib.contextmanager
    def _counted(self, adapter_id: str) -> Iterator[None]:
        """Count the request by adapter and final status code."""
        code = grpc.StatusCode.OK
        try:
            yield
        except BaseException as err:
            code = status_for(err) or grpc.StatusCode.INTERNAL
            if isinstance(err, GeneratorExit):
                code = grpc.StatusCode.CANCELLED
            raise
        finally:
            if self.metrics is not None:
                refused = code in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT)
                self.metrics.request_done(adapter_id, code.name, known=not refused)

    # ---- model -----------------------------------------------------------------------

    @_guard
    def Tokenize(self, request: pb.TokenizeRequest, context: grpc.ServicerContext) -> Message:
        convert.check_text_size("text", request.text, self.description.max_prompt_chars)
        return pb.TokenizeResponse(token_ids=self.engine.encode(request.text))

    @_guard
    def GetServerInfo(
        self, request: pb.GetServerInfoRequest, context: grpc.ServicerContext
    ) -> Message:
        d, limits = self.description, self.scheduler.limits
        running, waiting = self.scheduler.counts()
        return pb.GetServerInfoResponse(
            model=d.model,
            backend=d.backend,
            quantization=d.quantization,
            max_context=self.engine.max_context,
            max_new_tokens_limit=d.max_new_tokens_limit,
            max_batch_sequences=limits.max_batch_sequences,
            max_batch_tokens=limits.max_batch_tokens,
            max_adapters_per_step=limits.max_adapters_per_step,
            max_queue=limits.max_queue,
            chat_template=self.chat is not None,
            version=d.version,
            running=running,
            waiting=waiting,
        )

    # ---- adapters ----------------------------------------------------------------------

    def _store(self) -> AdapterAdmin:
        if self.adapters is None:
            raise InvalidRequest("adapter_id", "this server runs without an adapter store")
        return self.adapters

    @_guard
    def ListAdapters(
        self, request: pb.ListAdaptersRequest, context: grpc.ServicerContext
    ) -> Message:
        adapters = self._store().list()
        return pb.ListAdaptersResponse(adapters=[convert.adapter_to_proto(a) for a in adapters])

    @_guard
    def LoadAdapter(self, request: pb.LoadAdapterRequest, context: grpc.ServicerContext) -> Message:
        adapter_id = convert.check_adapter_id(request.adapter_id)
        store, started = self._store(), time.perf_counter()
        info = self.scheduler.call(lambda: store.load(adapter_id))
        load_s = time.perf_counter() - started
        return pb.LoadAdapterResponse(adapter=convert.adapter_to_proto(info), load_s=load_s)

    @_guard
    def UnloadAdapter(
        self, request: pb.UnloadAdapterRequest, context: grpc.ServicerContext
    ) -> Message:
        adapter_id = convert.check_adapter_id(request.adapter_id)
        timeout = request.timeout_s if request.HasField("timeout_s") else None
        if timeout is not None and not timeout >= 0:
            raise InvalidRequest("timeout_s", f"must be >= 0 seconds, got {timeout}")
        store, force, no_wait = self._store(), request.force, request.no_wait
        self.scheduler.call(lambda: store.detach(adapter_id, force=force, if_unused=no_wait))
        if not no_wait:
            store.wait_unused(adapter_id, timeout)
        return pb.UnloadAdapterResponse()

    @_guard
    def PinAdapter(self, request: pb.PinAdapterRequest, context: grpc.ServicerContext) -> Message:
        adapter_id = convert.check_adapter_id(request.adapter_id)
        store, pinned = self._store(), not request.unpin
        info = self.scheduler.call(lambda: store.pin(adapter_id, pinned=pinned))
        return pb.PinAdapterResponse(adapter=convert.adapter_to_proto(info))

    # ---- lifecycle -----------------------------------------------------------------------

    @_guard
    def Drain(self, request: pb.DrainRequest, context: grpc.ServicerContext) -> Message:
        if self.on_drain is None:
            raise InvalidRequest("drain", "this server cannot be drained over gRPC")
        return pb.DrainResponse(in_flight=self.on_drain())

    # ---- registration --------------------------------------------------------------------

    def handler(self) -> grpc.GenericRpcHandler:
        """The service's method handlers, parsing requests with `_parser`."""
        methods = pb.DESCRIPTOR.services_by_name["Loraplex"].methods
        handlers: dict[str, grpc.RpcMethodHandler] = {}
        for method in methods:
            request_cls = getattr(pb, method.input_type.name)
            response_cls = getattr(pb, method.output_type.name)
            make = (
                grpc.unary_stream_rpc_method_handler
                if method.server_streaming
                else grpc.unary_unary_rpc_method_handler
            )
            handlers[method.name] = make(
                getattr(self, method.name),
                request_deserializer=_parser(request_cls),
                response_serializer=response_cls.SerializeToString,
            )
        return grpc.method_handlers_generic_handler(SERVICE_NAME, handlers)
