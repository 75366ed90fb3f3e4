"""ASGI middleware in front of the HTTP app: bearer tokens by path (as server/auth.py's
interceptor checks gRPC methods) and the request body size limit, both before the app reads a
byte; and OpenAI's JSON error shape, which every refusal uses."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from loraplex.server.auth import Role, role_of
from loraplex.server.errors import InvalidRequest
from loraplex.server.http_status import INTERNAL, http_status_for

log = logging.getLogger(__name__)


def error_response(
    status: int, kind: str, message: str, param: str | None = None, code: str | None = None
) -> JSONResponse:
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return JSONResponse(body, status_code=status)


def error_body(err: BaseException) -> tuple[int, dict[str, Any]]:
    """(HTTP status, OpenAI error object) for any error; one that is not ours is logged."""
    found = http_status_for(err)
    if found is None:
        log.exception("unexpected error while serving an HTTP request", exc_info=err)
        found, err = INTERNAL, RuntimeError(f"internal error: {err!r}")
    status, kind = found
    param = err.field if isinstance(err, InvalidRequest) else None
    code = type(err).__name__  # the typed error's name: stable, unlike its message
    return status, {"error": {"message": str(err), "type": kind, "param": param, "code": code}}


class Guard:
    def __init__(
        self,
        app: ASGIApp,
        tokens: Mapping[str, Role],
        roles: Mapping[str, Role | None],
        max_body_bytes: int,
    ) -> None:
        """`roles`: the role each path needs (None: open); paths not named need GENERATE."""
        self.app = app
        self.tokens = dict(tokens)
        self.roles = dict(roles)
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        refusal = self._refusal(scope)
        if refusal is not None:
            await refusal(scope, receive, send)
            return
        body = await _read_body(receive, self.max_body_bytes)
        if body is None:
            too_large = (
                f"the request body exceeds {self.max_body_bytes} bytes (--max-message-bytes)"
            )
            await error_response(413, "invalid_request_error", too_large)(scope, receive, send)
            return
        await self.app(scope, _replay(body, receive), send)

    def _refusal(self, scope: Scope) -> JSONResponse | None:
        return refusal(self.tokens, self.roles, scope)


def refusal(
    tokens: Mapping[str, Role], roles: Mapping[str, Role | None], scope: Scope
) -> JSONResponse | None:
    """The reply to a request whose bearer token its path does not allow; None when allowed."""
    needed = roles.get(scope["path"], Role.GENERATE)
    if not tokens or needed is None:
        return None
    header = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
    role = role_of(tokens, header)
    if role is None:
        reply = error_response(
            401, "authentication_error",
            "a valid token is required: send the header 'Authorization: Bearer TOKEN'",
            code="invalid_api_key",
        )  # fmt: skip
        reply.headers["www-authenticate"] = "Bearer"
        return reply
    if role < needed:
        return error_response(403, "permission_error", "this call needs an admin token")
    return None


async def _read_body(receive: Receive, limit: int) -> bytes | None:
    """The whole body, or None once it exceeds `limit` (checked before buffering more)."""
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            break  # the client left; the app will see the disconnect
        size += len(message.get("body", b""))
        if size > limit:
            return None
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            break
    return b"".join(chunks)


def _replay(body: bytes, receive: Receive) -> Receive:
    """The body as one message, then whatever the connection says next (a disconnect)."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if sent:
            return await receive()
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return replay
