"""Typed results and the conversion between them and wire messages (shared by both clients)."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from loraplex.proto.v1 import loraplex_pb2 as pb

FINISH_NAMES = {
    pb.FINISH_REASON_UNSPECIFIED: "",
    pb.FINISH_REASON_LENGTH: "length",
    pb.FINISH_REASON_STOP: "stop",
    pb.FINISH_REASON_EOS: "eos",
    pb.FINISH_REASON_CONTEXT: "context",
}


@dataclass(frozen=True)
class Timings:
    queue_s: float
    time_to_first_token_s: float
    total_s: float


@dataclass(frozen=True)
class Generation:
    """A finished generation."""

    text: str
    token_ids: list[int]
    finish_reason: str  # "length", "stop", "eos" or "context"
    prompt_tokens: int
    completion_tokens: int
    timings: Timings
    request_id: str
    adapter_id: str
    adapter_version: int
    logprobs: list[float] = field(default_factory=list)  # when asked for, one per token
    # when asked for, one per token: the most probable (token id, log-probability) pairs
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)


@dataclass(frozen=True)
class Chunk:
    """New tokens from a stream."""

    text: str
    token_ids: list[int]
    logprobs: list[float] = field(default_factory=list)  # when asked for, one per token
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)


@dataclass(frozen=True)
class Adapter:
    adapter_id: str
    version: int
    peft_type: str
    rank: int
    target_modules: list[str]
    nbytes: int
    resident: bool
    pinned: bool
    in_use: int
    path: str


@dataclass(frozen=True)
class GenerateArgs:
    """What a generation asks for; None leaves the server default."""

    prompt: str = ""
    messages: Sequence[tuple[str, str]] = ()  # (role, content)
    adapter: str = ""
    scale: float | None = None
    max_new_tokens: int | None = None
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float | None = None
    stop: Sequence[str] = ()
    seed: int | None = None
    logprobs: bool = False  # return each chosen token's log-probability
    top_logprobs: int = 0  # and this many most probable tokens per position
    min_p: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: Mapping[int, float] = field(default_factory=dict)
    stop_token_ids: Sequence[int] = ()
    ignore_eos: bool = False
    # Structured output, at most one: a JSON schema (dict or JSON text), any JSON object,
    # a regular expression, or a Lark grammar.
    json_schema: dict[str, Any] | str | None = None
    json_object: bool = False
    regex: str | None = None
    lark: str | None = None
    request_id: str = ""


OPTIONAL_SAMPLING = ("max_new_tokens", "temperature", "top_k", "top_p", "repetition_penalty",
                     "seed", "min_p", "presence_penalty", "frequency_penalty")  # fmt: skip


def sampling_message(args: GenerateArgs) -> pb.SamplingParams:
    msg = pb.SamplingParams(
        stop=list(args.stop), logprobs=args.logprobs, top_logprobs=args.top_logprobs,
        logit_bias=dict(args.logit_bias), stop_token_ids=list(args.stop_token_ids),
        ignore_eos=args.ignore_eos,
    )  # fmt: skip
    for name in OPTIONAL_SAMPLING:
        value = getattr(args, name)
        if value is not None:
            setattr(msg, name, value)
    fmt = output_format_message(args)
    if fmt is not None:
        msg.output_format.CopyFrom(fmt)
    return msg


def output_format_message(args: GenerateArgs) -> pb.OutputFormat | None:
    schema = args.json_schema
    given: dict[str, Any] = {
        "json_schema": schema if isinstance(schema, str | None) else json.dumps(schema),
        "json_object": args.json_object or None,
        "regex": args.regex,
        "lark": args.lark,
    }
    chosen = {k: v for k, v in given.items() if v is not None}
    if len(chosen) > 1:
        raise ValueError(f"give at most one output format, got {sorted(chosen)}")
    return pb.OutputFormat(**chosen) if chosen else None


def top_logprobs(messages: Sequence[pb.TopLogprobs]) -> list[list[tuple[int, float]]]:
    return [list(zip(m.token_ids, m.logprobs, strict=True)) for m in messages]


def request_fields(args: GenerateArgs) -> dict[str, Any]:
    """Fields shared by GenerateRequest and GenerateStreamRequest."""
    fields: dict[str, Any] = {
        "prompt": args.prompt,
        "messages": [pb.ChatMessage(role=r, content=c) for r, c in args.messages],
        "adapter_id": args.adapter,
        "sampling": sampling_message(args),
        "request_id": args.request_id,
    }
    if args.scale is not None:
        fields["adapter_scale"] = args.scale
    return fields


def generation(
    msg: pb.GenerateResponse | pb.GenerateStreamResponse,
    text: str,
    token_ids: list[int],
    logprobs: list[float],
    request_id: str,
    top: list[list[tuple[int, float]]] | None = None,
) -> Generation:
    """A stream's last message lacks the request id (only its first has it): callers pass it."""
    t = msg.timings
    return Generation(
        text=text,
        token_ids=token_ids,
        finish_reason=FINISH_NAMES.get(msg.finish_reason, "unknown"),
        prompt_tokens=msg.usage.prompt_tokens,
        completion_tokens=msg.usage.completion_tokens,
        timings=Timings(t.queue_s, t.time_to_first_token_s, t.total_s),
        request_id=request_id,
        adapter_id=msg.adapter_id,
        adapter_version=msg.adapter_version,
        logprobs=logprobs,
        top_logprobs=top or [],
    )


def adapter(msg: pb.AdapterInfo) -> Adapter:
    return Adapter(
        msg.adapter_id, msg.version, msg.peft_type, msg.rank, list(msg.target_modules),
        msg.nbytes, msg.resident, msg.pinned, msg.in_use, msg.path,
    )  # fmt: skip
