"""Turn wire messages into domain requests (validating every field) and results back."""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import Protocol
from urllib.parse import unquote, urlsplit

import jinja2

from loraplex.proto.v1 import loraplex_pb2 as pb
from loraplex.server.engine.api import (
    MAX_NEW_TOKENS_LIMIT,
    AdapterInfo,
    FinishReason,
    OutputFormat,
    SamplingParams,
    TokenEvent,
)
from loraplex.server.errors import InvalidRequest
from loraplex.server.scheduler import Timings

GenerationRequest = pb.GenerateRequest | pb.GenerateStreamRequest
ID_PART = r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}"
# a folder under the adapter roots (parts joined by '/'), or a hub id org/name[@revision]
ADAPTER_ID = re.compile(rf"{ID_PART}(/{ID_PART}){{0,3}}(@[A-Za-z0-9_.][A-Za-z0-9_./-]{{0,99}})?")
MAX_ADAPTER_ID_CHARS = 200
MAX_ADAPTER_URL_CHARS = 1024
ADAPTER_URL_SCHEMES = ("http", "https", "s3")
MAX_REQUEST_ID_BYTES = 256
DEFAULTS = SamplingParams()


class ChatTemplating(Protocol):
    def apply_chat_template(self, messages: list[dict[str, str]]) -> str: ...


def check_adapter_id(adapter_id: str, field: str = "adapter_id") -> str:
    """An adapter id is a folder name under the adapter roots, a hub id or a URL; no other
    path syntax may reach the stores. Whether its source is allowed is the sources' call."""
    if "://" in adapter_id:
        return _check_adapter_url(adapter_id, field)
    if (
        not ADAPTER_ID.fullmatch(adapter_id)
        or ".." in adapter_id
        or len(adapter_id) > MAX_ADAPTER_ID_CHARS
    ):
        raise InvalidRequest(
            field,
            f"{adapter_id!r} is not an adapter id: use a folder name under the adapter roots "
            "(letters, digits, '.', '_' or '-', parts joined by '/', without '..'), a hub id "
            "org/name[@revision], or an http(s):// or s3:// URL",
        )
    return adapter_id


def _check_adapter_url(url: str, field: str) -> str:
    parts = urlsplit(url)
    if parts.scheme not in ADAPTER_URL_SCHEMES:
        raise InvalidRequest(
            field,
            f"unknown adapter source scheme {parts.scheme!r}: use "
            f"{', '.join(ADAPTER_URL_SCHEMES)} URLs, hub ids or adapter folder names",
        )
    bad_chars = any(c.isspace() or not c.isprintable() for c in url)
    # dot segments (plain or percent-encoded) would step out of an allowed folder
    dots = any(part in (".", "..") for part in unquote(parts.path).split("/"))
    if not parts.netloc or bad_chars or dots or len(url) > MAX_ADAPTER_URL_CHARS:
        raise InvalidRequest(
            field,
            f"{url[:100]!r} is not an adapter URL: scheme://host/folder, printable, no '.' or "
            f"'..' segments, at most {MAX_ADAPTER_URL_CHARS} characters",
        )
    return url


def check_request_id(request_id: str) -> None:
    """The id is echoed back, so an unbounded one would let a small request buy a large reply."""
    size = len(request_id.encode("utf-8"))
    if size > MAX_REQUEST_ID_BYTES:
        raise InvalidRequest(
            "request_id",
            f"is {size} bytes of UTF-8; this server accepts at most {MAX_REQUEST_ID_BYTES} bytes",
        )


def sampling_from_proto(msg: pb.SamplingParams, max_new_tokens_limit: int) -> SamplingParams:
    def pick(name: str, default: float | int | None) -> float | int | None:
        return getattr(msg, name) if msg.HasField(name) else default  # type: ignore[arg-type]

    params = SamplingParams(
        max_new_tokens=int(pick("max_new_tokens", DEFAULTS.max_new_tokens) or 0),
        temperature=float(pick("temperature", DEFAULTS.temperature) or 0.0),
        top_k=int(pick("top_k", DEFAULTS.top_k) or 0),
        top_p=float(pick("top_p", DEFAULTS.top_p) or 0.0),
        repetition_penalty=float(pick("repetition_penalty", DEFAULTS.repetition_penalty) or 0.0),
        seed=msg.seed if msg.HasField("seed") else None,
        stop=tuple(msg.stop),
        logprobs=msg.logprobs,
        min_p=float(pick("min_p", DEFAULTS.min_p) or 0.0),
        presence_penalty=float(pick("presence_penalty", DEFAULTS.presence_penalty) or 0.0),
        frequency_penalty=float(pick("frequency_penalty", DEFAULTS.frequency_penalty) or 0.0),
        logit_bias=tuple(sorted(msg.logit_bias.items())),
        stop_token_ids=tuple(msg.stop_token_ids),
        ignore_eos=msg.ignore_eos,
        top_logprobs=msg.top_logprobs,
        output_format=output_format_from_proto(msg),
    )
    params.validate(min(max_new_tokens_limit, MAX_NEW_TOKENS_LIMIT))
    return params


def output_format_from_proto(msg: pb.SamplingParams) -> OutputFormat | None:
    if not msg.HasField("output_format"):
        return None
    kind = msg.output_format.WhichOneof("format")
    if kind is None:
        raise InvalidRequest("output_format", "set one of json_schema, json_object, regex, lark")
    if kind == "json_object":
        if not msg.output_format.json_object:
            raise InvalidRequest("output_format.json_object", "must be true when given")
        return OutputFormat("json_object")
    return OutputFormat(kind, getattr(msg.output_format, kind))


def top_logprobs_to_proto(event: TokenEvent) -> list[pb.TopLogprobs]:
    """The event's top tokens, one message (or none when not asked for)."""
    if event.token_id is None or event.top_logprobs is None:
        return []
    ids, logprobs = zip(*event.top_logprobs, strict=True) if event.top_logprobs else ((), ())
    return [pb.TopLogprobs(token_ids=ids, logprobs=logprobs)]


def adapter_scale(req: GenerationRequest) -> float:
    if not req.HasField("adapter_scale"):
        return 1.0
    if not math.isfinite(req.adapter_scale):
        raise InvalidRequest("adapter_scale", f"must be a finite number, got {req.adapter_scale}")
    return float(req.adapter_scale)


def prompt_text(prompt: str, messages: list[dict[str, str]], chat: ChatTemplating | None) -> str:
    if prompt and messages:
        raise InvalidRequest("messages", "give either prompt or messages, not both")
    if messages:
        if chat is None:
            raise InvalidRequest("messages", "this model's tokenizer has no chat template")
        try:
            return chat.apply_chat_template(messages)
        except jinja2.TemplateError as err:  # the template refused them (raise_exception)
            raise InvalidRequest("messages", f"the chat template refused them: {err}") from None
    if not prompt:
        raise InvalidRequest("prompt", "must not be empty (or give chat messages)")
    return prompt


def chat_messages(req: GenerationRequest) -> list[dict[str, str]]:
    return [{"role": m.role, "content": m.content} for m in req.messages]


def check_prompt_size(prompt: str, messages: list[dict[str, str]], max_chars: int) -> None:
    """Refuse an oversized prompt before the tokenizer spends time on it."""
    size = len(prompt) + sum(len(m["role"]) + len(m["content"]) for m in messages)
    _check_size("messages" if messages else "prompt", size, max_chars)


def check_text_size(field: str, text: str, max_chars: int) -> None:
    _check_size(field, len(text), max_chars)


def _check_size(field: str, size: int, max_chars: int) -> None:
    if size > max_chars:
        raise InvalidRequest(
            field, f"is {size} characters; this server accepts at most {max_chars} characters "
            "(--max-prompt-chars)",
        )  # fmt: skip


def prompt_ids(text: str, encode: Callable[[str], list[int]], max_context: int) -> list[int]:
    ids = encode(text)
    if not ids:
        raise InvalidRequest("prompt", "encodes to no tokens")
    if len(ids) >= max_context:
        raise InvalidRequest(
            "prompt",
            f"is {len(ids)} tokens; the model's context holds {max_context} tokens, "
            "prompt plus at least one new token",
        )
    return ids


FINISH_TO_PROTO = {
    FinishReason.LENGTH: pb.FINISH_REASON_LENGTH,
    FinishReason.STOP: pb.FINISH_REASON_STOP,
    FinishReason.EOS: pb.FINISH_REASON_EOS,
    FinishReason.CONTEXT: pb.FINISH_REASON_CONTEXT,
}


def finish_to_proto(reason: FinishReason | None) -> pb.FinishReason.ValueType:
    if reason is None:
        return pb.FINISH_REASON_UNSPECIFIED
    return FINISH_TO_PROTO.get(reason, pb.FINISH_REASON_UNSPECIFIED)


def timings_to_proto(t: Timings) -> pb.Timings:
    def since_submit(moment: float | None) -> float:
        return 0.0 if moment is None else moment - t.submitted

    return pb.Timings(
        queue_s=since_submit(t.scheduled),
        time_to_first_token_s=since_submit(t.first_token),
        total_s=since_submit(t.finished),
    )


def adapter_to_proto(info: AdapterInfo) -> pb.AdapterInfo:
    return pb.AdapterInfo(
        adapter_id=info.adapter_id,
        version=info.version,
        peft_type=info.peft_type,
        rank=info.rank,
        target_modules=list(info.target_modules),
        nbytes=info.nbytes,
        resident=info.resident,
        pinned=info.pinned,
        in_use=info.in_use,
        path=info.path,
    )
