"""A pinned adapter is unloaded only with force: without it the unload is refused
(FAILED_PRECONDITION over gRPC) and the adapter stays loaded and pinned.

Store-level tests on a real AdapterStore; gRPC-level ones through one loopback server per
store kind (the real store, and the tests' FakeAdapters, which must behave the same) for
the whole module, each test on its own adapter id.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from fake_engine import FakeAdapters, FakeEngine
from peft import LoraConfig
from peft_adapters import linear_spec, save_adapter
from tiny import build_model, build_tokenizer

from loraplex.adapters.errors import AdapterNotFound, AdapterPinned
from loraplex.adapters.peft_format import BaseSpec
from loraplex.adapters.store import AdapterStore
from loraplex.clients import AsyncClient, Client
from loraplex.clients import errors as client_errors
from loraplex.server.engine.api import AdapterAdmin
from loraplex.server.serve import RunningServer, ServeConfig, start
from loraplex.server.status import status_for

IDS = ("refused", "forced", "plain", "unpinned", "async", "cli")


@pytest.fixture(scope="module")
def lora_root(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, BaseSpec]:
    model = build_model("llama", build_tokenizer())
    root = tmp_path_factory.mktemp("adapters")
    for seed, name in enumerate(IDS):
        save_adapter(model, LoraConfig(r=4, target_modules=["q_proj"]), root / name, seed)
    return root, linear_spec(model)


def state(adapters: list, adapter_id: str) -> tuple[bool, bool]:
    """(resident, pinned) as a listing reports them; (False, False) when it is not listed."""
    info = next((a for a in adapters if a.adapter_id == adapter_id), None)
    return (False, False) if info is None else (info.resident, info.pinned)


# ---- the store ----------------------------------------------------------------------------


@pytest.fixture
def store(lora_root: tuple[Path, BaseSpec]) -> AdapterStore:
    root, spec = lora_root
    return AdapterStore([root], base=spec)


def test_store_refuses_to_unload_a_pinned_adapter_and_keeps_it(store: AdapterStore) -> None:
    version = store.pin("refused").version  # pinning loads it
    with pytest.raises(AdapterPinned) as caught:
        store.unload("refused")
    assert caught.value.adapter_id == "refused"
    message = str(caught.value)
    assert "pinned" in message and "unpin" in message and "--force" in message
    assert state(store.list(), "refused") == (True, True)
    ref = store.acquire("refused")  # the same version still serves
    assert ref.version == version
    store.release(ref)


def test_store_refuses_even_without_waiting(store: AdapterStore) -> None:
    store.pin("refused")
    with pytest.raises(AdapterPinned):
        store.unload("refused", wait=False, timeout=0)
    assert state(store.list(), "refused") == (True, True)


def test_store_force_unloads_a_pinned_adapter(store: AdapterStore) -> None:
    store.pin("forced")
    store.unload("forced", force=True)
    assert state(store.list(), "forced") == (False, False)
    with pytest.raises(AdapterNotFound):
        store.unload("forced", force=True)
    assert not store.load("forced").pinned  # the pin went with the unload


def test_store_unloads_unpinned_adapters_as_before(store: AdapterStore) -> None:
    store.load("plain")
    store.unload("plain")
    assert state(store.list(), "plain") == (False, False)
    store.pin("unpinned")
    store.pin("unpinned", pinned=False)
    store.unload("unpinned")
    assert state(store.list(), "unpinned") == (False, False)


def test_a_pinned_refusal_is_failed_precondition() -> None:
    assert status_for(AdapterPinned("x")) == grpc.StatusCode.FAILED_PRECONDITION


# ---- over gRPC ----------------------------------------------------------------------------


@dataclass
class Served:
    server: RunningServer
    client: Client
    target: str


@pytest.fixture(scope="module", params=["store", "fake"])
def served(request: pytest.FixtureRequest, lora_root: tuple[Path, BaseSpec]) -> Iterator[Served]:
    root, spec = lora_root
    adapters: AdapterAdmin = (
        AdapterStore([root], base=spec) if request.param == "store" else FakeAdapters(set(IDS))
    )
    config = ServeConfig(port=0, metrics=False)
    server = start(config, FakeEngine(max_context=64), adapters)
    target = f"127.0.0.1:{server.port}"
    with Client(target, timeout=30) as client:
        yield Served(server, client, target)
    server.drain(grace_s=5)


def test_unloading_a_pinned_adapter_is_failed_precondition(served: Served) -> None:
    c = served.client
    c.load_adapter("refused")
    version = c.pin_adapter("refused").version
    with pytest.raises(client_errors.FailedPrecondition) as caught:
        c.unload_adapter("refused")
    assert "pinned" in caught.value.details and "force" in caught.value.details
    assert state(c.list_adapters(), "refused") == (True, True)
    assert c.generate("still here", adapter="refused", max_new_tokens=2).adapter_version == version


def test_force_unloads_a_pinned_adapter(served: Served) -> None:
    c = served.client
    c.load_adapter("forced")
    c.pin_adapter("forced")
    c.unload_adapter("forced", force=True)
    assert state(c.list_adapters(), "forced") == (False, False)
    with pytest.raises(client_errors.NotFound):
        c.unload_adapter("forced", force=True)


def test_unpinned_adapters_unload_as_before(served: Served) -> None:
    c = served.client
    c.load_adapter("plain")
    c.unload_adapter("plain")
    assert state(c.list_adapters(), "plain") == (False, False)
    c.load_adapter("unpinned")
    c.pin_adapter("unpinned")
    c.pin_adapter("unpinned", pinned=False)
    c.unload_adapter("unpinned")
    assert state(c.list_adapters(), "unpinned") == (False, False)


def test_async_client_unloads_with_force(served: Served) -> None:
    served.client.load_adapter("async")
    served.client.pin_adapter("async")

    async def run() -> None:
        async with AsyncClient(served.target, timeout=30) as client:
            with pytest.raises(client_errors.FailedPrecondition, match="pinned"):
                await client.unload_adapter("async")
            await client.unload_adapter("async", force=True)

    asyncio.run(run())
    assert state(served.client.list_adapters(), "async") == (False, False)


def test_cli_unload_needs_force_for_a_pinned_adapter(
    served: Served, capsys: pytest.CaptureFixture[str]
) -> None:
    from loraplex.server.cli import main

    served.client.load_adapter("cli")
    served.client.pin_adapter("cli")
    argv = ["adapters", "unload", "cli", "--server", served.target]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "pinned" in err and "--force" in err
    assert state(served.client.list_adapters(), "cli") == (True, True)
    assert main([*argv, "--force"]) == 0
    assert capsys.readouterr().out == "unloaded cli\n"
    assert state(served.client.list_adapters(), "cli") == (False, False)
