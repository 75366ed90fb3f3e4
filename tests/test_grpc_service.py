"""The gRPC service in-process around a model-free engine: wire format, errors, admin, metrics.

The end-to-end tests against the real server process are in tests/test_grpc_e2e.py.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from fake_engine import FakeAdapters, FakeEngine, expected_token
from grpc_helpers import field_bytes, metric, raw_unary, scrape
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from peft import LoraConfig
from peft_adapters import linear_spec, save_adapter
from tiny import build_model, build_tokenizer
from waiting import wait_for

from loraplex.adapters.peft_format import BaseSpec
from loraplex.adapters.store import AdapterStore
from loraplex.clients import AsyncClient, Client
from loraplex.clients import errors as client_errors
from loraplex.proto.v1 import loraplex_pb2 as pb
from loraplex.server.engine.api import AdapterAdmin, AdapterRef
from loraplex.server.serve import RunningServer, ServeConfig, start


@dataclass
class Served:
    server: RunningServer
    engine: FakeEngine
    store: FakeAdapters
    client: Client
    target: str


def serve_fake(**overrides: object) -> Served:
    engine = FakeEngine(max_context=64)
    store = FakeAdapters(known={"a", "b", "c", "broken"}, broken={"broken"})
    server, client = serve_around(engine, store, **overrides)
    return Served(server, engine, store, client, f"127.0.0.1:{server.port}")


def serve_around(
    engine: FakeEngine, store: AdapterAdmin, **overrides: object
) -> tuple[RunningServer, Client]:
    settings = {"port": 0, "metrics_port": 0, "max_new_tokens_limit": 1000, **overrides}
    config = ServeConfig(**settings)  # type: ignore[arg-type]
    server = start(config, engine, store)
    return server, Client(f"127.0.0.1:{server.port}", timeout=30)


@pytest.fixture(scope="module")
def lora_root(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, BaseSpec]:
    """Real PEFT adapters a, b and c for a real AdapterStore, over a tiny llama."""
    model = build_model("llama", build_tokenizer())
    root = tmp_path_factory.mktemp("adapters")
    for seed, name in enumerate("abc"):
        save_adapter(model, LoraConfig(r=4, target_modules=["q_proj"]), root / name, seed)
    return root, linear_spec(model)


@pytest.fixture
def served() -> Iterator[Served]:
    s = serve_fake()
    yield s
    s.client.close()
    if s.engine.gate is not None:
        s.engine.gate.set()
    s.server.drain(grace_s=5)


def want_tokens(engine: FakeEngine, prompt: str, adapter: AdapterRef | None, n: int) -> list[int]:
    ids = engine.encode(prompt)
    return [expected_token(ids, adapter, i) for i in range(n)]


def test_unary_generation_returns_the_engine_tokens(served: Served) -> None:
    result = served.client.generate("hello there", adapter="a", max_new_tokens=7, request_id="r1")
    ref = AdapterRef("a", result.adapter_version)
    assert result.token_ids == want_tokens(served.engine, "hello there", ref, 7)
    assert result.text == served.engine.decode(result.token_ids)
    assert result.finish_reason == "length"
    assert (result.prompt_tokens, result.completion_tokens) == (11, 7)
    assert result.request_id == "r1" and result.adapter_id == "a"
    t = result.timings
    assert 0 <= t.queue_s <= t.time_to_first_token_s <= t.total_s


def test_stream_returns_the_same_as_unary(served: Served) -> None:
    unary = served.client.generate("same text", adapter="b", max_new_tokens=9)
    stream = served.client.stream("same text", adapter="b", max_new_tokens=9)
    chunks = list(stream)
    assert len(chunks) == 9
    assert "".join(c.text for c in chunks) == unary.text
    assert stream.result is not None
    assert stream.result.token_ids == unary.token_ids
    assert stream.result.finish_reason == "length"


def test_async_client_generates_and_streams(served: Served) -> None:
    async def run() -> tuple[str, str]:
        async with AsyncClient(served.target, timeout=30) as client:
            unary = await client.generate("async", max_new_tokens=5)
            stream = client.stream("async", max_new_tokens=5)
            text = "".join([chunk.text async for chunk in stream])
            with pytest.raises(client_errors.NotFound):
                await client.generate("async", adapter="zzz")
            return unary.text, text

    unary_text, stream_text = asyncio.run(run())
    assert unary_text == stream_text and len(unary_text) == 5


INVALID = grpc.StatusCode.INVALID_ARGUMENT

BAD_REQUESTS = [
    ({"adapter": "nope"}, grpc.StatusCode.NOT_FOUND, "nope"),
    ({"adapter": "../a"}, INVALID, "adapter_id"),
    ({"adapter": "a/b"}, grpc.StatusCode.NOT_FOUND, "a/b"),  # a folder below a root, or none
    ({"adapter": "a//b"}, INVALID, "adapter_id"),
    ({"adapter": "file:///etc/passwd"}, INVALID, "adapter_id"),
    ({"adapter": "/etc/passwd"}, INVALID, "adapter_id"),
    ({"prompt": ""}, INVALID, "prompt"),
    ({"prompt": "x" * 500}, INVALID, "prompt"),
    ({"max_new_tokens": 0}, INVALID, "max_new_tokens"),
    ({"max_new_tokens": 10**9}, INVALID, "max_new_tokens"),
    ({"temperature": -0.5}, INVALID, "temperature"),
    ({"top_p": 0.0}, INVALID, "top_p"),
    ({"top_p": 1.5}, INVALID, "top_p"),
    ({"top_k": -1}, INVALID, "top_k"),
    ({"stop": [""]}, INVALID, "stop"),
    ({"scale": float("nan")}, INVALID, "adapter_scale"),
    ({"adapter": "broken"}, grpc.StatusCode.FAILED_PRECONDITION, "broken"),
]


@pytest.mark.parametrize(("options", "code", "names"), BAD_REQUESTS)
def test_bad_requests_get_the_right_status_naming_the_field(
    served: Served, options: dict, code: grpc.StatusCode, names: str
) -> None:
    prompt = options.pop("prompt", "fine")
    for call in (served.client.generate, lambda *a, **k: list(served.client.stream(*a, **k))):
        with pytest.raises(client_errors.LoraplexClientError) as caught:
            call(prompt, **options)
        assert caught.value.code == code
        assert names in caught.value.details
    assert served.client.generate("still serving", max_new_tokens=2).completion_tokens == 2


@pytest.mark.parametrize(
    ("method", "message"),
    [
        ("Generate", field_bytes(1, b"\xff\xfe")),  # prompt
        ("Generate", field_bytes(3, b"a\xc3")),  # adapter_id, truncated UTF-8
        ("Generate", field_bytes(6, b"\xed\xa0\x80")),  # request_id, a UTF-16 surrogate
        ("Generate", field_bytes(5, field_bytes(6, b"\xff"))),  # sampling.stop
        ("Generate", field_bytes(2, field_bytes(2, b"\x80"))),  # messages[0].content
        ("Tokenize", field_bytes(1, b"\xc0\xaf")),  # overlong encoding of '/'
        ("LoadAdapter", field_bytes(1, b"\xff")),
        ("UnloadAdapter", field_bytes(1, b"\xff")),
        ("PinAdapter", field_bytes(1, b"\xff")),
        ("Generate", b"\x0a\x7f"),  # truncated message
    ],
)
def test_unparsable_bytes_on_the_wire_are_invalid_argument(
    served: Served, method: str, message: bytes
) -> None:
    with grpc.insecure_channel(served.target) as channel:
        with pytest.raises(grpc.RpcError) as caught:
            raw_unary(channel, method)(message, timeout=30)
        assert caught.value.code() == INVALID
        assert "request" in caught.value.details()
        # The same bytes with a valid string parse and run.
        ok = pb.GenerateRequest(prompt="ok", sampling=pb.SamplingParams(max_new_tokens=1))
        assert (
            pb.GenerateResponse.FromString(
                raw_unary(channel, "Generate")(ok.SerializeToString(), timeout=30)
            ).usage.completion_tokens
            == 1
        )


def test_invalid_utf8_in_a_stream_request_is_invalid_argument(served: Served) -> None:
    with grpc.insecure_channel(served.target) as channel:
        call = channel.unary_stream(
            "/loraplex.v1.Loraplex/GenerateStream",
            request_serializer=lambda b: b,
            response_deserializer=lambda b: b,
        )
        with pytest.raises(grpc.RpcError) as caught:
            list(call(field_bytes(1, b"\xff"), timeout=30))
        assert caught.value.code() == INVALID


def test_full_queue_answers_resource_exhausted_and_drops_nothing() -> None:
    s = serve_fake(max_queue=2, max_batch_sequences=1)
    s.engine.gate = threading.Event()
    try:
        streams = [s.client.stream("q", max_new_tokens=3) for _ in range(3)]
        iterators = [iter(st) for st in streams]
        # One runs (its step is held at the gate) and two wait: the queue is full.
        wait_for(lambda: s.client.server_info().waiting == 2)
        with pytest.raises(client_errors.ResourceExhausted, match="queue is full"):
            s.client.generate("one too many", max_new_tokens=3)
        s.engine.gate.set()
        for it in iterators:
            assert len(list(it)) == 3
    finally:
        s.engine.gate.set()
        s.client.close()
        s.server.drain(grace_s=5)


def test_deadline_exceeded_frees_the_slot(served: Served) -> None:
    served.engine.gate = threading.Event()
    with pytest.raises(client_errors.DeadlineExceeded):
        served.client.generate("slow", max_new_tokens=5, timeout=0.3)
    served.engine.gate.set()
    wait_for(lambda: served.client.server_info().running == 0)
    assert served.client.generate("next", max_new_tokens=2).completion_tokens == 2
    assert not served.engine.seqs


def test_cancelled_stream_frees_the_slot(served: Served) -> None:
    served.engine.gate = threading.Event()
    stream = served.client.stream("long", adapter="a", max_new_tokens=900)
    wait_for(lambda: served.client.server_info().running == 1)
    stream.cancel()
    # The cancellation crosses the network; once the server has seen it, the step in flight
    # finishes and the next one releases the sequence.
    running = served.server.scheduler.running_requests
    wait_for(lambda: all(h.cancelled for h in running()))
    served.engine.gate.set()
    wait_for(lambda: served.client.server_info().running == 0)
    released = [sid for plan in served.engine.plans for sid in plan.release]
    assert len(released) == 1 and not served.engine.seqs
    assert len(served.engine.plans) <= 3, "the cancelled sequence kept running"
    assert sum(served.store.in_use.values()) == 0
    assert served.client.generate("next", max_new_tokens=2).completion_tokens == 2


def test_engine_failure_is_internal_and_the_server_keeps_serving(served: Served) -> None:
    served.engine.fail_next_step = True
    with pytest.raises(client_errors.ServerError, match="simulated"):
        served.client.generate("boom", max_new_tokens=3)
    assert served.client.generate("fine", max_new_tokens=3).completion_tokens == 3


def test_adapter_admin_calls(served: Served) -> None:
    c = served.client
    first = c.load_adapter("a")
    again = c.load_adapter("a")
    assert again.version == first.version + 1
    assert c.pin_adapter("a").pinned and not c.pin_adapter("a", pinned=False).pinned
    assert [a.adapter_id for a in c.list_adapters()] == ["a"]
    with pytest.raises(client_errors.FailedPrecondition, match="lora_A"):
        c.load_adapter("broken")
    with pytest.raises(client_errors.NotFound):
        c.load_adapter("missing")
    with pytest.raises(client_errors.InvalidArgument, match="adapter_id"):
        c.load_adapter("../../etc")
    c.unload_adapter("a")
    assert c.list_adapters() == []
    with pytest.raises(client_errors.NotFound):
        c.unload_adapter("a")


def test_unload_without_waiting_refuses_while_in_use(served: Served) -> None:
    # Adapter commands run on the loop between steps: slow steps keep the request running.
    served.engine.step_s = 0.05
    stream = served.client.stream("busy", adapter="a", max_new_tokens=40)
    it = iter(stream)
    wait_for(lambda: served.client.server_info().running == 1)
    with pytest.raises(client_errors.FailedPrecondition, match=r"in use|use it"):
        served.client.unload_adapter("a", wait=False)
    assert len(list(it)) == 40
    served.client.unload_adapter("a")


def test_a_request_keeps_its_adapter_version_across_a_replace(served: Served) -> None:
    served.engine.step_s = 0.05  # the load runs between two of the request's steps
    stream = served.client.stream("swap", adapter="a", max_new_tokens=30)
    it = iter(stream)
    wait_for(lambda: served.client.server_info().running == 1)
    old = served.store.versions["a"]
    assert served.client.load_adapter("a").version == old + 1
    assert served.client.server_info().running == 1  # replaced while it ran
    tokens = [t for chunk in it for t in chunk.token_ids]
    assert stream.result is not None and stream.result.adapter_version == old
    assert tokens == want_tokens(served.engine, "swap", AdapterRef("a", old), 30)
    after = served.client.generate("swap", adapter="a", max_new_tokens=4)
    assert after.adapter_version == old + 1
    assert after.token_ids == want_tokens(served.engine, "swap", AdapterRef("a", old + 1), 4)


def test_tokenize_and_server_info(served: Served) -> None:
    assert served.client.tokenize("abc") == served.engine.encode("abc")
    info = served.client.server_info()
    assert info.max_context == 64 and info.max_new_tokens_limit == 1000
    assert not info.chat_template
    with pytest.raises(client_errors.InvalidArgument, match="chat template"):
        served.client.generate(messages=[("user", "hi")])


def test_health_and_reflection(served: Served) -> None:
    assert served.client.health() == "SERVING"
    assert served.client.health("loraplex.v1.Loraplex") == "SERVING"
    with grpc.insecure_channel(served.target) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        reply = next(stub.ServerReflectionInfo(iter([request]), timeout=30))
        names = {s.name for s in reply.list_services_response.service}
    assert {"loraplex.v1.Loraplex", "grpc.health.v1.Health"} <= names


def test_metrics_scrape_shows_counters_moving(served: Served) -> None:
    port = served.server.metrics_port
    before = scrape(port)
    served.client.generate("count me", adapter="a", max_new_tokens=3)
    with pytest.raises(client_errors.NotFound):
        served.client.generate("count me", adapter="nope")
    after = scrape(port)
    assert metric(after, "loraplex_requests_total", adapter="a", status="OK") == (
        metric(before, "loraplex_requests_total", adapter="a", status="OK") + 1
    )
    assert metric(after, "loraplex_requests_total", adapter="other", status="NOT_FOUND") == (
        metric(before, "loraplex_requests_total", adapter="other", status="NOT_FOUND") + 1
    )
    assert metric(after, "loraplex_generated_tokens_total", adapter="a") == (
        metric(before, "loraplex_generated_tokens_total", adapter="a") + 3
    )
    assert metric(after, "loraplex_prompt_tokens_total", adapter="a") == (
        metric(before, "loraplex_prompt_tokens_total", adapter="a") + len("count me")
    )
    for name in ("queue_seconds", "time_to_first_token_seconds", "e2e_latency_seconds"):
        assert metric(after, f"loraplex_{name}_count", adapter="a") == (
            metric(before, f"loraplex_{name}_count", adapter="a") + 1
        )
    assert metric(after, "loraplex_batch_size_count") > metric(before, "loraplex_batch_size_count")
    assert metric(after, "loraplex_resident_adapters") == 1
    assert metric(after, "loraplex_running_requests") == 0


def test_adapter_labels_are_capped() -> None:
    from loraplex.server.metrics import AdapterLabels

    label = AdapterLabels(cap=2)
    assert [label(a) for a in ["x", "y", "z", "x", ""]] == ["x", "y", "other", "x", "base"]


def test_adapter_loads_and_evictions_are_counted(lora_root: tuple[Path, BaseSpec]) -> None:
    root, spec = lora_root
    store = AdapterStore([root], base=spec, max_resident=1)
    server, client = serve_around(FakeEngine(max_context=64), store)
    try:
        before = scrape(server.metrics_port)
        client.load_adapter("a")
        client.generate("lazy load of b evicts a", adapter="b", max_new_tokens=1)
        client.load_adapter("c")  # evicts b
        client.load_adapter("c")  # unchanged: no load
        after = scrape(server.metrics_port)
        loads = metric(after, "loraplex_adapter_load_seconds_count")
        assert loads - metric(before, "loraplex_adapter_load_seconds_count") == 3
        evictions = metric(after, "loraplex_adapter_evictions_total")
        assert evictions - metric(before, "loraplex_adapter_evictions_total") == 2
        assert [a.adapter_id for a in client.list_adapters() if a.resident] == ["c"]
    finally:
        client.close()
        server.drain(grace_s=5)


def test_cold_requests_that_arrive_during_a_step_all_join_the_next(
    lora_root: tuple[Path, BaseSpec],
) -> None:
    """The loop takes them between the step in progress and the next, loading their
    adapters one after another: a burst of cold adapters waits for one step, not one each."""
    root, spec = lora_root
    engine = FakeEngine(max_context=64, gate=threading.Event())
    server, client = serve_around(engine, AdapterStore([root], base=spec))
    try:
        held = client.stream("held step", max_new_tokens=2)
        first = iter(held)
        wait_for(lambda: client.server_info().running == 1)  # its step waits at the gate
        cold = [client.stream(f"cold {name}", adapter=name, max_new_tokens=2) for name in "abc"]
        tails = [iter(stream) for stream in cold]
        time.sleep(0.5)  # each request reaches the loop's inbox long before this
        engine.gate.set()
        assert all(len(list(tail)) == 2 for tail in tails) and len(list(first)) == 2
        together = [p for p in engine.plans if any(r.adapter for r in p.prefill)]
        assert len(together) == 1
        assert sorted(r.adapter.adapter_id for r in together[0].prefill if r.adapter) == list("abc")
    finally:
        engine.gate.set()
        client.close()
        server.drain(grace_s=5)


def test_train_adapter_push_loads_the_new_adapter(
    served: Served, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from loraplex.adapters.trainer.cli import push

    assert push(served.target, tmp_path / "b") == 0
    assert "as b v" in capsys.readouterr().err
    assert next(a for a in served.client.list_adapters() if a.adapter_id == "b").resident
    assert push(served.target, tmp_path / "not-in-any-root") == 1
    message = capsys.readouterr().err
    assert f"saved in {tmp_path / 'not-in-any-root'}" in message
    assert f"Is {tmp_path} one of its --adapter-roots?" in message


def test_generate_command_prints_text_and_logprobs(
    served: Served, capsys: pytest.CaptureFixture[str]
) -> None:
    from loraplex.server.cli import main

    argv = ["generate", "hello there", "--server", served.target, "--adapter", "a"]
    assert main([*argv, "--max-new-tokens", "4", "--logprobs"]) == 0
    out, err = capsys.readouterr()
    ref = AdapterRef("a", served.store.versions.get("a", 0))
    tokens = want_tokens(served.engine, "hello there", ref, 4)
    assert out == served.engine.decode(tokens) + "\n"
    rows = [line.split() for line in err.splitlines() if not line.startswith("[")]
    assert [(int(t), float(lp)) for t, lp in rows] == [(t, -i / 8) for i, t in enumerate(tokens)]
    assert main([*argv, "--max-new-tokens", "4"]) == 0  # without the flag: no table
    assert capsys.readouterr().err.count("\n") == 1
