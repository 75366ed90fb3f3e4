"""What the two front ends (gRPC in service.py, OpenAI-compatible HTTP in openai_api.py)
share: a generation request as plain data, checked, tokenized and submitted to the scheduler,
and the adapter commands, which run on the scheduler's loop.

Both front ends call these from their own handler threads; nothing here touches the engine
beyond `encode`, which is thread-safe.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import grpc

from loraplex.server import convert
from loraplex.server.engine.api import AdapterAdmin, AdapterInfo, Engine, SamplingParams
from loraplex.server.errors import InvalidRequest
from loraplex.server.metrics import Metrics
from loraplex.server.scheduler import RequestHandle, Scheduler, Submission
from loraplex.server.status import status_for

if TYPE_CHECKING:
    from loraplex.adapters.sources import AdapterSources

SEEDS = 1 << 64  # seeds are uint64 on the wire


@dataclass(frozen=True)
class ServerDescription:
    """Static facts GetServerInfo and /v1/models report."""

    model: str
    backend: str
    quantization: str
    max_new_tokens_limit: int
    version: str
    max_prompt_chars: int = 1 << 20


@dataclass(frozen=True)
class Generation:
    """A generation request as either front end parsed it; `sampling` is already validated."""

    sampling: SamplingParams
    prompt: str = ""
    messages: list[dict[str, str]] = field(default_factory=list)  # chat: role and content
    prompt_ids: list[int] | None = None  # a prompt given as token ids, instead of text
    adapter_id: str = ""  # "" is the base model
    adapter_scale: float = 1.0
    deadline: float | None = None  # on the scheduler's clock
    choices: int = 1  # independent outputs for the one prompt (OpenAI's `n`)


class Frontend:
    def __init__(
        self,
        scheduler: Scheduler,
        engine: Engine,
        adapters: AdapterAdmin | None,
        description: ServerDescription,
        chat: convert.ChatTemplating | None = None,
        metrics: Metrics | None = None,
        sources: AdapterSources | None = None,
    ) -> None:
        """`sources` downloads remote adapters (hub ids, URLs) on the caller's thread before
        a request or command reaches the loop, so no download ever holds up a step."""
        self.scheduler = scheduler
        self.sources = sources
        self.engine = engine
        self.adapters = adapters
        self.description = description
        self.chat = chat
        self.metrics = metrics

    def submit(self, request: Generation) -> RequestHandle:
        """Check and tokenize the prompt, then queue the request on the scheduler's loop."""
        return self.submit_choices(replace(request, choices=1))[0]

    def submit_choices(self, request: Generation) -> list[RequestHandle]:
        """`submit` for each of the request's choices, the prompt tokenized once; a seeded
        request's choice i draws with seed + i. All are queued, or none."""
        if request.adapter_id:
            self.fetch(convert.check_adapter_id(request.adapter_id))
        convert.check_prompt_size(
            request.prompt, request.messages, self.description.max_prompt_chars
        )
        ids = request.prompt_ids
        if ids is None:
            text = convert.prompt_text(request.prompt, request.messages, self.chat)
            ids = convert.prompt_ids(text, self.engine.encode, self.engine.max_context)
        self.engine.check_input(ids, request.sampling)
        handles: list[RequestHandle] = []
        try:
            for i in range(request.choices):
                sampling = _choice_sampling(request.sampling, i)
                handles.append(self.scheduler.submit(Submission(
                    ids, sampling, request.adapter_id, request.adapter_scale, request.deadline
                )))  # fmt: skip
        except BaseException:
            for handle in handles:
                handle.cancel()
            raise
        return handles

    @contextlib.contextmanager
    def counted(self, adapter_id: str) -> Iterator[None]:
        """Count the request by adapter and final status."""
        try:
            yield
        except BaseException as err:
            self.count(adapter_id, err)
            raise
        self.count(adapter_id, None)

    def count(self, adapter_id: str, error: BaseException | None) -> None:
        """Count a request that ended with `error` (None: OK), by gRPC status code name, so
        both front ends share the series."""
        if self.metrics is None:
            return
        code = grpc.StatusCode.OK
        if isinstance(error, GeneratorExit | asyncio.CancelledError):  # the client left
            code = grpc.StatusCode.CANCELLED
        elif error is not None:
            code = status_for(error) or grpc.StatusCode.INTERNAL
        refused = code in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT)
        self.metrics.request_done(adapter_id, code.name, known=not refused)

    # ---- adapters: commands run on the loop, between steps -----------------------------

    def store(self) -> AdapterAdmin:
        if self.adapters is None:
            raise InvalidRequest("adapter_id", "this server runs without an adapter store")
        return self.adapters

    def fetch(self, adapter_id: str, refresh: bool = False) -> None:
        """Download a remote adapter unless the cache holds it (`refresh`: again)."""
        if self.sources is not None:
            self.sources.fetch(adapter_id, refresh=refresh)

    def load_adapter(self, adapter_id: str) -> tuple[AdapterInfo, float]:
        """The loaded adapter and the seconds the load took (a remote one's download
        included: a load fetches its files again)."""
        store, started = self.store(), time.perf_counter()
        self.fetch(adapter_id, refresh=True)
        info = self.scheduler.call(lambda: store.load(adapter_id))
        return info, time.perf_counter() - started

    def unload_adapter(
        self, adapter_id: str, force: bool, no_wait: bool, timeout: float | None
    ) -> None:
        """Detach the adapter, then (unless `no_wait`, which refuses an adapter in use) wait
        for the requests running on it to end."""
        if timeout is not None and not timeout >= 0:
            raise InvalidRequest("timeout_s", f"must be >= 0 seconds, got {timeout}")
        store = self.store()
        self.scheduler.call(lambda: store.detach(adapter_id, force=force, if_unused=no_wait))
        if not no_wait:
            store.wait_unused(adapter_id, timeout)

    def pin_adapter(self, adapter_id: str, pinned: bool) -> AdapterInfo:
        store = self.store()
        if pinned:
            self.fetch(adapter_id)
        return self.scheduler.call(lambda: store.pin(adapter_id, pinned=pinned))


def _choice_sampling(sampling: SamplingParams, index: int) -> SamplingParams:
    if index == 0 or sampling.seed is None:
        return sampling
    return replace(sampling, seed=(sampling.seed + index) % SEEDS)
