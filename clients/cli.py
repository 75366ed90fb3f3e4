"""The client side of the `loraplex` command: `generate` and `adapters list|load|unload|pin`."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import Field

from loraplex.server.config import CommandConfig, add_config_arguments, config_from_args

if TYPE_CHECKING:
    from loraplex.clients.client import Client

DEFAULT_SERVER = "127.0.0.1:50051"


class ClientConfig(CommandConfig):
    server: str = Field(default=DEFAULT_SERVER, description="address of the loraplex server")
    timeout: float | None = Field(default=None, gt=0, description="deadline in seconds")
    token_file: Path | None = Field(
        default=None, description="file holding the bearer token (default: $LORAPLEX_TOKEN)"
    )
    tls: bool = Field(default=False, description="use TLS, trusting the system's CAs")
    tls_ca: Path | None = Field(default=None, description="CA certificate to trust (implies TLS)")
    tls_cert: Path | None = Field(default=None, description="client certificate (mutual TLS)")
    tls_key: Path | None = Field(default=None, description="client private key (mutual TLS)")

    def client(self) -> Client:
        from loraplex.clients.client import Client
        from loraplex.clients.security import Security, read_token

        security = Security(read_token(self.token_file), self.tls, self.tls_ca, self.tls_cert,
                            self.tls_key)  # fmt: skip
        return Client(self.server, self.timeout, security)


class GenerateConfig(ClientConfig):
    """`loraplex generate`: flags > LORAPLEX_* > the [generate] table of --config."""

    toml_table: ClassVar[str] = "generate"

    prompt: str = Field(default="", description="the prompt")
    adapter: str = Field(default="", description="adapter id (default: the base model)")
    scale: float | None = Field(default=None, description="adapter scale (default 1)")
    stream: bool = Field(default=False, description="print tokens as they arrive")
    max_new_tokens: int | None = Field(default=None, description="tokens to generate (64)")
    temperature: float | None = Field(default=None, description="0 is greedy (default)")
    top_k: int | None = Field(default=None, description="sample among the k likeliest (0: off)")
    top_p: float | None = Field(default=None, description="nucleus sampling mass in (0, 1]")
    seed: int | None = Field(default=None, description="seed for reproducible sampling")
    stop: list[str] = Field(default_factory=list, description="stop sequence (repeatable)")
    logprobs: bool = Field(
        default=False, description="also print each token's id and log-probability (to stderr)"
    )
    json_schema: Path | None = Field(
        default=None, description="a JSON schema file the output must validate against"
    )
    json_object: bool = Field(default=False, description="the output is one JSON object")
    regex: str | None = Field(default=None, description="a regex the output matches in full")
    lark: Path | None = Field(default=None, description="a Lark grammar file for the output")


class AdaptersConfig(ClientConfig):
    """`loraplex adapters ...`: flags > LORAPLEX_* > the [adapters] table of --config."""

    toml_table: ClassVar[str] = "adapters"

    adapter_id: str = Field(default="", description="adapter id")
    wait: bool = Field(
        default=True, description="unload: wait for in-flight requests (--no-wait refuses)"
    )
    force: bool = Field(default=False, description="unload: unload even if pinned")
    unpin: bool = Field(default=False, description="pin: unpin instead")


def _failing(action: Callable[[Any], int]) -> Callable[[Any], int]:
    """Print client errors as one line; exit status 1."""
    from loraplex.clients.errors import LoraplexClientError

    def run(config: Any) -> int:
        try:
            return action(config)
        except LoraplexClientError as err:
            print(f"loraplex: error: {err}", file=sys.stderr)
            return 1

    return run


GENERATE_OPTIONS = ("adapter", "scale", "max_new_tokens", "temperature", "top_k", "top_p", "seed",
                    "logprobs")  # fmt: skip


def _output_format(config: GenerateConfig) -> dict[str, Any]:
    """The structured-output options, files read."""
    return {
        "json_schema": config.json_schema.read_text() if config.json_schema else None,
        "json_object": config.json_object,
        "regex": config.regex,
        "lark": config.lark.read_text() if config.lark else None,
    }


def _generate(config: GenerateConfig) -> int:
    options = {k: getattr(config, k) for k in GENERATE_OPTIONS} | _output_format(config)
    with config.client() as client:
        if not config.stream:
            result = client.generate(config.prompt, stop=config.stop, **options)
            print(result.text)
        else:
            stream = client.stream(config.prompt, stop=config.stop, **options)
            for chunk in stream:
                print(chunk.text, end="", flush=True)
            print()
            result = stream.result  # type: ignore[assignment]
    if result is not None:
        if config.logprobs:
            for token_id, logprob in zip(result.token_ids, result.logprobs, strict=True):
                print(f"{token_id:>8} {logprob:10.4f}", file=sys.stderr)
        print(
            f"[{result.finish_reason}; {result.completion_tokens} tokens; adapter "
            f"{result.adapter_id or 'base'} v{result.adapter_version}; "
            f"{result.timings.total_s:.2f}s]",
            file=sys.stderr,
        )
    return 0


def add_generate_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "generate",
        help="generate text through a running server",
        description="Send one prompt to a loraplex server and print the completion.",
    )
    add_config_arguments(parser, GenerateConfig, positional="prompt")
    parser.set_defaults(run=lambda a: _failing(_generate)(config_from_args(GenerateConfig, a)))


def _list(config: AdaptersConfig) -> int:
    with config.client() as client:
        adapters = client.list_adapters()
    print(f"{'ADAPTER':30} {'VER':>4} {'TYPE':5} {'RANK':>4} {'BYTES':>10} STATE")
    for a in adapters:
        state = (
            ", ".join(
                s
                for s, on in (
                    ("resident", a.resident),
                    ("pinned", a.pinned),
                    (f"{a.in_use} in use", a.in_use),
                )
                if on
            )
            or "on disk"
        )
        print(
            f"{a.adapter_id:30} {a.version:>4} {a.peft_type:5} {a.rank:>4} {a.nbytes:>10} {state}"
        )
    return 0


def _load(config: AdaptersConfig) -> int:
    with config.client() as client:
        a = client.load_adapter(config.adapter_id)
    print(f"loaded {a.adapter_id} version {a.version} ({a.peft_type}, rank {a.rank})")
    return 0


def _unload(config: AdaptersConfig) -> int:
    with config.client() as client:
        client.unload_adapter(config.adapter_id, wait=config.wait, force=config.force)
    print(f"unloaded {config.adapter_id}")
    return 0


def _pin(config: AdaptersConfig) -> int:
    with config.client() as client:
        a = client.pin_adapter(config.adapter_id, pinned=not config.unpin)
    print(f"{a.adapter_id} version {a.version} is {'pinned' if a.pinned else 'not pinned'}")
    return 0


ADAPTER_ACTIONS: dict[str, tuple[Callable[[AdaptersConfig], int], str]] = {
    "list": (_list, "list the adapters the server knows"),
    "load": (_load, "load an adapter, or a newer copy of a loaded one"),
    "unload": (
        _unload,
        "unload an adapter once its in-flight requests finish (a pinned one only with --force)",
    ),
    "pin": (_pin, "keep an adapter resident (--unpin releases it)"),
}


def add_adapters_parser(commands: argparse._SubParsersAction) -> argparse._SubParsersAction:
    """Add `adapters ACTION`; returns its actions so other modules can add offline tools."""
    parser = commands.add_parser(
        "adapters", help="list, load, unload or pin adapters on a running server"
    )
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    for name, (action, text) in ADAPTER_ACTIONS.items():
        sub = actions.add_parser(name, help=text, description=text)
        positional = None if name == "list" else "adapter_id"
        add_config_arguments(sub, AdaptersConfig, positional=positional)
        sub.set_defaults(
            run=lambda a, act=action: _failing(act)(config_from_args(AdaptersConfig, a))
        )
    return actions


def _drain(config: ClientConfig) -> int:
    with config.client() as client:
        in_flight = client.drain()
    print(f"draining: {in_flight} requests finish, then the server stops")
    return 0


def add_drain_parser(commands: argparse._SubParsersAction) -> None:
    text = "stop a running server gracefully: refuse new requests, finish the running ones"
    parser = commands.add_parser("drain", help=text, description=text + " (admin token).")
    add_config_arguments(parser, ClientConfig)
    parser.set_defaults(run=lambda a: _failing(_drain)(config_from_args(ClientConfig, a)))
