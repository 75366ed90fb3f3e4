"""Who may do what, over a real gRPC server on loopback: bearer tokens with two roles, TLS and
mutual TLS, the metrics port's own address, and size limits checked before tokenization."""

from __future__ import annotations

import socket
import urllib.error
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
import trustme
from fake_engine import FakeAdapters, FakeEngine
from grpc_helpers import metric, raw_unary, scrape

from loraplex.clients import Client
from loraplex.clients import errors as client_errors
from loraplex.clients.security import Security
from loraplex.server.auth import TOKENS_ENV, load_tokens
from loraplex.server.config import ConfigError
from loraplex.server.serve import RunningServer, ServeConfig, start

ADMIN, GENERATE = "admin-" + "a" * 24, "generate-" + "g" * 24


def serve(**settings: object) -> tuple[RunningServer, FakeEngine]:
    engine = FakeEngine(max_context=64)
    store = FakeAdapters(known={"a"}, versions={"a": 1})
    config = ServeConfig(port=0, metrics_port=0, **settings)  # type: ignore[arg-type]
    return start(config, engine, store), engine


@pytest.fixture
def tokens_file(tmp_path: Path) -> Path:
    path = tmp_path / "tokens"
    path.write_text(f"# role token\nadmin {ADMIN}\ngenerate {GENERATE}  # the web app\n")
    return path


@pytest.fixture
def authed(tokens_file: Path) -> Iterator[str]:
    server, _ = serve(auth_tokens_file=tokens_file)
    yield f"127.0.0.1:{server.port}"
    server.drain(grace_s=5)


CALLS: dict[str, Callable[[Client], object]] = {
    "Generate": lambda c: c.generate("hi", max_new_tokens=2),
    "GenerateStream": lambda c: list(c.stream("hi", max_new_tokens=2)),
    "Tokenize": lambda c: c.tokenize("hi"),
    "GetServerInfo": lambda c: c.server_info(),
    "ListAdapters": lambda c: c.list_adapters(),
    "LoadAdapter": lambda c: c.load_adapter("a"),
    "PinAdapter": lambda c: c.pin_adapter("a", pinned=False),
    "UnloadAdapter": lambda c: c.unload_adapter("a"),
}
ADMIN_CALLS = {"LoadAdapter", "PinAdapter", "UnloadAdapter"}


@pytest.mark.parametrize("method", list(CALLS))
def test_role_matrix(authed: str, method: str) -> None:
    call = CALLS[method]
    for token in (None, "wrong-" + "x" * 20, GENERATE[:-1]):
        security = Security(token=token)
        with (
            Client(authed, timeout=10, security=security) as client,
            pytest.raises(client_errors.Unauthenticated, match="Bearer"),
        ):
            call(client)
    with Client(authed, timeout=10, security=Security(token=GENERATE)) as client:
        if method in ADMIN_CALLS:
            with pytest.raises(client_errors.PermissionDenied, match="admin token"):
                call(client)
        else:
            call(client)
    with Client(authed, timeout=10, security=Security(token=ADMIN)) as client:
        call(client)


def test_health_stays_open_and_unauthenticated_bytes_are_not_parsed(authed: str) -> None:
    with Client(authed, timeout=10, security=Security()) as client:
        assert client.health() == "SERVING"
    with grpc.insecure_channel(authed) as channel, pytest.raises(grpc.RpcError) as caught:
        raw_unary(channel, "Generate")(b"\xff\xff\xff garbage", timeout=10)
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_drain_needs_admin_and_stops_admitting(authed: str) -> None:
    with Client(authed, timeout=10, security=Security(token=GENERATE)) as client:
        with pytest.raises(client_errors.PermissionDenied):
            client.drain()
        client.generate("still open", max_new_tokens=2)
    with Client(authed, timeout=10, security=Security(token=ADMIN)) as client:
        assert client.drain() == 0
        with pytest.raises(client_errors.Unavailable, match=r"draining|shutting down"):
            client.generate("too late", max_new_tokens=2)
        assert client.health() == "NOT_SERVING"


def test_tokens_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(TOKENS_ENV, f"generate {GENERATE}")
    server, _ = serve()
    target = f"127.0.0.1:{server.port}"
    try:
        anonymous = Client(target, timeout=10, security=Security())
        with anonymous, pytest.raises(client_errors.Unauthenticated):
            anonymous.list_adapters()
        monkeypatch.setenv("LORAPLEX_TOKEN", GENERATE)  # the clients' own variable
        with Client(target, timeout=10) as client:
            assert client.list_adapters()
    finally:
        server.drain(grace_s=5)


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("superuser " + "t" * 20, "expected 'admin TOKEN'"),
        ("admin short", "at least 16 characters"),
        ("admin", "expected 'admin TOKEN'"),
    ],
)
def test_bad_token_files_say_what_is_wrong(tmp_path: Path, text: str, problem: str) -> None:
    path = tmp_path / "tokens"
    path.write_text(text)
    with pytest.raises(ConfigError, match=problem):
        load_tokens(path, environ={})
    with pytest.raises(ConfigError, match="cannot read"):
        load_tokens(tmp_path / "missing", environ={})
    assert load_tokens(None, environ={}) == {}  # no tokens: auth is off


# ---- TLS -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A CA with a server and a client certificate, and a stranger CA's client certificate."""
    out = tmp_path_factory.mktemp("pki")
    ca, stranger = trustme.CA(), trustme.CA()
    ca.cert_pem.write_to_path(str(out / "ca.pem"))
    paths = {"ca": out / "ca.pem"}
    for name, cert in (("server", ca.issue_cert("127.0.0.1", "localhost")),
                       ("client", ca.issue_cert("client@example.test")),
                       ("stranger", stranger.issue_cert("client@example.test"))):  # fmt: skip
        cert.cert_chain_pems[0].write_to_path(str(out / f"{name}.pem"))
        cert.private_key_pem.write_to_path(str(out / f"{name}.key"))
        paths[name], paths[f"{name}_key"] = out / f"{name}.pem", out / f"{name}.key"
    return paths


def tls_settings(pki: dict[str, Path], mutual: bool) -> dict[str, object]:
    settings: dict[str, object] = {"tls_cert": pki["server"], "tls_key": pki["server_key"]}
    return settings | ({"tls_client_ca": pki["ca"]} if mutual else {})


def test_tls(pki: dict[str, Path]) -> None:
    server, _ = serve(**tls_settings(pki, mutual=False))
    target = f"127.0.0.1:{server.port}"
    try:
        with Client(target, timeout=10, security=Security(tls_ca=pki["ca"])) as client:
            assert client.generate("over tls", max_new_tokens=2).completion_tokens == 2
        plaintext = Client(target, timeout=5, security=Security())
        with plaintext, pytest.raises(client_errors.Unavailable):
            plaintext.list_adapters()
    finally:
        server.drain(grace_s=5)


def test_mutual_tls_with_tokens(pki: dict[str, Path], tokens_file: Path) -> None:
    server, _ = serve(**tls_settings(pki, mutual=True), auth_tokens_file=tokens_file)
    target = f"127.0.0.1:{server.port}"
    signed = Security(GENERATE, tls_ca=pki["ca"], tls_cert=pki["client"],
                      tls_key=pki["client_key"])  # fmt: skip
    stranger = Security(GENERATE, tls_ca=pki["ca"], tls_cert=pki["stranger"],
                        tls_key=pki["stranger_key"])  # fmt: skip
    try:
        with Client(target, timeout=10, security=signed) as client:
            assert client.list_adapters()
        for refused in (Security(GENERATE, tls_ca=pki["ca"]), stranger):
            turned_away = Client(target, timeout=5, security=refused)
            with turned_away, pytest.raises(client_errors.Unavailable):
                turned_away.list_adapters()
        no_token = Security(tls_ca=pki["ca"], tls_cert=pki["client"], tls_key=pki["client_key"])
        unsigned = Client(target, timeout=10, security=no_token)
        with unsigned, pytest.raises(client_errors.Unauthenticated):
            unsigned.list_adapters()
    finally:
        server.drain(grace_s=5)


def test_bad_tls_settings_say_what_to_do(pki: dict[str, Path], tmp_path: Path) -> None:
    not_pem = tmp_path / "cert.txt"
    not_pem.write_text("hello")
    cases = [
        ({"tls_cert": pki["server"]}, "give both or neither"),
        ({"tls_client_ca": pki["ca"]}, "needs --tls-cert and --tls-key"),
        ({"tls_cert": not_pem, "tls_key": pki["server_key"]}, "not a PEM file"),
        ({"tls_cert": tmp_path / "missing.pem", "tls_key": pki["server_key"]}, "cannot read"),
    ]
    for settings, problem in cases:
        with pytest.raises(ConfigError, match=problem):
            serve(**settings)


# ---- the metrics address and size limits -------------------------------------------------


def test_metrics_bind_their_own_address() -> None:
    server, _ = serve(metrics_host="127.0.0.2")
    try:
        assert (
            metric(scrape(server.metrics_port, host="127.0.0.2"), "loraplex_waiting_requests") == 0
        )
        with pytest.raises(urllib.error.URLError):
            scrape(server.metrics_port, host="127.0.0.1")
        with socket.create_connection(("127.0.0.1", server.port), timeout=5):
            pass  # the gRPC port keeps --host
    finally:
        server.drain(grace_s=5)
    assert ServeConfig().metrics_host == "127.0.0.1"


def test_limits_apply_before_tokenization() -> None:
    server, engine = serve(max_prompt_chars=50, max_message_bytes=64 << 10)
    target = f"127.0.0.1:{server.port}"
    try:
        with Client(target, timeout=10) as client:
            encoded = engine.encode_calls
            with pytest.raises(client_errors.InvalidArgument, match=r"prompt.*50 characters"):
                client.generate("x" * 51, max_new_tokens=2)
            with pytest.raises(client_errors.InvalidArgument, match="50 characters"):
                client.tokenize("x" * 51)
            assert engine.encode_calls == encoded  # refused before the tokenizer saw it
            with pytest.raises(client_errors.ResourceExhausted):
                client.generate("y" * (65 << 10), max_new_tokens=2)
            assert client.generate("x" * 50, max_new_tokens=2).completion_tokens == 2
    finally:
        server.drain(grace_s=5)
