"""The OpenAI-compatible HTTP front end: /v1/completions, /v1/chat/completions (whole or as
server-sent events), /v1/models, vLLM's /v1/load_lora_adapter and /v1/unload_lora_adapter,
and /health. It takes the gRPC service's request path (server/frontend.py); a request's
`model` names an adapter id, or the base model.

Each generation runs on a thread of its own, as a gRPC handler does: it checks, tokenizes and
submits the request, then reads the request's events and hands them to the event loop. A
client that disconnects cancels its request, which frees its slot at the next step.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp

from loraplex.adapters.errors import AdapterError
from loraplex.adapters.paths import resolve_adapter_dir
from loraplex.server import convert
from loraplex.server.auth import HTTP_ROLES, Role
from loraplex.server.engine.api import TokenEvent
from loraplex.server.errors import Cancelled, InvalidRequest, LoraplexError
from loraplex.server.frontend import Frontend, Generation
from loraplex.server.http_guard import Guard, error_body, error_response
from loraplex.server.openai_responses import SSE_DONE, ChatShape, CompletionShape, Shape, sse
from loraplex.server.openai_schema import (
    OPENAI_FIELD,
    ChatRequest,
    CompletionRequest,
    chat_generations,
    completion_generations,
)
from loraplex.server.scheduler import RequestHandle

T = TypeVar("T")
_END = object()


class LoadLoraRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    lora_name: str
    lora_path: str | None = None  # only the adapter roots' folder of lora_name is accepted


class UnloadLoraRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    lora_name: str
    lora_int_id: int | None = None  # vLLM's clients may send it; names are the ids here
    force: bool = False  # unload a pinned adapter
    no_wait: bool = False  # refuse (409) while requests use it, rather than wait for them
    timeout_s: float | None = None  # how long to wait for them before a 409


Item = tuple[int, TokenEvent | None]  # a choice's index and event; None: that choice ended


class EventStream:
    """One request's choices (each prompt's, prompt after prompt): submitted on a thread of
    their own, each choice's events read on a thread of its own and handed to the event loop
    in arrival order."""

    def __init__(self, frontend: Frontend, generations: list[Generation]) -> None:
        self._loop = asyncio.get_running_loop()
        self._items: asyncio.Queue[Item | Exception] = asyncio.Queue()
        self.handles: list[RequestHandle] = []
        self._open = sum(g.choices for g in generations)
        self.ended = False
        self._cancelled = False
        thread = threading.Thread(target=self._submit, args=(frontend, generations), daemon=True)
        thread.start()

    def _submit(self, frontend: Frontend, generations: list[Generation]) -> None:
        try:
            for generation in generations:
                self.handles += frontend.submit_choices(generation)
        except Exception as err:
            for handle in self.handles:  # all the prompts run, or none
                handle.cancel()
            self._put(err)
            return
        if self._cancelled:  # the client left while the request was being submitted
            self.cancel()
        for index, handle in enumerate(self.handles[1:], start=1):
            threading.Thread(target=self._read, args=(index, handle), daemon=True).start()
        self._read(0, self.handles[0])

    def _read(self, index: int, handle: RequestHandle) -> None:
        try:
            for event in handle.events():
                self._put((index, event))
            if handle.cancelled:
                raise Cancelled("the client disconnected")
            self._put((index, None))
        except Exception as err:
            self._put(err)

    def _put(self, item: Item | Exception) -> None:
        with contextlib.suppress(RuntimeError):  # a closed event loop: the server stopped
            self._loop.call_soon_threadsafe(self._items.put_nowait, item)

    async def next(self) -> Item | None:
        """The next event of any choice, None once every choice has ended; raises the first
        error of any choice (and cancels the others)."""
        if not self._open:
            self.ended = True
            return None
        item = await self._items.get()
        if isinstance(item, Exception):
            self.ended = True
            self.cancel()
            raise item
        self._open -= item[1] is None
        return item

    def cancel(self) -> None:
        self._cancelled = True
        for handle in self.handles:
            handle.cancel()


class OpenAIApi:
    def __init__(self, frontend: Frontend, adapter_roots: list[Path]) -> None:
        self.frontend = frontend
        self.adapter_roots = adapter_roots
        self.created = int(time.time())

    @property
    def base_name(self) -> str:
        return self.frontend.description.model

    def adapter_for(self, model: str) -> str:
        """The adapter id a request's `model` names; "" for the base, whose name wins."""
        if model in ("", self.base_name):
            return ""
        return convert.check_adapter_id(model, field="model")

    def card(self, model_id: str, parent: str | None) -> dict[str, Any]:
        return {"id": model_id, "object": "model", "created": self.created,
                "owned_by": "loraplex", "root": model_id, "parent": parent}  # fmt: skip

    async def models(self) -> dict[str, Any]:
        adapters = self.frontend.adapters
        listed = await run_in_threadpool(adapters.list) if adapters is not None else []
        cards = [self.card(a.adapter_id, self.base_name) for a in listed]
        return {"object": "list", "data": [self.card(self.base_name, None), *cards]}

    # ---- generation ---------------------------------------------------------------------

    async def completions(self, body: CompletionRequest, request: Request) -> Response:
        return await self._openai(body, request, completion_generations, CompletionShape)

    async def chat(self, body: ChatRequest, request: Request) -> Response:
        return await self._openai(body, request, chat_generations, ChatShape)

    async def _openai(
        self, body: Any, request: Request,
        to_generations: Callable[[Any, str, int], list[Generation]], shape: type[Shape],
    ) -> Response:  # fmt: skip
        def build() -> tuple[list[Generation], Shape]:
            limit = self.frontend.description.max_new_tokens_limit
            generations = to_generations(body, self.adapter_for(body.model), limit)
            usage, decode = _usage_chunks(body), self.frontend.engine.decode
            first = generations[0]
            return generations, shape(body.model, first.sampling, decode, first.choices, usage)

        return await self._generate(build, body.model, body.stream, request)

    async def _generate(
        self, build: Callable[[], tuple[list[Generation], Shape]], model: str, stream: bool,
        request: Request,
    ) -> Response:  # fmt: skip
        """Run the request `build` makes, counting its outcome (by `model`'s adapter id) as
        the gRPC service counts its requests."""
        adapter_label = "" if model in ("", self.base_name) else model  # the base is ""
        count = functools.partial(self.frontend.count, adapter_label)
        try:
            generations, shape = build()
            events = EventStream(self.frontend, generations)
            # Errors known before the first token (an unknown adapter, a full queue) get
            # their own HTTP status, so a stream too waits for its first event.
            first = await until_disconnect(request, events.next(), events)
            if stream:
                chunks = sse_chunks(events, first, shape, count)
                return StreamingResponse(chunks, media_type="text/event-stream")
            items = [first, *await until_disconnect(request, rest(events), events)]
        except InvalidRequest as err:
            count(err)
            raise InvalidRequest(OPENAI_FIELD.get(err.field, err.field), err.problem) from None
        except BaseException as err:
            count(err)
            raise
        count(None)
        outputs: list[list[TokenEvent]] = [[] for _ in events.handles]
        for index, event in filter(None, items):
            if event is not None:
                outputs[index].append(event)
        return JSONResponse(shape.whole(outputs, events.handles))

    # ---- adapters -----------------------------------------------------------------------

    async def load_lora(self, body: LoadLoraRequest) -> dict[str, Any]:
        adapter_id = convert.check_adapter_id(body.lora_name, field="lora_name")
        if body.lora_path is not None:
            await run_in_threadpool(self._check_lora_path, adapter_id, body.lora_path)
        info, load_s = await run_in_threadpool(self.frontend.load_adapter, adapter_id)
        return {"object": "lora_adapter", "id": info.adapter_id, "version": info.version,
                "path": info.path, "load_s": load_s}  # fmt: skip

    def _check_lora_path(self, adapter_id: str, lora_path: str) -> None:
        roots = ", ".join(str(r) for r in self.adapter_roots)
        refusal = f"adapters load by id from the adapter roots ({roots}); leave lora_path out"
        try:
            folder = resolve_adapter_dir(adapter_id, self.adapter_roots)
        except AdapterError:
            raise InvalidRequest("lora_path", refusal) from None
        if Path(lora_path).resolve() != folder:
            raise InvalidRequest("lora_path", refusal)

    async def unload_lora(self, body: UnloadLoraRequest) -> dict[str, Any]:
        adapter_id = convert.check_adapter_id(body.lora_name, field="lora_name")
        unload = self.frontend.unload_adapter
        await run_in_threadpool(unload, adapter_id, body.force, body.no_wait, body.timeout_s)
        return {"object": "lora_adapter", "id": adapter_id, "deleted": True}

    def health(self) -> Response:
        serving = self.frontend.scheduler.admitting
        status = "serving" if serving else "draining"
        return JSONResponse({"status": status}, status_code=200 if serving else 503)


def _usage_chunks(body: CompletionRequest | ChatRequest) -> bool:
    if body.stream_options is not None and not body.stream:
        raise InvalidRequest("stream_options", "only goes with stream: true")
    return bool(body.stream_options and body.stream_options.include_usage)


async def until_disconnect(request: Request, work: Awaitable[T], events: EventStream) -> T:
    """`work`'s result; a client that hangs up first cancels the request."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnected(request))
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if task not in done:
        events.cancel()
        task.cancel()
        raise Cancelled("the client disconnected")
    return task.result()


async def _disconnected(request: Request) -> None:
    # The body has been read, so what the connection says next is that it closed.
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def rest(events: EventStream) -> list[Item]:
    items = []
    while (item := await events.next()) is not None:
        items.append(item)
    return items


async def sse_chunks(
    events: EventStream,
    first: Item | None,
    shape: Shape,
    count: Callable[[BaseException | None], None],
) -> AsyncIterator[bytes]:
    """The stream's chunks; Starlette cancels this when the client disconnects."""
    error: BaseException | None = None
    try:
        for index in range(len(events.handles)):
            for chunk in shape.opening(index):
                yield chunk
        item = first
        while item is not None:
            index, event = item
            if event is None:
                yield shape.closing(index, events.handles[index])
            else:
                yield shape.token_chunk(index, event)
            item = await events.next()
        if shape.include_usage:
            yield shape.usage_chunk(events.handles)
        yield SSE_DONE
    except Exception as err:  # the 200 is out: the error goes in the stream, as vLLM sends it
        error = err
        yield sse(error_body(err)[1])
    except BaseException as err:  # cancelled: the client left
        error = err
        raise
    finally:
        if not events.ended:
            events.cancel()
        count(error)


def build_app(api: OpenAIApi, tokens: Mapping[str, Role], max_body_bytes: int) -> ASGIApp:
    app = FastAPI(title="loraplex", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_api_route("/v1/completions", api.completions, methods=["POST"])
    app.add_api_route("/v1/chat/completions", api.chat, methods=["POST"])
    app.add_api_route("/v1/models", api.models, methods=["GET"])
    app.add_api_route("/v1/load_lora_adapter", api.load_lora, methods=["POST"])
    app.add_api_route("/v1/unload_lora_adapter", api.unload_lora, methods=["POST"])
    app.add_api_route("/health", api.health, methods=["GET"])
    app.add_exception_handler(LoraplexError, _typed_error)
    app.add_exception_handler(AdapterError, _typed_error)
    app.add_exception_handler(RequestValidationError, _invalid_body)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(Exception, _typed_error)  # a 500 in OpenAI's shape, logged
    return Guard(app, tokens, HTTP_ROLES, max_body_bytes)


async def _typed_error(request: Request, err: Exception) -> Response:
    status, body = error_body(err)
    return JSONResponse(body, status_code=status)


async def _invalid_body(request: Request, err: Exception) -> Response:
    assert isinstance(err, RequestValidationError)
    first = err.errors()[0]
    where = [str(part) for part in first.get("loc", ()) if part != "body"]
    param = ".".join(where) or None
    if first.get("type") == "json_invalid":
        param, message = None, f"the body is not valid JSON: {first.get('msg')}"
    elif param is None:
        message = f"the body must be a JSON object: {first.get('msg')}"
    elif first.get("type") == "extra_forbidden":
        message = f"{param}: unknown field; this server does not take it"
    else:
        message = f"{param}: {first.get('msg')}"
    return error_response(400, "invalid_request_error", message, param=param)


async def _http_error(request: Request, err: Exception) -> Response:
    assert isinstance(err, HTTPException)
    kind = "not_found_error" if err.status_code == 404 else "invalid_request_error"
    return error_response(err.status_code, kind, str(err.detail))
