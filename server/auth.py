"""Who may call what: bearer tokens with two roles, checked by a gRPC server interceptor (and
by the HTTP front end through `role_of`).

`generate` tokens may generate and make read-only calls; `admin` tokens may also load, unload
and pin adapters and drain the server. Health checks stay open so probes need no secret.
Tokens come from a file or the LORAPLEX_AUTH_TOKENS environment variable, one `ROLE TOKEN`
pair per line, never from a flag (flags show in `ps`).
"""

from __future__ import annotations

import enum
import hashlib
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import grpc

from loraplex.server.config import ConfigError

TOKENS_ENV = "LORAPLEX_AUTH_TOKENS"
MIN_TOKEN_LENGTH = 16
ADMIN_METHODS = frozenset({"LoadAdapter", "UnloadAdapter", "PinAdapter", "Drain"})
OPEN_SERVICES = ("/grpc.health.v1.Health/",)


class Role(enum.IntEnum):
    GENERATE = 1
    ADMIN = 2


# the HTTP API's paths as ADMIN_METHODS are gRPC's: the role each needs (None: open);
# paths not named need GENERATE
HTTP_ROLES: dict[str, Role | None] = {
    "/health": None,
    "/v1/load_lora_adapter": Role.ADMIN,
    "/v1/unload_lora_adapter": Role.ADMIN,
}


def load_tokens(path: Path | None, environ: Mapping[str, str] = os.environ) -> dict[str, Role]:
    """Token digests by role, from the file and the environment; empty means auth is off."""
    tokens: dict[str, Role] = {}
    if path is not None:
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            raise ConfigError(f"--auth-tokens-file: cannot read {path} ({err})") from None
        tokens |= parse_tokens(text, str(path))
    if environ.get(TOKENS_ENV):
        tokens |= parse_tokens(environ[TOKENS_ENV], TOKENS_ENV)
    return tokens


def parse_tokens(text: str, source: str) -> dict[str, Role]:
    tokens: dict[str, Role] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        fields = line.split("#", 1)[0].split()
        if not fields:
            continue
        where = f"{source} line {number}"
        if len(fields) != 2 or fields[0].upper() not in Role.__members__:
            raise ConfigError(f"{where}: expected 'admin TOKEN' or 'generate TOKEN'")
        if len(fields[1]) < MIN_TOKEN_LENGTH:
            raise ConfigError(
                f"{where}: tokens need at least {MIN_TOKEN_LENGTH} characters; "
                "make one with: python -c 'import secrets; print(secrets.token_urlsafe(32))'"
            )
        tokens[_digest(fields[1])] = Role[fields[0].upper()]
    return tokens


def role_of(tokens: Mapping[str, Role], authorization: str) -> Role | None:
    """The role of an `authorization` header's bearer token; None when it names none."""
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer":
        return None
    return tokens.get(_digest(token.strip()))


def _digest(token: str) -> str:
    # Looking up a digest rather than the token keeps the comparison's timing independent
    # of how much of a guessed token is right.
    return hashlib.sha256(token.encode()).hexdigest()


class BearerAuth(grpc.ServerInterceptor):
    def __init__(self, tokens: Mapping[str, Role]) -> None:
        self._tokens = dict(tokens)

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = continuation(details)
        method = str(details.method)
        if handler is None or method.startswith(OPEN_SERVICES):
            return handler
        role = self._role(details.invocation_metadata)
        if role is None:
            return _refusal(
                handler, grpc.StatusCode.UNAUTHENTICATED,
                "a valid token is required: send the metadata 'authorization: Bearer TOKEN'",
            )  # fmt: skip
        if method.rsplit("/", 1)[-1] in ADMIN_METHODS and role < Role.ADMIN:
            return _refusal(
                handler, grpc.StatusCode.PERMISSION_DENIED, "this call needs an admin token"
            )
        return handler

    def _role(self, metadata: Sequence[tuple[str, Any]] | None) -> Role | None:
        for key, value in metadata or ():
            if key == "authorization" and isinstance(value, str):
                return role_of(self._tokens, value)
        return None


def _refusal(
    handler: grpc.RpcMethodHandler, code: grpc.StatusCode, message: str
) -> grpc.RpcMethodHandler:
    """A handler of the same shape that refuses without reading the request."""

    def refuse(request: object, context: grpc.ServicerContext) -> Any:
        context.abort(code, message)

    def refuse_stream(request: object, context: grpc.ServicerContext) -> Any:
        context.abort(code, message)
        yield  # never reached: makes this a generator, as streaming handlers are

    # The raw bytes stand in for the request: never parsed, and not None, which grpc would
    # take for a failed deserialization.
    ignore = {"request_deserializer": bytes, "response_serializer": None}
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(refuse_stream, **ignore)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(refuse, **ignore)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(refuse_stream, **ignore)
    return grpc.unary_unary_rpc_method_handler(refuse, **ignore)
