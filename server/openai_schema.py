"""OpenAI's request and response shapes for /v1/completions and /v1/chat/completions: requests
parsed into `Generation`s (every field checked), events turned into OpenAI's JSON.

Fields the engine cannot honour yet are refused with a 400 naming them, never ignored, unless
they carry the value that asks for nothing (clients often send defaults explicitly); fields
that are no-ops by nature (`user`) are accepted. Unknown fields are refused too.
"""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from loraplex.server.engine.api import MAX_NEW_TOKENS_LIMIT, SamplingParams
from loraplex.server.errors import InvalidRequest
from loraplex.server.frontend import Generation

MAX_SEED = (1 << 64) - 1  # the gRPC field is a uint64; both front ends accept the same seeds
# OpenAI's defaults where they differ from loraplex's own (greedy, 64 tokens).
DEFAULT_TEMPERATURE = 1.0
DEFAULT_COMPLETION_TOKENS = 16
# SamplingParams names its fields as gRPC does; the HTTP client knows OpenAI's names.
OPENAI_FIELD = {"max_new_tokens": "max_tokens"}
# field: the values that ask for nothing the engine would have to do
NO_OP_VALUES: dict[str, tuple[Any, ...]] = {
    "n": (None, 1),
    "presence_penalty": (None, 0),
    "frequency_penalty": (None, 0),
    "logit_bias": (None, {}),
    "min_p": (None, 0),
    "top_logprobs": (None, 0),
    "best_of": (None, 1),
    "echo": (None, False),
    "suffix": (None, ""),
    "response_format": (None, {"type": "text"}),
    "tools": (None, []),
    "tool_choice": (None, "none"),
    "functions": (None, []),
    "function_call": (None, "none"),
    "store": (None, False),
}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


class _Request(BaseModel):
    """Fields both endpoints take."""

    model_config = ConfigDict(extra="forbid")

    model: str
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None  # an end-user id for abuse reports: nothing to do here
    metadata: dict[str, str] | None = None  # tags for stored completions; nothing is stored
    # Extras vLLM takes too, which the engine honours.
    top_k: int | None = None
    repetition_penalty: float | None = None
    adapter_scale: float | None = None
    # Refused unless they carry their no-op value (NO_OP_VALUES).
    n: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    min_p: float | None = None
    store: bool | None = None


class CompletionRequest(_Request):
    prompt: Any = None  # a string; checked in `prompt_text` to name what else was sent
    logprobs: int | None = None  # 0: the chosen tokens' log-probabilities
    best_of: int | None = None
    echo: bool | None = None
    suffix: str | None = None


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: str
    content: str | list[TextPart]
    name: None = None  # participant names would change the prompt; no template takes them


class ChatRequest(_Request):
    messages: list[Message]
    max_completion_tokens: int | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    response_format: dict[str, Any] | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None  # without tools there are no calls to parallelize
    functions: list[Any] | None = None
    function_call: Any = None


def check_no_ops(request: _Request) -> None:
    for name, allowed in NO_OP_VALUES.items():
        value = getattr(request, name, None)
        if value not in allowed:
            raise InvalidRequest(name, f"this server cannot honour {value!r} yet; leave it out")


def sampling(
    request: CompletionRequest | ChatRequest, default_tokens: int, limit: int, logprobs: bool
) -> SamplingParams:
    max_tokens = request.max_tokens
    if isinstance(request, ChatRequest) and request.max_completion_tokens is not None:
        if max_tokens is not None and max_tokens != request.max_completion_tokens:
            raise InvalidRequest("max_completion_tokens", "differs from max_tokens; give one")
        max_tokens = request.max_completion_tokens
    if request.seed is not None and not 0 <= request.seed <= MAX_SEED:
        raise InvalidRequest("seed", f"must be between 0 and {MAX_SEED}, got {request.seed}")
    stop = [request.stop] if isinstance(request.stop, str) else request.stop or []
    params = SamplingParams(
        max_new_tokens=default_tokens if max_tokens is None else max_tokens,
        temperature=_pick(request.temperature, DEFAULT_TEMPERATURE),
        top_k=request.top_k or 0,
        top_p=_pick(request.top_p, 1.0),
        repetition_penalty=_pick(request.repetition_penalty, 1.0),
        seed=request.seed,
        stop=tuple(stop),
        logprobs=logprobs,
    )
    try:
        params.validate(min(limit, MAX_NEW_TOKENS_LIMIT))
    except InvalidRequest as err:
        raise InvalidRequest(OPENAI_FIELD.get(err.field, err.field), err.problem) from None
    return params


def _pick(value: float | None, default: float) -> float:
    return default if value is None else value


def completion_generation(request: CompletionRequest, adapter_id: str, limit: int) -> Generation:
    check_no_ops(request)
    if request.logprobs not in (None, 0):
        raise InvalidRequest(
            "logprobs", "this server gives only the chosen tokens' log-probabilities: use 0"
        )
    if not isinstance(request.prompt, str):
        raise InvalidRequest("prompt", "must be one string (token ids and lists are not taken)")
    return Generation(
        sampling=sampling(request, DEFAULT_COMPLETION_TOKENS, limit, request.logprobs == 0),
        prompt=request.prompt,
        adapter_id=adapter_id,
        adapter_scale=_scale(request),
    )


def chat_generation(request: ChatRequest, adapter_id: str, limit: int) -> Generation:
    check_no_ops(request)
    if not request.messages:
        raise InvalidRequest("messages", "must hold at least one message")
    messages = [{"role": m.role, "content": _content(m.content)} for m in request.messages]
    return Generation(
        sampling=sampling(request, limit, limit, bool(request.logprobs)),
        messages=messages,
        adapter_id=adapter_id,
        adapter_scale=_scale(request),
    )


def _content(content: str | list[TextPart]) -> str:
    # Text parts join with newlines, as vLLM joins them.
    return content if isinstance(content, str) else "\n".join(p.text for p in content)


def _scale(request: _Request) -> float:
    scale = _pick(request.adapter_scale, 1.0)
    if not math.isfinite(scale):
        raise InvalidRequest("adapter_scale", f"must be a finite number, got {scale}")
    return scale
