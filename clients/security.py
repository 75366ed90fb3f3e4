"""How a client reaches a server that asks for more than plaintext: a bearer token sent with
every call, and TLS (trusting a given CA, or the system's), optionally with a client certificate.

    Security(token=read_token(Path("~/.loraplex-token")), tls_ca=Path("ca.pem"))
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import grpc
import grpc.aio

from loraplex.clients.errors import ClientSetupError

TOKEN_ENV = "LORAPLEX_TOKEN"


@dataclass(frozen=True)
class Security:
    token: str | None = None
    tls: bool = False  # TLS with the system's roots; implied by any of the files below
    tls_ca: Path | None = None  # the CA that signed the server's certificate
    tls_cert: Path | None = None  # this client's certificate, for mutual TLS
    tls_key: Path | None = None

    @property
    def uses_tls(self) -> bool:
        return self.tls or any(f is not None for f in (self.tls_ca, self.tls_cert, self.tls_key))

    def metadata(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.token}"),) if self.token else ()

    def channel(self, target: str) -> grpc.Channel:
        if not self.uses_tls:
            return grpc.insecure_channel(target)
        return grpc.secure_channel(target, self._credentials())

    def aio_channel(self, target: str) -> grpc.aio.Channel:
        if not self.uses_tls:
            return grpc.aio.insecure_channel(target)
        return grpc.aio.secure_channel(target, self._credentials())

    def _credentials(self) -> grpc.ChannelCredentials:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ClientSetupError("a client certificate needs both --tls-cert and --tls-key")
        return grpc.ssl_channel_credentials(
            root_certificates=_read(self.tls_ca),
            private_key=_read(self.tls_key),
            certificate_chain=_read(self.tls_cert),
        )


def read_token(path: Path | None) -> str | None:
    """The token in `path`, else $LORAPLEX_TOKEN, else None."""
    if path is None:
        return os.environ.get(TOKEN_ENV) or None
    try:
        token = path.expanduser().read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as err:
        raise ClientSetupError(f"cannot read the token file {path}: {err}") from None
    if not token:
        raise ClientSetupError(f"the token file {path} is empty")
    return token


def _read(path: Path | None) -> bytes | None:
    if path is None:
        return None
    try:
        return path.expanduser().read_bytes()
    except OSError as err:
        raise ClientSetupError(f"cannot read {path}: {err.strerror or err}") from None
