"""End to end: the real `loraplex serve` process driven over loopback gRPC, once per backend
(one parametrized suite): hf on a tiny model, gguf on the real default GGUF base.

Token oracle: the same backend's engine run in this process on one request at a time. A
served request may part from it only at a near tie (`Backend.drift`), since the server batches
it with others and llama.cpp rounds a batch otherwise than one row.
"""

from __future__ import annotations

import re
import shutil
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest
from bad_inputs import BAD_GENERATIONS, EDITED_COPIES, write_bad_adapters
from engine_driver import Result
from engine_driver import run as engine_run
from gguf_oracle import DRIFT
from grpc_helpers import field_bytes, metric, raw_unary, scrape
from near_tie import assert_equal_until_a_near_tie
from peft_adapters import ADAPTER_CONFIGS, save_adapter
from server_process import ServerProcess
from transformers import AutoModelForCausalLM
from waiting import wait_for

from loraplex.adapters.store import AdapterStore
from loraplex.clients import Client
from loraplex.clients import errors as client_errors
from loraplex.clients.messages import Generation
from loraplex.server.engine.api import AdapterRef, Engine, SamplingParams, SequenceRequest
from loraplex.server.engine.config import EngineConfig
from loraplex.server.engine.gguf_runtime import RuntimeConfig
from loraplex.server.engine.gguf_serving import AdapterLimits, build_gguf_backend
from loraplex.server.engine.hf import HFEngine
from loraplex.server.models import ModelSource

ADAPTERS = {"lora": "lora-qv-r4", "rslora": "rslora-all-r8", "vera": "vera-r16"}
PROMPTS = ["The capital of France", "hello world", "Question: what is", "The quick brown"]
COMMON_ARGS = ["--max-new-tokens-limit", "1000", "--log-level", "warning"]


@dataclass
class Backend:
    """One backend as the suite runs it: serve flags, and its engine in this process."""

    name: str
    serve_args: list[str]  # --model and backend flags
    engine: Engine
    store: AdapterStore
    adapter_root: Path
    drift: float  # how far a batched row's logprobs may stray from the row alone
    close: Callable[[], None] = lambda: None


def write_adapters(checkpoint: Path, root: Path) -> None:
    """Real PEFT adapters for the base, a second weight set for "lora" (lora-v2), bad ones."""
    base = AutoModelForCausalLM.from_pretrained(checkpoint)
    # Large enough random weights that every adapter changes the greedy output.
    for seed, (name, config_name) in enumerate(ADAPTERS.items()):
        save_adapter(base, ADAPTER_CONFIGS[config_name], root / name, seed=seed + 1, std=1.0)
    save_adapter(base, ADAPTER_CONFIGS["lora-qv-r4"], root / "lora-v2", seed=99, std=1.0)
    write_bad_adapters(root, root / "lora")


def hf_backend(checkpoint: Path, root: Path) -> Backend:
    # The tiny llama: its greedy output depends on the adapters (the tiny gemma mostly
    # repeats the last prompt token whatever the adapter).
    config = EngineConfig(checkpoint=checkpoint, quantization="fp32", adapter_roots=[root])
    engine = HFEngine.from_config(config)
    args = ["--model", str(checkpoint), "--quantization", "fp32"]
    return Backend("hf", args, engine, engine.store, root, drift=1e-4)


def gguf_backend(model: ModelSource, root: Path, cache: Path) -> Backend:
    limits = AdapterLimits([root], max_rank=64, max_resident=64, max_resident_bytes=1 << 30)
    engine, store = build_gguf_backend(model.path, model.sha256, limits, RuntimeConfig(), cache)
    args = ["--model", str(model.path)]
    return Backend("gguf", args, engine, store, root, drift=DRIFT, close=engine.close)


@pytest.fixture(
    scope="module",
    params=["hf", pytest.param("gguf", marks=[pytest.mark.integration, pytest.mark.gguf])],
)
def backend(
    request: pytest.FixtureRequest,
    tiny_checkpoints: dict[str, Path],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Backend]:
    root = tmp_path_factory.mktemp("adapters")
    if request.param == "hf":
        write_adapters(tiny_checkpoints["llama"], root)
        yield hf_backend(tiny_checkpoints["llama"], root)
        return
    model: ModelSource = request.getfixturevalue("real_model")
    write_adapters(request.getfixturevalue("real_checkpoint"), root)
    backend = gguf_backend(model, root, tmp_path_factory.mktemp("gguf-cache"))
    yield backend
    backend.close()


def alone(backend: Backend, prompt: str, adapter: str, n: int) -> Result:
    """Greedy tokens and their logprobs from the backend's engine on this request by itself."""
    store, engine = backend.store, backend.engine
    ref: AdapterRef | None = store.acquire(adapter) if adapter else None
    try:
        params = SamplingParams(n, logprobs=True)
        request = SequenceRequest("oracle", engine.encode(prompt), params, ref)
        return engine_run(engine, {0: [request]})["oracle"]
    finally:
        if ref is not None:
            store.release(ref)


def assert_like_alone(backend: Backend, served: Generation, expected: Result) -> None:
    assert_equal_until_a_near_tie(
        served.token_ids, served.logprobs, expected.tokens, expected.logprobs, backend.drift
    )


@pytest.fixture(scope="module")
def server(backend: Backend, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    log = tmp_path_factory.mktemp("logs") / "server.log"
    args = [*backend.serve_args, "--adapter-roots", str(backend.adapter_root), *COMMON_ARGS]
    args += ["--preload-adapters", "lora", "--preload-adapters", "vera"]
    args += ["--cache-dir", str(log.parent), "--log-level", "info"]  # start-up facts logged
    proc = ServerProcess(args, log)
    yield proc
    proc.stop()


@pytest.fixture
def client(server: ServerProcess) -> Iterator[Client]:
    with Client(server.target, timeout=120) as c:
        yield c


def test_server_info_reports_the_quantization_really_served(
    client: Client, backend: Backend
) -> None:
    # The hf suite serves fp32; the gguf suite the default Q4_K_M file.
    assert client.server_info().quantization == {"hf": "fp32", "gguf": "Q4_K_M"}[backend.name]


def test_health_serving_and_preloaded_adapters(client: Client) -> None:
    assert client.health() == "SERVING"
    resident = {a.adapter_id for a in client.list_adapters() if a.resident}
    assert {"lora", "vera"} <= resident


def test_the_server_exempts_its_start_up_objects_from_garbage_collection(
    server: ServerProcess,
) -> None:
    found = re.search(r"(\d+) start-up objects exempt", server.log_path.read_text(errors="replace"))
    assert found and int(found[1]) > 100_000  # importing torch alone makes ~445,000


def test_concurrent_clients_on_different_adapters_match_the_engine_alone(
    client: Client, backend: Backend
) -> None:
    jobs = [(p, a) for p in PROMPTS[:2] for a in ["", "lora", "rslora", "vera"]]
    with ThreadPoolExecutor(len(jobs)) as pool:
        results = list(
            pool.map(
                lambda j: client.generate(j[0], adapter=j[1], max_new_tokens=8, logprobs=True),
                jobs,
            )
        )
    for (prompt, adapter), result in zip(jobs, results, strict=True):
        assert_like_alone(backend, result, alone(backend, prompt, adapter, 8))
    # Adapters really change the answer, so the comparison above can tell them apart.
    for i in range(0, len(results), 4):
        assert len({tuple(r.token_ids) for r in results[i : i + 4]}) == 4


def test_stream_returns_the_same_text_and_logprobs_as_unary(
    client: Client, backend: Backend
) -> None:
    for adapter in ("", "rslora"):
        unary = client.generate(PROMPTS[2], adapter=adapter, max_new_tokens=10, logprobs=True)
        stream = client.stream(PROMPTS[2], adapter=adapter, max_new_tokens=10, logprobs=True)
        chunks = list(stream)
        assert "".join(chunk.text for chunk in chunks) == unary.text
        assert stream.result is not None and stream.result.token_ids == unary.token_ids
        assert [lp for chunk in chunks for lp in chunk.logprobs] == stream.result.logprobs
        assert len(unary.logprobs) == len(unary.token_ids)
        np.testing.assert_allclose(stream.result.logprobs, unary.logprobs, atol=backend.drift)
        assert all(lp <= 0 for lp in unary.logprobs)


def test_load_unload_replace_during_streaming_cause_no_failures(
    client: Client, backend: Backend
) -> None:
    adapter_root = backend.adapter_root
    swap_root = adapter_root / "swap"
    shutil.rmtree(swap_root, ignore_errors=True)
    shutil.copytree(adapter_root / "lora", swap_root)
    first = client.load_adapter("swap")
    results: list[Generation] = []
    failures: list[BaseException] = []
    stop = threading.Event()

    def traffic(adapter: str) -> None:
        while not stop.is_set():
            try:
                stream = client.stream(PROMPTS[0], adapter=adapter, max_new_tokens=6, logprobs=True)
                for _ in stream:
                    pass
                if adapter == "swap":
                    assert stream.result is not None
                    results.append(stream.result)
            except BaseException as err:
                failures.append(err)

    # One stream per adapter: on gguf each adapter group is then one row per decode call, as
    # alone; two rows of one big random adapter part from their solo runs by up to 0.5 logprob
    threads = [threading.Thread(target=traffic, args=(a,)) for a in ("swap", "lora", "vera")]
    for t in threads:
        t.start()
    try:
        wait_for(lambda: len(results) >= 2)
        shutil.rmtree(swap_root)
        shutil.copytree(adapter_root / "lora-v2", swap_root)
        replaced = client.load_adapter("swap")  # a newer copy under the same id
        assert replaced.version > first.version
        client.unload_adapter("vera")  # waits for its in-flight requests
        client.load_adapter("rslora")
        wait_for(lambda: any(r.adapter_version == replaced.version for r in results))
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert failures == []
    want = {
        first.version: alone(backend, PROMPTS[0], "lora", 6),
        replaced.version: alone(backend, PROMPTS[0], "lora-v2", 6),
    }
    assert want[first.version].tokens != want[replaced.version].tokens
    for result in results:
        assert_like_alone(backend, result, want[result.adapter_version])


def test_a_hostile_burst_leaves_healthy_requests_as_they_are_alone(
    client: Client, backend: Backend
) -> None:
    """Healthy requests (adapters and base) sent at once with an adapter refused for overflow,
    a request whose adapter_scale overflows its activations, and extreme sampling values:
    each healthy request is served as it is alone, each hostile one ends alone."""
    healthy = [(p, a) for p in PROMPTS[:2] for a in ["", "lora", "rslora", "vera"]]
    hostile: list[dict] = [
        {"adapter": "bad-overflow"},
        {"adapter": "rslora", "scale": 1e30},
        {"temperature": 1e-38},
        {"temperature": 1.0, "repetition_penalty": 1e-38, "seed": 5},
    ]

    def send(options: dict) -> Generation | client_errors.LoraplexClientError:
        try:
            return client.generate(max_new_tokens=8, logprobs=True, **options)
        except client_errors.LoraplexClientError as err:
            return err

    jobs = [{"prompt": p, "adapter": a} for p, a in healthy]
    jobs += [{"prompt": PROMPTS[2], **h} for h in hostile]
    with ThreadPoolExecutor(len(jobs)) as pool:
        results = list(pool.map(send, jobs))
    for (prompt, adapter), result in zip(healthy, results, strict=False):
        assert isinstance(result, Generation), result
        assert_like_alone(backend, result, alone(backend, prompt, adapter, 8))
    refused, overflowed, tiny_t, tiny_penalty = results[len(healthy) :]
    assert isinstance(refused, client_errors.FailedPrecondition)
    assert "overflow" in refused.details
    assert isinstance(overflowed, client_errors.LoraplexClientError)
    assert overflowed.code == grpc.StatusCode.INTERNAL and "not finite" in overflowed.details
    assert isinstance(tiny_t, Generation)  # a tiny temperature samples the argmax
    assert_like_alone(backend, tiny_t, alone(backend, PROMPTS[2], "", 8))
    assert isinstance(tiny_penalty, Generation) and tiny_penalty.completion_tokens == 8
    assert all(np.isfinite(tiny_penalty.logprobs)) and client.health() == "SERVING"


@pytest.mark.parametrize(("options", "code", "named"), BAD_GENERATIONS)
def test_bad_generation_requests(
    client: Client, options: dict, code: grpc.StatusCode, named: str
) -> None:
    options = dict(options)
    prompt = options.pop("prompt", "hello")
    with pytest.raises(client_errors.LoraplexClientError) as caught:
        client.generate(prompt, **options)
    assert caught.value.code == code
    assert named in caught.value.details
    assert client.generate("still serving", max_new_tokens=2).completion_tokens == 2


@pytest.mark.parametrize("adapter_id", ["bad-shapes", "bad-arch", "bad-pickle", *EDITED_COPIES])
def test_loading_an_invalid_adapter_is_refused(client: Client, adapter_id: str) -> None:
    with pytest.raises(client_errors.FailedPrecondition) as caught:
        client.load_adapter(adapter_id)
    assert adapter_id in caught.value.details
    assert client.health() == "SERVING"


@pytest.mark.parametrize(
    ("method", "message"),
    [
        ("Generate", field_bytes(1, b"caf\xc3")),
        ("Generate", field_bytes(3, b"\xff")),
        ("Generate", field_bytes(5, field_bytes(6, b"\xfe"))),
        ("Tokenize", field_bytes(1, b"\xed\xa0\x80")),
        ("LoadAdapter", field_bytes(1, b"\x80")),
    ],
)
def test_invalid_utf8_on_the_wire(
    server: ServerProcess, client: Client, method: str, message: bytes
) -> None:
    with grpc.insecure_channel(server.target) as channel, pytest.raises(grpc.RpcError) as caught:
        raw_unary(channel, method)(message, timeout=60)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "UTF-8" in caught.value.details()
    assert client.generate("still serving", max_new_tokens=2).completion_tokens == 2


def test_metrics_scrape_shows_counters_moving(server: ServerProcess, client: Client) -> None:
    before = scrape(server.metrics_port)
    client.generate("count", adapter="lora", max_new_tokens=4)
    after = scrape(server.metrics_port)

    def moved(name: str, **labels: str) -> float:
        return metric(after, name, **labels) - metric(before, name, **labels)

    assert moved("loraplex_requests_total", adapter="lora", status="OK") == 1
    assert moved("loraplex_generated_tokens_total", adapter="lora") == 4
    assert moved("loraplex_prompt_tokens_total", adapter="lora") == len(client.tokenize("count"))
    assert moved("loraplex_time_to_first_token_seconds_count", adapter="lora") == 1
    assert moved("loraplex_time_per_output_token_seconds_count", adapter="lora") == 1
    assert moved("loraplex_batch_size_count") >= 4
    assert metric(after, "loraplex_resident_adapters") >= 1
    assert metric(after, "loraplex_resident_adapter_bytes") > 0


@pytest.fixture
def tight_server(backend: Backend, tmp_path: Path) -> Iterator[ServerProcess]:
    """One running sequence and one waiting request at most."""
    args = [*backend.serve_args, *COMMON_ARGS, "--cache-dir", str(tmp_path)]
    args += ["--max-batch-sequences", "1", "--max-queue", "1", "--grace-period", "120"]
    proc = ServerProcess(args, tmp_path / "server.log")
    yield proc
    proc.stop()


def test_full_queue_cancellation_and_deadlines(tight_server: ServerProcess) -> None:
    with Client(tight_server.target, timeout=120) as client:
        blocker = client.stream(PROMPTS[0], max_new_tokens=500)
        blocker_chunks = iter(blocker)
        next(blocker_chunks)  # running now
        queued = client.stream(PROMPTS[1], max_new_tokens=3)
        wait_for(lambda: client.server_info().waiting == 1)
        with pytest.raises(client_errors.ResourceExhausted, match="queue is full"):
            client.generate(PROMPTS[2], max_new_tokens=3)
        # Cancelling the blocker frees its slot: the queued request is admitted and finishes.
        blocker.cancel()
        assert len([t for c in queued for t in c.token_ids]) == 3
        wait_for(lambda: client.server_info().running == 0)
        samples = scrape(tight_server.metrics_port)
        assert metric(samples, "loraplex_requests_total", adapter="base", status="CANCELLED") == 1
        # A deadline that passes while waiting behind a long request ends it, freeing the queue.
        blocker = client.stream(PROMPTS[0], max_new_tokens=500)
        next(iter(blocker))
        with pytest.raises(client_errors.DeadlineExceeded):
            client.generate(
                PROMPTS[1], max_new_tokens=3, timeout=0.05
            )  # well inside the blocker run
        wait_for(lambda: client.server_info().waiting == 0)
        blocker.cancel()
        assert client.generate(PROMPTS[1], max_new_tokens=3).completion_tokens == 3


def test_sigterm_drains_in_flight_requests_and_exits_0(tight_server: ServerProcess) -> None:
    with Client(tight_server.target, timeout=120) as client:
        stream = client.stream(PROMPTS[0], max_new_tokens=60)
        chunks = iter(stream)
        first = next(chunks)
        tight_server.terminate()
        wait_for(lambda: _health_or_gone(client) != "SERVING")
        with pytest.raises(client_errors.Unavailable):
            client.generate(PROMPTS[1], max_new_tokens=2)  # no longer admitted
        rest = list(chunks)
        assert stream.result is not None and stream.result.finish_reason == "length"
        assert len(first.token_ids) + sum(len(c.token_ids) for c in rest) == 60
    assert tight_server.wait(timeout=120) == 0
    assert "loraplex: stopped (all requests finished)" in tight_server.log()


def _health_or_gone(client: Client) -> str:
    try:
        return client.health()
    except client_errors.Unavailable:
        return "GONE"
