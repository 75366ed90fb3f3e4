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
from typing import Any

from loraplex.server.engine.api import FinishReason, TokenEvent
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


def usage(handle: RequestHandle) -> dict[str, int]:
    prompt, completion = handle.prompt_tokens, handle.completion_tokens
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion}  # fmt: skip


class Shape(ABC):
    """One response's id and envelope; subclasses fill in the choices."""

    prefix = ""
    whole_object = ""
    chunk_object = ""

    def __init__(self, model: str, logprobs: bool, include_usage: bool = False) -> None:
        self.id = f"{self.prefix}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.model = model
        self.logprobs = logprobs
        self.include_usage = include_usage  # streams: every chunk carries "usage": null

    def envelope(self, obj: str, choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model,
                "choices": choices, **extra}  # fmt: skip

    def chunk(self, choice: dict[str, Any]) -> bytes:
        extra = {"usage": None} if self.include_usage else {}
        return sse(self.envelope(self.chunk_object, [{"index": 0, **choice}], **extra))

    def usage_chunk(self, handle: RequestHandle) -> bytes:
        return sse(self.envelope(self.chunk_object, [], usage=usage(handle)))

    @abstractmethod
    def whole(self, events: list[TokenEvent], handle: RequestHandle) -> dict[str, Any]: ...

    @abstractmethod
    def opening(self) -> list[bytes]:
        """The chunks a stream starts with, before its first token."""

    @abstractmethod
    def token_chunk(self, event: TokenEvent) -> bytes: ...

    @abstractmethod
    def closing(self, handle: RequestHandle) -> bytes:
        """The chunk that carries the finish reason."""


class CompletionShape(Shape):
    prefix = "cmpl"
    whole_object = chunk_object = "text_completion"

    def __init__(self, model: str, logprobs: bool, include_usage: bool = False) -> None:
        super().__init__(model, logprobs, include_usage)
        self.offset = 0  # the text offset of the next streamed token

    def whole(self, events: list[TokenEvent], handle: RequestHandle) -> dict[str, Any]:
        text = "".join(e.text for e in events)
        choice = {"index": 0, "text": text, "logprobs": self._logprobs(events, 0),
                  "finish_reason": finish_reason(handle)}  # fmt: skip
        return self.envelope(self.whole_object, [choice], usage=usage(handle))

    def opening(self) -> list[bytes]:
        return []

    def token_chunk(self, event: TokenEvent) -> bytes:
        logprobs = self._logprobs([event], self.offset)
        self.offset += len(event.text)
        return self.chunk({"text": event.text, "logprobs": logprobs, "finish_reason": None})

    def closing(self, handle: RequestHandle) -> bytes:
        return self.chunk({"text": "", "logprobs": None, "finish_reason": finish_reason(handle)})

    def _logprobs(self, events: list[TokenEvent], offset: int) -> dict[str, Any] | None:
        if not self.logprobs:
            return None
        offsets = []
        for event in events:
            offsets.append(offset)
            offset += len(event.text)
        return {"tokens": [e.text for e in events], "token_logprobs": [e.logprob for e in events],
                "top_logprobs": None, "text_offset": offsets}  # fmt: skip


class ChatShape(Shape):
    prefix = "chatcmpl"
    whole_object = "chat.completion"
    chunk_object = "chat.completion.chunk"

    def whole(self, events: list[TokenEvent], handle: RequestHandle) -> dict[str, Any]:
        message = {"role": "assistant", "content": "".join(e.text for e in events)}
        choice = {"index": 0, "message": message, "logprobs": self._logprobs(events),
                  "finish_reason": finish_reason(handle)}  # fmt: skip
        return self.envelope(self.whole_object, [choice], usage=usage(handle))

    def opening(self) -> list[bytes]:
        delta = {"role": "assistant", "content": ""}
        return [self.chunk({"delta": delta, "logprobs": None, "finish_reason": None})]

    def token_chunk(self, event: TokenEvent) -> bytes:
        return self.chunk({"delta": {"content": event.text}, "logprobs": self._logprobs([event]),
                           "finish_reason": None})  # fmt: skip

    def closing(self, handle: RequestHandle) -> bytes:
        return self.chunk({"delta": {}, "logprobs": None, "finish_reason": finish_reason(handle)})

    def _logprobs(self, events: list[TokenEvent]) -> dict[str, Any] | None:
        if not self.logprobs:
            return None
        content = [{"token": e.text, "logprob": e.logprob, "bytes": list(e.text.encode()),
                    "top_logprobs": []} for e in events]  # fmt: skip
        return {"content": content}
