"""OpenAI's request and response shapes for /v1/completions and /v1/chat/completions: requests
parsed into `Generation`s (every field checked), events turned into OpenAI's JSON.

Fields the engine cannot honour are refused with a 400 naming them, never ignored, unless
they carry the value that asks for nothing (clients often send defaults explicitly); fields
that are no-ops by nature (`user`) are accepted. Unknown fields are refused too.

Structured output: OpenAI's `response_format` (`json_object`, `json_schema`), or vLLM's
`structured_outputs` extra (`json`, `regex`, `grammar` in Lark, `choice`), on both endpoints.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import replace
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from loraplex.server.engine.api import MAX_NEW_TOKENS_LIMIT, OutputFormat, SamplingParams
from loraplex.server.errors import InvalidRequest
from loraplex.server.frontend import Generation

MAX_SEED = (1 << 64) - 1  # the gRPC field is a uint64; both front ends accept the same seeds
# OpenAI's defaults where they differ from loraplex's own (greedy, 64 tokens).
DEFAULT_TEMPERATURE = 1.0
DEFAULT_COMPLETION_TOKENS = 16
# SamplingParams names its fields as gRPC does; the HTTP client knows OpenAI's names.
OPENAI_FIELD = {
    "max_new_tokens": "max_tokens",
    "output_format": "response_format",
    "prompt_ids": "prompt",
}
MAX_CHOICES = 16  # `n`: choices per request, each a sequence of its own in the batch
MAX_COMPLETION_LOGPROBS = 20  # /v1/completions' `logprobs`: top tokens per position
# field: the values that ask for nothing the engine would have to do
NO_OP_VALUES: dict[str, tuple[Any, ...]] = {
    "best_of": (None, 1),
    "echo": (None, False),
    "suffix": (None, ""),
    "tools": (None, []),
    "tool_choice": (None, "none"),
    "functions": (None, []),
    "function_call": (None, "none"),
    "store": (None, False),
}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    name: str = "output"
    description: str | None = None
    schema_: dict[str, Any] = Field(default_factory=dict, alias="schema")
    strict: bool | None = None  # the output always follows the schema, strict or not


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StructuredOutputs(BaseModel):
    """vLLM's extra: exactly one of these."""

    model_config = ConfigDict(extra="forbid")
    json_: dict[str, Any] | str | None = Field(default=None, alias="json")
    regex: str | None = None
    grammar: str | None = None  # Lark (llguidance's dialect)
    choice: list[str] | None = None
    json_object: bool | None = None


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
    n: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None  # token id (as a string): added to its logit
    response_format: ResponseFormat | None = None
    # Extras vLLM takes too, which the engine honours.
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool | None = None
    structured_outputs: StructuredOutputs | None = None
    adapter_scale: float | None = None
    # Refused unless they carry their no-op value (NO_OP_VALUES).
    store: bool | None = None


class CompletionRequest(_Request):
    prompt: Any = None  # a string; checked in `prompt_text` to name what else was sent
    logprobs: int | None = None  # the chosen tokens' log-probabilities and this many top ones
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
    request: CompletionRequest | ChatRequest, default_tokens: int, limit: int, logprobs: bool,
    top_logprobs: int,
) -> SamplingParams:  # fmt: skip
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
        min_p=_pick(request.min_p, 0.0),
        presence_penalty=_pick(request.presence_penalty, 0.0),
        frequency_penalty=_pick(request.frequency_penalty, 0.0),
        logit_bias=_logit_bias(request.logit_bias),
        stop_token_ids=tuple(request.stop_token_ids or ()),
        ignore_eos=bool(request.ignore_eos),
        top_logprobs=top_logprobs,
        output_format=output_format(request),
    )
    try:
        params.validate(min(limit, MAX_NEW_TOKENS_LIMIT))
    except InvalidRequest as err:
        raise InvalidRequest(OPENAI_FIELD.get(err.field, err.field), err.problem) from None
    return params


def _pick(value: float | None, default: float) -> float:
    return default if value is None else value


def _logit_bias(bias: dict[str, float] | None) -> tuple[tuple[int, float], ...]:
    pairs = []
    for key, value in (bias or {}).items():
        if not key.isdigit():
            raise InvalidRequest("logit_bias", f"keys are token ids, got {key!r}")
        pairs.append((int(key), value))
    return tuple(pairs)


def output_format(request: CompletionRequest | ChatRequest) -> OutputFormat | None:
    """The structure `response_format` or `structured_outputs` asks for; None: free text."""
    fmt = request.response_format
    chosen = structured(request.structured_outputs) if request.structured_outputs else None
    if fmt is None or fmt.type == "text":
        return chosen
    if chosen is not None:
        raise InvalidRequest("structured_outputs", "give it or response_format, not both")
    if fmt.type == "json_object":
        return OutputFormat("json_object")
    if fmt.json_schema is None:
        raise InvalidRequest("response_format.json_schema", "json_schema needs its schema")
    return OutputFormat("json_schema", json.dumps(fmt.json_schema.schema_))


def structured(options: StructuredOutputs) -> OutputFormat:
    given = {k: v for k, v in options.model_dump(by_alias=True).items() if v not in (None, False)}
    if len(given) != 1:
        raise InvalidRequest("structured_outputs", "give exactly one of json, regex, grammar, "
                             "choice or json_object")  # fmt: skip
    kind, value = next(iter(given.items()))
    if kind == "json":
        return OutputFormat("json_schema", value if isinstance(value, str) else json.dumps(value))
    if kind == "regex":
        return OutputFormat("regex", value)
    if kind == "grammar":
        return OutputFormat("lark", value)
    if kind == "choice":
        if not value:
            raise InvalidRequest("structured_outputs.choice", "must name at least one choice")
        return OutputFormat("regex", "|".join(f"(?:{re.escape(c)})" for c in value))
    return OutputFormat("json_object")


def choices(request: CompletionRequest | ChatRequest) -> int:
    n = 1 if request.n is None else request.n
    if not 1 <= n <= MAX_CHOICES:
        raise InvalidRequest("n", f"must be between 1 and {MAX_CHOICES}, got {n}")
    return n


def completion_generations(
    request: CompletionRequest, adapter_id: str, limit: int
) -> list[Generation]:
    """One generation per prompt: `prompt` is a string, token ids, or a list of either."""
    check_no_ops(request)
    top = request.logprobs
    if top is not None and not 0 <= top <= MAX_COMPLETION_LOGPROBS:
        raise InvalidRequest(
            "logprobs", f"must be between 0 and {MAX_COMPLETION_LOGPROBS}, got {top}"
        )
    params = sampling(request, DEFAULT_COMPLETION_TOKENS, limit, top is not None, top or 0)
    prompts, n = completion_prompts(request.prompt), choices(request)
    if len(prompts) * n > MAX_CHOICES:
        raise InvalidRequest("n", f"prompts times n must be at most {MAX_CHOICES}")
    base = Generation(sampling=params, adapter_id=adapter_id, adapter_scale=_scale(request),
                      choices=n)  # fmt: skip
    return [
        replace(base, prompt=p) if isinstance(p, str) else replace(base, prompt_ids=p)
        for p in prompts
    ]


def completion_prompts(prompt: Any) -> list[str | list[int]]:
    """OpenAI's prompt forms as a list of prompts, each text or token ids."""
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt, list) and prompt and all(_is_token(t) for t in prompt):
        return [prompt]
    if (
        isinstance(prompt, list)
        and prompt
        and all(
            isinstance(p, str) or (isinstance(p, list) and p and all(_is_token(t) for t in p))
            for p in prompt
        )
    ):
        return prompt
    raise InvalidRequest("prompt", "must be a string, a list of token ids, or a non-empty list "
                         "of strings or of token id lists")  # fmt: skip


def _is_token(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def chat_generations(request: ChatRequest, adapter_id: str, limit: int) -> list[Generation]:
    check_no_ops(request)
    if not request.messages:
        raise InvalidRequest("messages", "must hold at least one message")
    if request.top_logprobs and not request.logprobs:
        raise InvalidRequest("top_logprobs", "needs logprobs: true")
    messages = [{"role": m.role, "content": _content(m.content)} for m in request.messages]
    logprobs = bool(request.logprobs)
    generation = Generation(
        sampling=sampling(request, limit, limit, logprobs, request.top_logprobs or 0),
        messages=messages,
        adapter_id=adapter_id,
        adapter_scale=_scale(request),
        choices=choices(request),
    )
    return [generation]


def _content(content: str | list[TextPart]) -> str:
    # Text parts join with newlines, as vLLM joins them.
    return content if isinstance(content, str) else "\n".join(p.text for p in content)


def _scale(request: _Request) -> float:
    scale = _pick(request.adapter_scale, 1.0)
    if not math.isfinite(scale):
        raise InvalidRequest("adapter_scale", f"must be a finite number, got {scale}")
    return scale
