"""Typed results and the conversion between them and wire messages (shared by both clients)."""

from __future__ import annotations

from collections.abc import Sequence
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


@dataclass(frozen=True)
class Chunk:
    """New tokens from a stream."""

    text: str
    token_ids: list[int]
    logprobs: list[float] = field(default_factory=list)  # when asked for, one per token


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
    request_id: str = ""


def sampling_message(args: GenerateArgs) -> pb.SamplingParams:
    msg = pb.SamplingParams(stop=list(args.stop), logprobs=args.logprobs)
    for name in ("max_new_tokens", "temperature", "top_k", "top_p", "repetition_penalty", "seed"):
        value = getattr(args, name)
        if value is not None:
            setattr(msg, name, value)
    return msg


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
    )


def adapter(msg: pb.AdapterInfo) -> Adapter:
    return Adapter(
        msg.adapter_id, msg.version, msg.peft_type, msg.rank, list(msg.target_modules),
        msg.nbytes, msg.resident, msg.pinned, msg.in_use, msg.path,
    )  # fmt: skip
