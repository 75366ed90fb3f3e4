"""The gRPC servicer: wire messages in, scheduler and adapter store calls, wire messages out.

A handler thread validates and tokenizes a request, submits it to the scheduler's loop and
reads the request's events; adapter loads, pins and unloads run on the loop as commands. What
the HTTP front end does the same way lives in server/frontend.py.

Every RPC runs inside `_guard`, which turns typed errors into status codes (server/status.py)
and any other exception into INTERNAL, so no request can take the server down. Requests are
parsed by `_parser`, which reports unparsable bytes (such as invalid UTF-8 in a string field)
as INVALID_ARGUMENT instead of grpc's generic deserialization failure.
"""

from __future__ import annotations

import functools
import inspect
import itertools
import logging
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import grpc
from google.protobuf.message import DecodeError, Message

from loraplex.proto.v1 import loraplex_pb2 as pb
from loraplex.server import convert
from loraplex.server.engine.api import FinishReason, TokenEvent
from loraplex.server.errors import Cancelled, InvalidRequest
from loraplex.server.frontend import Frontend, Generation
from loraplex.server.scheduler import RequestHandle
from loraplex.server.status import status_for

log = logging.getLogger(__name__)
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Loraplex"].full_name
F = TypeVar("F", bound=Callable[..., Any])


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
    def __init__(self, frontend: Frontend, on_drain: Callable[[], int] | None = None) -> None:
        """`on_drain` starts draining the server and returns the requests in flight."""
        self.frontend = frontend
        self.on_drain = on_drain

    # ---- generation ----------------------------------------------------------------

    @_guard
    def Generate(self, request: pb.GenerateRequest, context: grpc.ServicerContext) -> Message:
        with self.frontend.counted(request.adapter_id):
            handle = self._submit(request, context)
            token_ids: list[int] = []
            logprobs: list[float] = []
            top: list[pb.TopLogprobs] = []
            text: list[str] = []
            for event in handle.events():
                token_ids.extend(_token_ids(event))
                logprobs.extend(_logprobs(event))
                top.extend(convert.top_logprobs_to_proto(event))
                text.append(event.text)
            _check_not_cancelled(handle)
            return pb.GenerateResponse(
                text="".join(text),
                token_ids=token_ids,
                logprobs=logprobs,
                top_logprobs=top,
                request_id=request.request_id,
                **self._final_fields(handle, request),
            )

    @_guard
    def GenerateStream(
        self, request: pb.GenerateStreamRequest, context: grpc.ServicerContext
    ) -> Iterator[Message]:
        with self.frontend.counted(request.adapter_id):
            handle = self._submit(request, context)
            # The id goes in the first message only: repeating it in every token message
            # multiplied its size by the number of tokens.
            request_ids = itertools.chain([request.request_id], itertools.repeat(""))
            for event in handle.events():
                yield pb.GenerateStreamResponse(
                    text=event.text,
                    token_ids=_token_ids(event),
                    logprobs=_logprobs(event),
                    top_logprobs=convert.top_logprobs_to_proto(event),
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
        limit = self.frontend.description.max_new_tokens_limit
        remaining = context.time_remaining()
        scheduler = self.frontend.scheduler
        handle = self.frontend.submit(
            Generation(
                sampling=convert.sampling_from_proto(request.sampling, limit),
                prompt=request.prompt,
                messages=convert.chat_messages(request),
                adapter_id=request.adapter_id,
                adapter_scale=convert.adapter_scale(request),
                deadline=None if remaining is None else scheduler.clock() + remaining,
            )
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

    # ---- model -----------------------------------------------------------------------

    @_guard
    def Tokenize(self, request: pb.TokenizeRequest, context: grpc.ServicerContext) -> Message:
        max_chars = self.frontend.description.max_prompt_chars
        convert.check_text_size("text", request.text, max_chars)
        return pb.TokenizeResponse(token_ids=self.frontend.engine.encode(request.text))

    @_guard
    def GetServerInfo(
        self, request: pb.GetServerInfoRequest, context: grpc.ServicerContext
    ) -> Message:
        f = self.frontend
        d, limits = f.description, f.scheduler.limits
        running, waiting = f.scheduler.counts()
        return pb.GetServerInfoResponse(
            model=d.model,
            backend=d.backend,
            quantization=d.quantization,
            max_context=f.engine.max_context,
            max_new_tokens_limit=d.max_new_tokens_limit,
            max_batch_sequences=limits.max_batch_sequences,
            max_batch_tokens=limits.max_batch_tokens,
            max_adapters_per_step=limits.max_adapters_per_step,
            max_queue=limits.max_queue,
            chat_template=f.chat is not None,
            version=d.version,
            running=running,
            waiting=waiting,
        )

    # ---- adapters ----------------------------------------------------------------------

    @_guard
    def ListAdapters(
        self, request: pb.ListAdaptersRequest, context: grpc.ServicerContext
    ) -> Message:
        adapters = self.frontend.store().list()
        return pb.ListAdaptersResponse(adapters=[convert.adapter_to_proto(a) for a in adapters])

    @_guard
    def LoadAdapter(self, request: pb.LoadAdapterRequest, context: grpc.ServicerContext) -> Message:
        adapter_id = convert.check_adapter_id(request.adapter_id)
        info, load_s = self.frontend.load_adapter(adapter_id)
        return pb.LoadAdapterResponse(adapter=convert.adapter_to_proto(info), load_s=load_s)

    @_guard
    def UnloadAdapter(
        self, request: pb.UnloadAdapterRequest, context: grpc.ServicerContext
    ) -> Message:
        adapter_id = convert.check_adapter_id(request.adapter_id)
        timeout = request.timeout_s if request.HasField("timeout_s") else None
        self.frontend.unload_adapter(adapter_id, request.force, request.no_wait, timeout)
        return pb.UnloadAdapterResponse()

    @_guard
    def PinAdapter(self, request: pb.PinAdapterRequest, context: grpc.ServicerContext) -> Message:
        adapter_id = convert.check_adapter_id(request.adapter_id)
        info = self.frontend.pin_adapter(adapter_id, pinned=not request.unpin)
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
