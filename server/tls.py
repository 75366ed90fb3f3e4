"""TLS on the gRPC port: a certificate and key turn it on; a client CA makes it mutual."""

from __future__ import annotations

from pathlib import Path

import grpc

from loraplex.server.config import ConfigError


def server_credentials(
    cert: Path | None, key: Path | None, client_ca: Path | None
) -> grpc.ServerCredentials | None:
    """None for a plaintext port; with `client_ca`, clients must present a certificate it signed."""
    if cert is None and key is None:
        if client_ca is not None:
            raise ConfigError("--tls-client-ca needs --tls-cert and --tls-key (mutual TLS is TLS)")
        return None
    if cert is None or key is None:
        raise ConfigError("--tls-cert and --tls-key go together: give both or neither")
    chain, private_key = _read(cert, "--tls-cert"), _read(key, "--tls-key")
    roots = _read(client_ca, "--tls-client-ca") if client_ca is not None else None
    return grpc.ssl_server_credentials(
        [(private_key, chain)], root_certificates=roots, require_client_auth=roots is not None
    )


def _read(path: Path, flag: str) -> bytes:
    try:
        data = path.read_bytes()
    except OSError as err:
        raise ConfigError(f"{flag}: cannot read {path} ({err.strerror or err})") from None
    if b"-----BEGIN " not in data:
        raise ConfigError(f"{flag}: {path} is not a PEM file")
    return data
