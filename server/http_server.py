"""Uvicorn on a thread of its own, serving the OpenAI-compatible app beside the gRPC server,
on the same host and with the same TLS files."""

from __future__ import annotations

import socket
import ssl
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import uvicorn
from starlette.types import ASGIApp

from loraplex.server.config import ConfigError

START_TIMEOUT_S = 30.0
GRACEFUL_SHUTDOWN_S = 5  # by then the scheduler has ended every request


@dataclass(frozen=True)
class TlsFiles:
    cert: Path | None = None
    key: Path | None = None
    client_ca: Path | None = None  # require client certificates it signed


@dataclass
class HttpServer:
    server: uvicorn.Server
    thread: threading.Thread
    port: int

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join()


def start_http(app: ASGIApp, host: str, port: int, tls: TlsFiles) -> HttpServer:
    """Serve `app` on host:port (0: a free port); ConfigError when it cannot listen."""
    config = uvicorn.Config(
        app, log_level="warning", access_log=False, lifespan="off",
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
        ssl_certfile=tls.cert, ssl_keyfile=tls.key, ssl_ca_certs=tls.client_ca,
        ssl_cert_reqs=ssl.CERT_REQUIRED if tls.client_ca else ssl.CERT_NONE,
    )  # fmt: skip
    try:
        config.load()  # reads the TLS files here, so a bad one fails the start
    except (OSError, ssl.SSLError) as err:
        raise ConfigError(f"--tls-cert/--tls-key for --http-port: {err}") from None
    sock = _listen(host, port)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="http")
    thread.daemon = True
    thread.start()
    deadline = time.monotonic() + START_TIMEOUT_S
    while not server.started and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.01)
    if not server.started:
        server.should_exit = True
        raise ConfigError(f"--http-port: the HTTP server did not start on {host}:{port}")
    return HttpServer(server, thread, int(sock.getsockname()[1]))


def _listen(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError as err:
        sock.close()
        raise ConfigError(f"--http-port: cannot listen on {host}:{port} ({err})") from None
    sock.set_inheritable(True)
    return sock
