"""Structured output and decoding options end to end: a real `loraplex serve` process on a tiny
random Llama, driven through both front ends (the official `openai` client over HTTP, and
loraplex's gRPC client). Outputs are checked with `jsonschema` and `re`, not against stored
answers; the random model tries hard to wander off any structure.

The real model with the json-extract adapter is in
tests/integration/test_structured_output_real.py.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx2
import jsonschema
import openai
import pytest
from grpc_helpers import free_port
from server_process import ServerProcess

from loraplex.clients import Client
from loraplex.clients.errors import InvalidArgument

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "kind": {"enum": ["cat", "dog"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 5}, "maxItems": 2},
    },
    "required": ["name", "age", "kind"],
    "additionalProperties": False,
}
REGEX = r"(yes|no) \d{2}"
LARK = 'start: "ok " WORD\nWORD: /[a-z]{3}/'
PROMPT = "The record says"
TOKENS = 240  # room for the random model to close every structure above (context: 256)


class Served:
    def __init__(self, process: ServerProcess, http_port: int) -> None:
        self.process = process
        self.url = f"http://127.0.0.1:{http_port}"
        self.openai = openai.OpenAI(base_url=f"{self.url}/v1", api_key="none", max_retries=0)
        self.grpc = Client(process.target, timeout=120)


@pytest.fixture(scope="module")
def served(tiny_checkpoints: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[Served]:  # fmt: skip
    log = tmp_path_factory.mktemp("logs") / "server.log"
    http_port = free_port()
    args = ["--model", str(tiny_checkpoints["llama"]), "--quantization", "fp32",
            "--http-port", str(http_port), "--max-new-tokens-limit", "1000",
            "--cache-dir", str(log.parent), "--log-level", "warning"]  # fmt: skip
    process = ServerProcess(args, log)
    served = Served(process, http_port)
    yield served
    served.openai.close()
    served.grpc.close()
    process.stop()


def completion(served: Served, **fields: Any) -> Any:
    return served.openai.completions.create(
        model="", **{"prompt": PROMPT, "max_tokens": TOKENS, **fields}
    )


# ---- structured output -------------------------------------------------------------------


def test_json_schema_outputs_validate_for_every_choice(served: Served) -> None:
    fmt = {"type": "json_schema", "json_schema": {"name": "pet", "schema": SCHEMA}}
    reply = completion(served, n=6, temperature=1.0, seed=5, extra_body={"response_format": fmt})
    for choice in reply.choices:
        assert choice.finish_reason == "stop", choice.text
        jsonschema.validate(json.loads(choice.text), SCHEMA)


def test_streamed_json_schema_output_validates(served: Served) -> None:
    fmt = {"type": "json_schema", "json_schema": {"name": "pet", "schema": SCHEMA}}
    body = {"model": "", "prompt": PROMPT, "max_tokens": TOKENS, "temperature": 0.8,
            "seed": 2, "stream": True, "response_format": fmt}  # fmt: skip
    with httpx2.stream("POST", f"{served.url}/v1/completions", json=body, timeout=120) as reply:
        lines = [line for line in reply.iter_lines() if line.startswith("data: {")]
    chunks = [json.loads(line[6:]) for line in lines]
    text = "".join(c["choices"][0]["text"] for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    jsonschema.validate(json.loads(text), SCHEMA)


def test_json_object_output_is_an_object(served: Served) -> None:
    reply = completion(served, n=4, temperature=1.0, seed=3,
                       extra_body={"response_format": {"type": "json_object"}})  # fmt: skip
    for choice in reply.choices:
        if choice.finish_reason == "stop":
            assert isinstance(json.loads(choice.text), dict)
        else:  # the random model may write one endless key: still the start of an object
            assert choice.finish_reason == "length" and choice.text.startswith("{")


@pytest.mark.parametrize(
    "option, check",
    [
        ({"regex": REGEX}, lambda text: re.fullmatch(REGEX, text)),
        ({"choice": ["red fox", "whale", "owl"]}, lambda t: t in ("red fox", "whale", "owl")),
        ({"grammar": LARK}, lambda text: re.fullmatch(r"ok [a-z]{3}", text)),
        ({"json": SCHEMA}, lambda text: jsonschema.validate(json.loads(text), SCHEMA) is None),
    ],
)
def test_structured_outputs_extra(served: Served, option: dict, check: Any) -> None:
    reply = completion(
        served, n=4, temperature=1.0, seed=11, extra_body={"structured_outputs": option}
    )
    for choice in reply.choices:
        assert choice.finish_reason == "stop" and check(choice.text), choice.text


def test_grpc_output_formats(served: Served) -> None:
    for seed in range(3):
        result = served.grpc.generate(
            PROMPT, max_new_tokens=TOKENS, temperature=1.0, seed=seed, json_schema=SCHEMA
        )
        assert result.finish_reason == "stop"
        jsonschema.validate(json.loads(result.text), SCHEMA)
        regex = served.grpc.generate(PROMPT, max_new_tokens=20, temperature=1.0, seed=seed,
                                     regex=REGEX)  # fmt: skip
        assert re.fullmatch(REGEX, regex.text)
        lark = served.grpc.generate(PROMPT, max_new_tokens=20, seed=seed, lark=LARK)
        assert re.fullmatch(r"ok [a-z]{3}", lark.text)


def test_a_mixed_batch_keeps_each_row_to_its_own_format(served: Served) -> None:
    """Requests with different formats, and free ones, run at once: the masks are per row."""
    free_alone = served.grpc.generate(PROMPT, max_new_tokens=24)

    def one(kind: int) -> tuple[int, Any]:
        if kind == 0:
            return kind, served.grpc.generate(PROMPT, max_new_tokens=24)
        if kind == 1:
            return kind, served.grpc.generate(
                PROMPT, max_new_tokens=TOKENS, temperature=1.0, seed=kind, json_schema=SCHEMA
            )
        return kind, served.grpc.generate(PROMPT, max_new_tokens=20, regex=REGEX)

    with ThreadPoolExecutor(9) as pool:
        results = list(pool.map(one, [0, 1, 2] * 3))
    for kind, result in results:
        if kind == 0:
            assert result.token_ids == free_alone.token_ids
        elif kind == 1:
            jsonschema.validate(json.loads(result.text), SCHEMA)
        else:
            assert re.fullmatch(REGEX, result.text)


@pytest.mark.parametrize(
    "fmt",
    [
        {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "frobnicate"}}},
        {"type": "json_schema", "json_schema": {"name": "x", "schema": {"$ref": "#/nowhere"}}},
    ],
)
def test_bad_schemas_are_400_naming_response_format(served: Served, fmt: dict) -> None:
    body = {"model": "", "prompt": PROMPT, "max_tokens": 4, "response_format": fmt}
    reply = httpx2.post(f"{served.url}/v1/completions", json=body, timeout=60)
    assert reply.status_code == 400, reply.text
    assert reply.json()["error"]["param"] == "response_format"


@pytest.mark.parametrize("option", [{"regex": "(unclosed"}, {"grammar": "start: nowhere"}])
def test_bad_regex_and_grammar_are_refused_on_both_front_ends(served: Served, option: dict) -> None:
    body = {"model": "", "prompt": PROMPT, "max_tokens": 4, "structured_outputs": option}
    reply = httpx2.post(f"{served.url}/v1/completions", json=body, timeout=60)
    assert reply.status_code == 400, reply.text
    kind = "regex" if "regex" in option else "lark"
    with pytest.raises(InvalidArgument, match="output_format"):
        served.grpc.generate(PROMPT, max_new_tokens=4, **{kind: next(iter(option.values()))})
    assert served.grpc.generate(PROMPT, max_new_tokens=2).completion_tokens == 2  # still serving


# ---- decoding options --------------------------------------------------------------------


def test_top_logprobs_over_both_front_ends(served: Served) -> None:
    result = served.grpc.generate(PROMPT, max_new_tokens=6, logprobs=True, top_logprobs=3)
    assert len(result.top_logprobs) == 6
    for token, logprob, top in zip(result.token_ids, result.logprobs, result.top_logprobs,
                                   strict=True):  # fmt: skip
        assert len(top) == 3 and [v for _, v in top] == sorted((v for _, v in top), reverse=True)
        assert top[0][0] == token and math.isclose(top[0][1], logprob, abs_tol=1e-5)  # greedy
    reply = completion(served, max_tokens=6, temperature=0, logprobs=3)
    logprobs = reply.choices[0].logprobs
    assert logprobs is not None and logprobs.top_logprobs is not None
    # keyed by text, as OpenAI's shape is: tokens that decode alike (cut UTF-8) share a key
    assert len(logprobs.top_logprobs) == 6
    assert all(1 <= len(t) <= 3 for t in logprobs.top_logprobs)
    for chosen, top in zip(logprobs.token_logprobs or [], logprobs.top_logprobs, strict=True):
        assert math.isclose(max(top.values()), chosen, abs_tol=1e-5)


def test_logit_bias_stop_token_ids_and_ignore_eos(served: Served) -> None:
    free = served.grpc.generate(PROMPT, max_new_tokens=8)
    forced = free.token_ids[3]
    biased = served.grpc.generate(PROMPT, max_new_tokens=5, logit_bias={forced: 100.0})
    assert biased.token_ids == [forced] * 5
    stopped = served.grpc.generate(PROMPT, max_new_tokens=8, stop_token_ids=[forced])
    assert stopped.finish_reason == "stop" and stopped.token_ids[-1] == forced
    assert forced not in stopped.token_ids[:-1]
    eos = served.grpc.tokenize("<eos>")[-1]
    ends = completion(served, max_tokens=6, temperature=0, logit_bias={str(eos): 100})
    assert ends.usage is not None and ends.usage.completion_tokens == 1
    assert ends.choices[0].finish_reason == "stop"
    goes_on = completion(served, max_tokens=6, temperature=0, logit_bias={str(eos): 100},
                         extra_body={"ignore_eos": True})  # fmt: skip
    assert goes_on.usage is not None and goes_on.usage.completion_tokens == 6
    assert goes_on.choices[0].finish_reason == "length"


@pytest.mark.parametrize(
    "fields, param",
    [
        ({"logit_bias": {"100000": 5}}, "logit_bias"),
        ({"stop_token_ids": [100000]}, "stop_token_ids"),
        ({"prompt": [1, 2, 100000]}, "prompt"),
        ({"prompt": [[1, 2], list(range(2, 300))]}, "prompt"),  # past the context
    ],
)
def test_token_ids_outside_the_model_are_400_at_once(
    served: Served, fields: dict, param: str
) -> None:
    body = {"model": "", "prompt": PROMPT, "max_tokens": 4, **fields}
    reply = httpx2.post(f"{served.url}/v1/completions", json=body, timeout=60)
    assert reply.status_code == 400, reply.text
    assert reply.json()["error"]["param"] == param
    if param != "prompt":
        with pytest.raises(InvalidArgument, match=param):
            served.grpc.generate(PROMPT, max_new_tokens=4, **{
                "logit_bias": {100000: 5.0}} if param == "logit_bias" else {
                "stop_token_ids": [100000]})  # fmt: skip


def test_token_id_prompts_answer_as_their_text_does(served: Served) -> None:
    ids = served.grpc.tokenize(PROMPT)
    by_text = completion(served, max_tokens=8, temperature=0)
    by_ids = completion(served, max_tokens=8, temperature=0, prompt=ids)
    assert by_ids.choices[0].text == by_text.choices[0].text


def test_generate_command_takes_a_schema_file_and_a_regex(
    served: Served, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from loraplex.server.cli import main

    schema_file = tmp_path / "pet.json"
    schema_file.write_text(json.dumps(SCHEMA))
    argv = ["generate", PROMPT, "--server", served.process.target, "--max-new-tokens", "160"]
    assert (
        main([*argv, "--json-schema", str(schema_file), "--temperature", "1", "--seed", "4"]) == 0
    )
    jsonschema.validate(json.loads(capsys.readouterr().out), SCHEMA)
    assert main([*argv, "--regex", REGEX]) == 0
    assert re.fullmatch(REGEX, capsys.readouterr().out.removesuffix("\n"))
