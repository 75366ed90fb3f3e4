"""OpenAI's response shapes: a whole completion, and the chunks of a streamed one (server-sent
events ending with `data: [DONE]`), for /v1/completions and /v1/chat/completions.

A token's text is the text it added to the answer (`TokenEvent.text`: empty while a UTF-8
character is incomplete), so a response's token strings join to its text.
"""

from __future__ import annotations

import json
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any

from loraplex.server.engine.api import FinishReason, SamplingParams, TokenEvent
from loraplex.server.scheduler import RequestHandle

FINISH_REASON = {
    FinishReason.EOS: "stop",
    FinishReason.STOP: "stop",
    FinishReason.LENGTH: "length",
    FinishReason.CONTEXT: "length",
}
SSE_DONE = b"data: [DONE]\n\n"


def sse(payload: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"


def finish_reason(handle: RequestHandle) -> str | None:
    return FINISH_REASON.get(handle.finish_reason) if handle.finish_reason else None


def usage(handles: list[RequestHandle], choices: int) -> dict[str, int]:
    """Each prompt counted once (its `choices` handles are in a row), as OpenAI counts them,
    and every choice's tokens."""
    prompt = sum(h.prompt_tokens for h in handles[::choices])
    completion = sum(h.completion_tokens for h in handles)
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion}  # fmt: skip


class Shape(ABC):
    """One response's id and envelope; subclasses fill in the choices."""

    prefix = ""
    whole_object = ""
    chunk_object = ""

    def __init__(
        self, model: str, sampling: SamplingParams, decode: Callable[[list[int]], str],
        choices: int = 1, include_usage: bool = False,
    ) -> None:  # fmt: skip
        self.id = f"{self.prefix}-{uuid.uuid4().hex}"
        self.choices = choices  # per prompt
        self.created = int(time.time())
        self.model = model
        self.logprobs = sampling.logprobs
        self.decode = decode  # names the top_logprobs' tokens
        self.include_usage = include_usage  # streams: every chunk carries "usage": null

    def envelope(self, obj: str, choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model,
                "choices": choices, **extra}  # fmt: skip

    def chunk(self, index: int, choice: dict[str, Any]) -> bytes:
        extra = {"usage": None} if self.include_usage else {}
        return sse(self.envelope(self.chunk_object, [{"index": index, **choice}], **extra))

    def usage_chunk(self, handles: list[RequestHandle]) -> bytes:
        return sse(self.envelope(self.chunk_object, [], usage=usage(handles, self.choices)))

    def whole(
        self, outputs: list[list[TokenEvent]], handles: list[RequestHandle]
    ) -> dict[str, Any]:
        """The whole response: `outputs[i]` is choice i's events."""
        choices = [
            {"index": i, **self.choice(events), "finish_reason": finish_reason(handle)}
            for i, (events, handle) in enumerate(zip(outputs, handles, strict=True))
        ]
        return self.envelope(self.whole_object, choices, usage=usage(handles, self.choices))

    def top(self, event: TokenEvent) -> list[tuple[str, float]]:
        return [(self.decode([token]), logprob) for token, logprob in event.top_logprobs or ()]

    @abstractmethod
    def choice(self, events: list[TokenEvent]) -> dict[str, Any]:
        """A whole choice's fields but its index and finish reason."""

    @abstractmethod
    def opening(self, index: int) -> list[bytes]:
        """The chunks a choice's stream starts with, before its first token."""

    @abstractmethod
    def token_chunk(self, index: int, event: TokenEvent) -> bytes: ...

    @abstractmethod
    def closing(self, index: int, handle: RequestHandle) -> bytes:
        """The chunk that carries a choice's finish reason."""


class CompletionShape(Shape):
    prefix = "cmpl"
    whole_object = chunk_object = "text_completion"

    def __init__(
        self, model: str, sampling: SamplingParams, decode: Callable[[list[int]], str],
        choices: int = 1, include_usage: bool = False,
    ) -> None:  # fmt: skip
        super().__init__(model, sampling, decode, choices, include_usage)
        self.offsets: dict[int, int] = {}  # the text offset of each choice's next token

    def choice(self, events: list[TokenEvent]) -> dict[str, Any]:
        return {"text": "".join(e.text for e in events), "logprobs": self._logprobs(events, 0)}

    def opening(self, index: int) -> list[bytes]:
        return []

    def token_chunk(self, index: int, event: TokenEvent) -> bytes:
        offset = self.offsets.get(index, 0)
        logprobs = self._logprobs([event], offset)
        self.offsets[index] = offset + len(event.text)
        return self.chunk(index, {"text": event.text, "logprobs": logprobs, "finish_reason": None})

    def closing(self, index: int, handle: RequestHandle) -> bytes:
        finish = finish_reason(handle)
        return self.chunk(index, {"text": "", "logprobs": None, "finish_reason": finish})

    def _logprobs(self, events: list[TokenEvent], offset: int) -> dict[str, Any] | None:
        if not self.logprobs:
            return None
        offsets = []
        for event in events:
            offsets.append(offset)
            offset += len(event.text)
        tops = [_by_text(self.top(e)) if e.top_logprobs is not None else None for e in events]
        return {"tokens": [e.text for e in events], "token_logprobs": [e.logprob for e in events],
                "top_logprobs": tops if any(t is not None for t in tops) else None,
                "text_offset": offsets}  # fmt: skip


class ChatShape(Shape):
    prefix = "chatcmpl"
    whole_object = "chat.completion"
    chunk_object = "chat.completion.chunk"

    def choice(self, events: list[TokenEvent]) -> dict[str, Any]:
        message = {"role": "assistant", "content": "".join(e.text for e in events)}
        return {"message": message, "logprobs": self._logprobs(events)}

    def opening(self, index: int) -> list[bytes]:
        delta = {"role": "assistant", "content": ""}
        return [self.chunk(index, {"delta": delta, "logprobs": None, "finish_reason": None})]

    def token_chunk(self, index: int, event: TokenEvent) -> bytes:
        delta = {"content": event.text}
        logprobs = self._logprobs([event])
        return self.chunk(index, {"delta": delta, "logprobs": logprobs, "finish_reason": None})

    def closing(self, index: int, handle: RequestHandle) -> bytes:
        finish = finish_reason(handle)
        return self.chunk(index, {"delta": {}, "logprobs": None, "finish_reason": finish})

    def _logprobs(self, events: list[TokenEvent]) -> dict[str, Any] | None:
        if not self.logprobs:
            return None
        return {"content": [self._token(e) for e in events]}

    def _token(self, event: TokenEvent) -> dict[str, Any]:
        top = [{"token": text, "logprob": logprob, "bytes": list(text.encode())}
               for text, logprob in self.top(event)]  # fmt: skip
        return {"token": event.text, "logprob": event.logprob, "bytes": list(event.text.encode()),
                "top_logprobs": top}  # fmt: skip


def _by_text(top: list[tuple[str, float]]) -> dict[str, float]:
    """OpenAI's completions shape keys the top tokens by text; tokens that decode alike (a cut
    UTF-8 character) keep the most probable's value."""
    keyed: dict[str, float] = {}
    for text, logprob in top:
        keyed.setdefault(text, logprob)
    return keyed
