"""The OpenAI-compatible HTTP API on a real loopback server around the model-free engine,
driven by the official `openai` client: shapes, streaming, errors, auth, cancellation, and
the same tokens as the gRPC path.

The real models' chat templating through both backends is in
tests/integration/test_http_chat_real.py.
"""

from __future__ import annotations

import json
import ssl
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx2
import jinja2
import openai
import pytest
import trustme
from fake_engine import FakeAdapters, FakeEngine, expected_token
from grpc_helpers import metric, scrape
from waiting import wait_for

from loraplex.clients import Client
from loraplex.server.chat_template import TemplateChat
from loraplex.server.engine.api import AdapterRef
from loraplex.server.serve import RunningServer, ServeConfig, start

TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{{ m['role'] }} says {{ m['content'] }}\n"
    "{% endfor %}{% if add_generation_prompt %}assistant says{% endif %}"
)
SPECIAL = {"bos_token": "<bos>", "eos_token": "<eos>"}
GENERATE_TOKEN = "generate-token-0123456789"
ADMIN_TOKEN = "admin-token-0123456789abc"
BASE = ServeConfig.model_fields["model"].default


@dataclass
class Served:
    server: RunningServer
    engine: FakeEngine
    store: FakeAdapters
    client: openai.OpenAI
    url: str  # the HTTP API's root

    def stop(self) -> None:
        self.client.close()
        if self.engine.gate is not None:
            self.engine.gate.set()
        self.server.drain(grace_s=5)


def serve_http(
    root: Path | None = None, api_key: str = "none", max_context: int = 64, **overrides: object
) -> Served:
    engine = FakeEngine(max_context=max_context)
    store = FakeAdapters(known={"a", "b", "c", "broken"}, broken={"broken"})
    settings = {"port": 0, "metrics_port": 0, "http_port": 0, "max_new_tokens_limit": 1000,
                "adapter_roots": [root] if root else [], **overrides}  # fmt: skip
    chat = TemplateChat(TEMPLATE, SPECIAL, bos_added=False)
    server = start(ServeConfig(**settings), engine, store, chat)  # type: ignore[arg-type]
    url = f"http://127.0.0.1:{server.http_port}"
    client = openai.OpenAI(base_url=f"{url}/v1", api_key=api_key, max_retries=0, timeout=30)
    return Served(server, engine, store, client, url)


@pytest.fixture(scope="module")
def adapter_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A root holding adapter b's folder, for the lora_path check (the fake store reads none)."""
    root = tmp_path_factory.mktemp("roots")
    (root / "b").mkdir()
    (root / "b" / "adapter_config.json").write_text("{}")
    return root


@pytest.fixture(scope="module")
def served(adapter_root: Path) -> Iterator[Served]:
    s = serve_http(adapter_root)
    yield s
    s.stop()


@pytest.fixture
def fresh() -> Iterator[Served]:
    """A server of its own, for tests that gate or slow down the engine, or drain; its
    context holds a long request."""
    s = serve_http(max_context=2000, max_queue=1, max_batch_sequences=1)
    yield s
    s.stop()


def want(engine: FakeEngine, prompt: str, adapter: AdapterRef | None, n: int) -> str:
    ids = engine.encode(prompt)
    return engine.decode([expected_token(ids, adapter, i) for i in range(n)])


def version(served: Served, adapter_id: str) -> int:
    return served.store.versions[adapter_id]


def rendered(messages: list[dict[str, str]]) -> str:
    """The chat prompt as plain jinja2 renders the template: the oracle for the server's."""
    return jinja2.Template(TEMPLATE).render(
        messages=messages, add_generation_prompt=True, **SPECIAL
    )


# ---- generation -------------------------------------------------------------------------


def test_completion_returns_the_engine_tokens_in_openai_shape(served: Served) -> None:
    before = time.time()
    reply = served.client.completions.create(model="a", prompt="hello there", max_tokens=7)
    ref = AdapterRef("a", version(served, "a"))
    assert reply.choices[0].text == want(served.engine, "hello there", ref, 7)
    assert reply.choices[0].finish_reason == "length" and reply.choices[0].index == 0
    assert reply.id.startswith("cmpl-") and reply.object == "text_completion"
    assert int(before) <= reply.created <= time.time() and reply.model == "a"
    usage = reply.usage
    assert usage is not None
    assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (11, 7, 18)


@pytest.mark.parametrize("model", ["", BASE])
def test_the_base_model_answers_to_its_name_and_to_nothing(served: Served, model: str) -> None:
    reply = served.client.completions.create(model=model, prompt="base", max_tokens=4)
    assert reply.choices[0].text == want(served.engine, "base", None, 4)


def test_completion_logprobs_are_the_chosen_tokens(served: Served) -> None:
    reply = served.client.completions.create(model="b", prompt="xyz", max_tokens=5, logprobs=0)
    logprobs = reply.choices[0].logprobs
    assert logprobs is not None and logprobs.tokens is not None
    assert logprobs.token_logprobs == [-i / 8 for i in range(5)]  # the fake engine's values
    assert "".join(logprobs.tokens) == reply.choices[0].text
    assert logprobs.text_offset == list(range(5))  # one character per token


def test_stream_gives_the_unary_text_then_usage_and_done(served: Served) -> None:
    unary = served.client.completions.create(model="b", prompt="same text", max_tokens=9)
    with httpx2.stream(
        "POST", f"{served.url}/v1/completions", timeout=30,
        json={"model": "b", "prompt": "same text", "max_tokens": 9, "stream": True,
              "stream_options": {"include_usage": True}},
    ) as response:  # fmt: skip
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]
    assert "".join(c["choices"][0]["text"] for c in chunks[:-1]) == unary.choices[0].text
    assert [c["choices"][0]["finish_reason"] for c in chunks[-2:-1]] == ["length"]
    assert all(c["usage"] is None for c in chunks[:-1]) and chunks[-1]["choices"] == []
    assert chunks[-1]["usage"] == unary.usage.model_dump(exclude_none=True)  # type: ignore[union-attr]
    assert {c["id"] for c in chunks} == {chunks[0]["id"]}
    assert all(c["object"] == "text_completion" for c in chunks)


def test_chat_renders_the_template_and_streams_the_same(served: Served) -> None:
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    reply = served.client.chat.completions.create(
        model="c",
        messages=messages,
        max_tokens=6,
        logprobs=True,  # type: ignore[arg-type]
    )
    prompt = rendered(messages)
    ref = AdapterRef("c", version(served, "c"))
    assert reply.choices[0].message.content == want(served.engine, prompt, ref, 6)
    assert reply.choices[0].message.role == "assistant"
    assert reply.object == "chat.completion" and reply.id.startswith("chatcmpl-")
    assert reply.usage is not None and reply.usage.prompt_tokens == len(prompt)
    content = reply.choices[0].logprobs.content  # type: ignore[union-attr]
    assert [t.logprob for t in content] == [-i / 8 for i in range(6)]  # type: ignore[union-attr]
    stream = served.client.chat.completions.create(
        model="c",
        messages=messages,
        max_tokens=6,
        stream=True,  # type: ignore[arg-type]
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text == reply.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == "length"
    assert all(c.object == "chat.completion.chunk" for c in chunks)


def test_n_choices_each_run_and_count_in_usage(served: Served) -> None:
    reply = served.client.completions.create(
        model="a", prompt="three ways", max_tokens=5, n=3, seed=41, temperature=0.5
    )
    expected = want(served.engine, "three ways", AdapterRef("a", version(served, "a")), 5)
    assert [c.index for c in reply.choices] == [0, 1, 2]
    assert [c.text for c in reply.choices] == [expected] * 3
    assert all(c.finish_reason == "length" for c in reply.choices)
    assert reply.usage is not None
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (len("three ways"), 15)
    # each choice was a sequence of its own, drawing with seed + its index
    seeds = [r.sampling.seed for p in served.engine.plans for r in p.prefill
             if r.prompt_ids == served.engine.encode("three ways")]  # fmt: skip
    assert sorted(seeds) == [41, 42, 43]


def test_n_choices_stream_with_their_indexes(served: Served) -> None:
    stream = served.client.chat.completions.create(
        model="b", messages=[{"role": "user", "content": "two"}], max_tokens=4, n=2,
        stream=True, stream_options={"include_usage": True},
    )  # fmt: skip
    texts: dict[int, str] = {0: "", 1: ""}
    finishes: dict[int, list[str]] = {0: [], 1: []}
    roles = []
    usage = None
    for chunk in stream:
        usage = chunk.usage or usage
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
            roles += [choice.index] if choice.delta.role else []
            finishes[choice.index] += [choice.finish_reason] if choice.finish_reason else []
    prompt = rendered([{"role": "user", "content": "two"}])
    expected = want(served.engine, prompt, AdapterRef("b", version(served, "b")), 4)
    assert texts == {0: expected, 1: expected} and sorted(roles) == [0, 1]
    assert finishes == {0: ["length"], 1: ["length"]}
    assert usage is not None and usage.completion_tokens == 8


def test_a_list_of_prompts_and_token_id_prompts(served: Served) -> None:
    engine = served.engine
    ids = engine.encode("by ids")
    reply = served.client.completions.create(
        model="",
        prompt=["first", ids],
        max_tokens=3,
        n=2,
        temperature=0,  # type: ignore[arg-type]
    )
    # choices run prompt after prompt, n of each, as OpenAI orders them
    assert [c.index for c in reply.choices] == [0, 1, 2, 3]
    texts = [c.text for c in reply.choices]
    assert texts == [want(engine, "first", None, 3)] * 2 + [want(engine, "by ids", None, 3)] * 2
    assert reply.usage is not None
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (5 + 6, 12)
    one = served.client.completions.create(model="", prompt=ids, max_tokens=3)
    assert one.choices[0].text == want(engine, "by ids", None, 3)


def test_text_parts_join_with_newlines(served: Served) -> None:
    parts = [{"type": "text", "text": "one"}, {"type": "text", "text": "two"}]
    reply = served.client.chat.completions.create(
        model="",
        messages=[{"role": "user", "content": parts}],
        max_tokens=3,  # type: ignore[list-item]
    )
    prompt = rendered([{"role": "user", "content": "one\ntwo"}])
    assert reply.choices[0].message.content == want(served.engine, prompt, None, 3)


def test_finish_reasons_map_to_stop_and_length(served: Served) -> None:
    served.engine.eos_after = 2
    try:
        eos = served.client.completions.create(model="", prompt="eos", max_tokens=9)
    finally:
        served.engine.eos_after = None
    assert eos.choices[0].finish_reason == "stop" and eos.usage.completion_tokens == 2  # type: ignore[union-attr]
    full = served.client.completions.create(model="", prompt="x" * 60, max_tokens=50)
    assert full.choices[0].finish_reason == "length"  # the context filled up
    assert full.usage.completion_tokens == 4  # type: ignore[union-attr]


def test_grpc_and_http_give_the_same_tokens(served: Served) -> None:
    with Client(f"127.0.0.1:{served.server.port}", timeout=30) as grpc_client:
        over_grpc = grpc_client.generate("one request", adapter="a", max_new_tokens=12, seed=3)
    over_http = served.client.completions.create(
        model="a", prompt="one request", max_tokens=12, seed=3, temperature=0
    )
    assert over_http.choices[0].text == over_grpc.text
    assert over_http.usage.completion_tokens == over_grpc.completion_tokens  # type: ignore[union-attr]


def test_models_lists_the_base_and_every_adapter(served: Served) -> None:
    served.client.completions.create(model="a", prompt="load a", max_tokens=1)
    listed = served.client.models.list()
    ids = [m.id for m in listed.data]
    assert ids == [BASE, *[a.adapter_id for a in served.store.list()]] and "a" in ids
    assert all(m.object == "model" and m.owned_by == "loraplex" for m in listed.data)


def test_http_requests_are_counted_like_grpc_ones(served: Served) -> None:
    def ok() -> float:
        samples = scrape(served.server.metrics_port)
        return metric(samples, "loraplex_requests_total", adapter="b", status="OK")

    before = ok()
    served.client.completions.create(model="b", prompt="count me", max_tokens=2)
    assert ok() == before + 1


# ---- errors -------------------------------------------------------------------------------


def error_of(raised: pytest.ExceptionInfo[openai.APIStatusError]) -> dict:
    body = raised.value.body
    assert isinstance(body, dict) and set(body) == {"message", "type", "param", "code"}
    return body


def test_unknown_model_is_404(served: Served) -> None:
    with pytest.raises(openai.NotFoundError) as raised:
        served.client.completions.create(model="zzz", prompt="x", max_tokens=2)
    assert error_of(raised)["code"] == "AdapterNotFound"
    with pytest.raises(openai.NotFoundError):
        served.client.chat.completions.create(
            model="zzz", messages=[{"role": "user", "content": "x"}], stream=True
        )


@pytest.mark.parametrize(
    "fields, param",
    [
        ({"model": "../a"}, "model"),
        ({"max_tokens": 5000}, "max_tokens"),
        ({"temperature": -1}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"stop": ["ok", ""]}, "stop"),
        ({"seed": -1}, "seed"),
        ({"prompt": []}, "prompt"),
        ({"prompt": [1, "a"]}, "prompt"),
        ({"prompt": [[]]}, "prompt"),
        ({"prompt": [True]}, "prompt"),
        ({"prompt": ["a", "b", "c"], "n": 6}, "n"),
        ({"prompt": ""}, "prompt"),
        ({"n": 0}, "n"),
        ({"n": 17}, "n"),
        ({"best_of": 3}, "best_of"),
        ({"echo": True}, "echo"),
        ({"logprobs": 21}, "logprobs"),
        ({"presence_penalty": 2.5}, "presence_penalty"),
        ({"frequency_penalty": -3}, "frequency_penalty"),
        ({"logit_bias": {"five": 1}}, "logit_bias"),
        ({"logit_bias": {"5": 101}}, "logit_bias"),
        ({"min_p": 1.5}, "min_p"),
        ({"response_format": {"type": "json_object"}}, "response_format"),  # the fake: no grammars
        ({"response_format": {"type": "xml"}}, "response_format.type"),
        ({"response_format": {"type": "json_schema"}}, "response_format.json_schema"),
        ({"structured_outputs": {"regex": "a+", "choice": ["a"]}}, "structured_outputs"),
        ({"structured_outputs": {"choice": []}}, "structured_outputs.choice"),
        ({"suffix": "end"}, "suffix"),
        ({"stream_options": {"include_usage": True}}, "stream_options"),
        ({"no_such_field": 1}, "no_such_field"),
        ({"temperature": "warm"}, "temperature"),
    ],
)
def test_invalid_or_unsupported_completion_fields_are_400_naming_them(
    served: Served, fields: dict, param: str
) -> None:
    body = {"model": "a", "prompt": "x", "max_tokens": 2, **fields}
    reply = httpx2.post(f"{served.url}/v1/completions", json=body, timeout=30)
    assert reply.status_code == 400
    error = reply.json()["error"]
    assert error["param"] == param and param in error["message"]
    assert error["type"] == "invalid_request_error"


@pytest.mark.parametrize(
    "fields, param",
    [
        ({"top_logprobs": 2}, "top_logprobs"),
        ({"top_logprobs": 21, "logprobs": True}, "top_logprobs"),
        ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
        ({"tool_choice": "auto"}, "tool_choice"),
        ({"max_tokens": 3, "max_completion_tokens": 4}, "max_completion_tokens"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "user", "content": "x", "name": "bob"}]}, "messages.0.name"),
    ],
)
def test_unsupported_chat_fields_are_400_naming_them(
    served: Served, fields: dict, param: str
) -> None:
    body = {"model": "a", "messages": [{"role": "user", "content": "x"}], **fields}
    reply = httpx2.post(f"{served.url}/v1/chat/completions", json=body, timeout=30)
    assert reply.status_code == 400 and reply.json()["error"]["param"] == param


def test_no_op_values_and_user_are_accepted(served: Served) -> None:
    reply = served.client.completions.create(
        model="a", prompt="x", max_tokens=2, n=1, presence_penalty=0, frequency_penalty=0.0,
        logit_bias={}, user="someone", echo=False, best_of=1,
    )  # fmt: skip
    assert len(reply.choices[0].text) == 2


def test_malformed_and_oversized_bodies(served: Served) -> None:
    json_type = {"content-type": "application/json"}
    for headers in (json_type, {}):
        bad = httpx2.post(
            f"{served.url}/v1/completions", content=b"{nope", headers=headers, timeout=30
        )
        assert bad.status_code == 400 and "JSON" in bad.json()["error"]["message"]
    limit = int(ServeConfig.model_fields["max_message_bytes"].default)
    huge = b'{"model": "a", "prompt": "' + b"x" * limit + b'"}'
    too_large = httpx2.post(f"{served.url}/v1/completions", content=huge, timeout=30)
    assert too_large.status_code == 413 and too_large.json()["error"]["param"] is None


def test_a_prompt_over_max_prompt_chars_is_400() -> None:
    s = serve_http(max_prompt_chars=10)
    try:
        with pytest.raises(openai.BadRequestError) as raised:
            s.client.completions.create(model="a", prompt="x" * 11, max_tokens=2)
        assert error_of(raised)["param"] == "prompt"
    finally:
        s.stop()


def test_broken_adapter_is_400(served: Served) -> None:
    with pytest.raises(openai.BadRequestError) as raised:
        served.client.completions.create(model="broken", prompt="x", max_tokens=2)
    assert error_of(raised)["code"] == "InvalidAdapter"


def test_engine_failure_is_500_and_ends_a_stream_with_an_error(served: Served) -> None:
    served.engine.fail_next_step = True
    with pytest.raises(openai.InternalServerError) as raised:
        served.client.completions.create(model="a", prompt="fail", max_tokens=2)
    assert error_of(raised)["code"] == "EngineFailure"
    served.engine.step_s = 0.01  # the stream is still running when the next step fails
    try:
        stream = served.client.completions.create(
            model="a", prompt="fail", max_tokens=900, stream=True
        )
        first = next(iter(stream))  # the 200 is out once a token streamed
        served.engine.fail_next_step = True
        with pytest.raises(openai.APIError, match="engine failed"):
            list(stream)
    finally:
        served.engine.step_s = 0.0
    assert first.choices[0].text


def test_a_full_queue_is_429_and_draining_is_503(fresh: Served) -> None:
    fresh.engine.gate = threading.Event()  # steps wait: one request runs, one waits
    running = threading.Thread(
        target=lambda: fresh.client.completions.create(model="a", prompt="r", max_tokens=2)
    )
    running.start()
    wait_for(lambda: fresh.server.scheduler.counts() == (1, 0))
    waiting = threading.Thread(
        target=lambda: fresh.client.completions.create(model="a", prompt="w", max_tokens=2)
    )
    waiting.start()
    wait_for(lambda: fresh.server.scheduler.counts() == (1, 1))
    with pytest.raises(openai.RateLimitError) as raised:
        fresh.client.completions.create(model="a", prompt="x", max_tokens=2)
    assert error_of(raised)["code"] == "Overloaded"
    fresh.server.scheduler.stop_admitting()
    with pytest.raises(openai.InternalServerError) as draining:
        fresh.client.completions.create(model="a", prompt="x", max_tokens=2)
    assert draining.value.status_code == 503 and error_of(draining)["code"] == "Draining"
    assert httpx2.get(f"{fresh.url}/health", timeout=30).status_code == 503
    fresh.engine.gate.set()
    running.join()
    waiting.join()


def test_lora_requests_info_names_running_and_waiting_adapters(fresh: Served) -> None:
    """vLLM's series, which adapter-aware gateways read."""

    def info() -> dict[str, str]:
        samples = scrape(fresh.server.metrics_port)
        (labels,) = [dict(k[1]) for k in samples if k[0] == "lora_requests_info"]
        return labels

    assert info() == {"running_lora_adapters": "", "waiting_lora_adapters": "",
                      "max_lora": "64"}  # fmt: skip
    fresh.engine.gate = threading.Event()  # steps wait: one request runs, one waits
    ask = fresh.client.completions.create
    running = threading.Thread(target=lambda: ask(model="a", prompt="r", max_tokens=2))
    running.start()
    wait_for(lambda: fresh.server.scheduler.counts() == (1, 0))
    waiting = threading.Thread(target=lambda: ask(model="b", prompt="w", max_tokens=2))
    waiting.start()
    wait_for(lambda: fresh.server.scheduler.counts() == (1, 1))
    assert info() == {"running_lora_adapters": "a", "waiting_lora_adapters": "b",
                      "max_lora": "64"}  # fmt: skip
    fresh.engine.gate.set()
    running.join()
    waiting.join()


def test_health_is_open_and_200_while_serving(served: Served) -> None:
    reply = httpx2.get(f"{served.url}/health", timeout=30)
    assert reply.status_code == 200 and reply.json() == {"status": "serving"}


# ---- cancellation -------------------------------------------------------------------------


def freed(served: Served) -> bool:
    """Nothing running or waiting, and the engine holds no sequence (it frees a cancelled
    one at the next step)."""
    idle = served.server.scheduler.counts() == (0, 0)
    return idle and served.engine.resources() == {"sequences": 0}


def test_a_client_leaving_mid_stream_frees_its_slot(fresh: Served) -> None:
    fresh.engine.step_s = 0.01
    body = {"model": "a", "prompt": "long", "max_tokens": 900, "stream": True}
    with httpx2.stream("POST", f"{fresh.url}/v1/completions", json=body, timeout=30) as reply:
        lines = reply.iter_lines()
        assert next(line for line in lines if line).startswith("data: ")
        assert fresh.server.scheduler.counts() == (1, 0)
    wait_for(lambda: freed(fresh), within_s=30)
    assert len(fresh.engine.plans) < 900  # it did not run to its end


def test_a_client_leaving_a_unary_request_frees_its_slot(fresh: Served) -> None:
    fresh.engine.step_s = 0.01
    body = {"model": "a", "prompt": "long", "max_tokens": 900}
    with pytest.raises(httpx2.ReadTimeout):
        httpx2.post(f"{fresh.url}/v1/completions", json=body, timeout=0.5)
    wait_for(lambda: freed(fresh), within_s=30)
    assert len(fresh.engine.plans) < 900


# ---- adapters -----------------------------------------------------------------------------


def post(served: Served, path: str, body: dict, token: str | None = None) -> httpx2.Response:
    headers = {"authorization": f"Bearer {token}"} if token else {}
    return httpx2.post(f"{served.url}{path}", json=body, headers=headers, timeout=30)


def test_load_and_unload_lora_adapter(served: Served, adapter_root: Path) -> None:
    loaded = post(served, "/v1/load_lora_adapter", {"lora_name": "b"})
    assert loaded.status_code == 200 and loaded.json()["version"] == version(served, "b")
    same_path = {"lora_name": "b", "lora_path": str(adapter_root / "b")}
    assert post(served, "/v1/load_lora_adapter", same_path).status_code == 200
    elsewhere = post(served, "/v1/load_lora_adapter", {"lora_name": "b", "lora_path": "/tmp"})
    assert elsewhere.status_code == 400 and "adapter roots" in elsewhere.json()["error"]["message"]
    assert post(served, "/v1/unload_lora_adapter", {"lora_name": "b"}).status_code == 200
    assert "b" not in served.store.versions
    missing = post(served, "/v1/load_lora_adapter", {"lora_name": "zzz"})
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "AdapterNotFound"
    gone = post(served, "/v1/unload_lora_adapter", {"lora_name": "b"})
    assert gone.status_code == 404


def test_unloading_an_adapter_in_use_or_pinned_is_409(fresh: Served) -> None:
    fresh.store.load("b")
    fresh.store.pin("b")
    pinned = post(fresh, "/v1/unload_lora_adapter", {"lora_name": "b"})
    assert pinned.status_code == 409 and pinned.json()["error"]["code"] == "AdapterPinned"
    forced = post(fresh, "/v1/unload_lora_adapter", {"lora_name": "b", "force": True})
    assert forced.status_code == 200 and "b" not in fresh.store.versions
    fresh.engine.step_s = 0.01  # slow steps, so the request below is still running
    body = {"model": "a", "prompt": "long", "max_tokens": 900, "stream": True}
    with httpx2.stream("POST", f"{fresh.url}/v1/completions", json=body, timeout=30) as reply:
        lines = reply.iter_lines()  # held: dropping it would close the connection
        assert next(line for line in lines if line).startswith("data: ")
        busy = post(fresh, "/v1/unload_lora_adapter", {"lora_name": "a", "no_wait": True})
        assert busy.status_code == 409 and busy.json()["error"]["code"] == "AdapterInUse"
        waited = post(fresh, "/v1/unload_lora_adapter", {"lora_name": "a", "timeout_s": 0.1})
        assert waited.status_code == 409  # still in use when the wait ran out


# ---- auth ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def guarded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    tokens = tmp_path_factory.mktemp("auth") / "tokens"
    tokens.write_text(f"generate {GENERATE_TOKEN}\nadmin {ADMIN_TOKEN}\n")
    s = serve_http(api_key=GENERATE_TOKEN, auth_tokens_file=tokens)
    yield s
    s.stop()


def test_generation_needs_a_token(guarded: Served) -> None:
    reply = guarded.client.completions.create(model="a", prompt="x", max_tokens=2)
    assert len(reply.choices[0].text) == 2
    for key in ("wrong-token-0123456789", ADMIN_TOKEN + "x"):
        with pytest.raises(openai.AuthenticationError) as raised:
            guarded.client.with_options(api_key=key).completions.create(
                model="a", prompt="x", max_tokens=2
            )
        assert error_of(raised)["type"] == "authentication_error"
    no_token = httpx2.get(f"{guarded.url}/v1/models", timeout=30)
    assert no_token.status_code == 401 and no_token.headers["www-authenticate"] == "Bearer"
    assert httpx2.get(f"{guarded.url}/health", timeout=30).status_code == 200


def test_adapter_admin_needs_an_admin_token(guarded: Served) -> None:
    denied = post(guarded, "/v1/load_lora_adapter", {"lora_name": "a"}, GENERATE_TOKEN)
    assert denied.status_code == 403 and denied.json()["error"]["type"] == "permission_error"
    assert post(guarded, "/v1/load_lora_adapter", {"lora_name": "a"}).status_code == 401
    allowed = post(guarded, "/v1/load_lora_adapter", {"lora_name": "a"}, ADMIN_TOKEN)
    assert allowed.status_code == 200


# ---- TLS ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A CA, and the server and client certificates it signed."""
    out = tmp_path_factory.mktemp("pki")
    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(out / "ca.pem"))
    paths = {"ca": out / "ca.pem"}
    for name, cert in (("server", ca.issue_cert("127.0.0.1")),
                       ("client", ca.issue_cert("client@example.test"))):  # fmt: skip
        cert.cert_chain_pems[0].write_to_path(str(out / f"{name}.pem"))
        cert.private_key_pem.write_to_path(str(out / f"{name}.key"))
        paths[name], paths[f"{name}_key"] = out / f"{name}.pem", out / f"{name}.key"
    return paths


def trusting(pki: dict[str, Path], with_client_cert: bool) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(pki["ca"]))
    if with_client_cert:
        context.load_cert_chain(pki["client"], pki["client_key"])
    return context


@pytest.mark.parametrize("mutual", [False, True])
def test_https_with_the_grpc_tls_files(pki: dict[str, Path], mutual: bool) -> None:
    settings = {"tls_cert": pki["server"], "tls_key": pki["server_key"]}
    s = serve_http(**settings, **({"tls_client_ca": pki["ca"]} if mutual else {}))
    https = f"https://127.0.0.1:{s.server.http_port}"
    try:
        with httpx2.Client(verify=trusting(pki, with_client_cert=True)) as session:
            api = openai.OpenAI(base_url=f"{https}/v1", api_key="none", http_client=session)
            reply = api.completions.create(model="a", prompt="over tls", max_tokens=2)
            assert len(reply.choices[0].text) == 2
        with pytest.raises(httpx2.TransportError):
            httpx2.get(f"http://127.0.0.1:{s.server.http_port}/health", timeout=5)
        if mutual:  # no client certificate: the handshake fails
            with pytest.raises(httpx2.TransportError):
                httpx2.get(f"{https}/health", verify=trusting(pki, False), timeout=5)
    finally:
        s.stop()


def test_grpc_health_is_serving_only_once_the_http_api_answers(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Clients (and test harnesses) wait for gRPC health SERVING, then use any front end."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_helpers import free_port

    from loraplex.server import http_server

    real_start = http_server.start_http

    def slow_start(*args: object, **kwargs: object) -> http_server.HttpServer:
        time.sleep(0.5)  # a slow HTTP start, as uvicorn's can be on a loaded machine
        return real_start(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(http_server, "start_http", slow_start)
    grpc_port, http_port = free_port(), free_port()
    started: list[Served] = []
    thread = threading.Thread(
        target=lambda: started.append(serve_http(port=grpc_port, http_port=http_port))
    )
    thread.start()
    try:
        serving = health_pb2.HealthCheckResponse.SERVING

        def is_serving() -> bool:  # a channel per try: a failed one waits out a backoff
            with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
                health = health_pb2_grpc.HealthStub(channel)
                try:
                    reply = health.Check(health_pb2.HealthCheckRequest(), timeout=0.2)
                except grpc.RpcError:
                    return False
                return bool(reply.status == serving)

        wait_for(is_serving, within_s=30)
        assert httpx2.get(f"http://127.0.0.1:{http_port}/v1/models").status_code == 200
    finally:
        thread.join()
        for served in started:
            served.stop()
