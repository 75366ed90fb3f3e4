"""The fleet's OpenAI HTTP API: which replica answers a request, and relaying it to that
replica's own `loraplex serve --http-port`.

Serve's HTTP proxy hands a router no body, so a request lands on any replica; that replica
reads the body's `model` and, for an adapter, hands the request on through Serve with the
adapter as its multiplexed model id, so the affinity router picks the holder. Adapter
commands go to every replica's server; everything else is answered by the replica that took
the request.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass

import aiohttp

ROUTED_PATHS = frozenset({"/v1/completions", "/v1/chat/completions"})
EVERY_REPLICA_PATHS = frozenset({"/v1/load_lora_adapter", "/v1/unload_lora_adapter"})
# hop-by-hop, or recomputed by whoever sends the body on
_NOT_RELAYED = frozenset({"host", "content-length", "transfer-encoding", "connection",
                          "keep-alive", "content-encoding"})  # fmt: skip


@dataclass(frozen=True)
class HttpRequest:
    method: str
    path: str  # with its query string
    headers: tuple[tuple[str, str], ...]
    body: bytes


@dataclass(frozen=True)
class ReplyHead:
    status: int
    headers: tuple[tuple[str, str], ...]


def requested_model(body: bytes) -> str:
    """The body's `model`, "" when there is none (the server will say what is wrong)."""
    try:
        model = json.loads(body).get("model", "")
    except (ValueError, AttributeError):
        return ""
    return model if isinstance(model, str) else ""


def relayed_headers(headers: Iterable[tuple[str, str]]) -> tuple[tuple[str, str], ...]:
    return tuple((k, v) for k, v in headers if k.lower() not in _NOT_RELAYED)


async def relay(
    session: aiohttp.ClientSession, base_url: str, request: HttpRequest
) -> AsyncIterator[ReplyHead | bytes]:
    """The server's reply: its head, then its body as it comes (server-sent events too)."""
    async with session.request(
        request.method, base_url + request.path, headers=list(request.headers),
        data=request.body, auto_decompress=False,
    ) as reply:  # fmt: skip
        yield ReplyHead(reply.status, relayed_headers(reply.headers.items()))
        async for chunk in reply.content.iter_any():
            yield chunk


async def whole(
    session: aiohttp.ClientSession, base_url: str, request: HttpRequest
) -> tuple[ReplyHead, bytes]:
    head, body = None, b""
    async for part in relay(session, base_url, request):
        if isinstance(part, ReplyHead):
            head = part
        else:
            body += part
    assert head is not None
    return head, body
