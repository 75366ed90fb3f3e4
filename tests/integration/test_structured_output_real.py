"""Structured output on the real default base with the packaged json-extract adapter, served by
`loraplex serve` with its default flags on each backend: every one of 30 held-out records,
asked for with the adapter's schema through the official `openai` client, comes back as JSON
that validates against it (`jsonschema` is the oracle)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import jsonschema
import openai
import pytest
from grpc_helpers import free_port
from server_process import ServerProcess

from loraplex.adapters.trainer.tasks import JSON_EXTRACT_SCHEMA, TASKS

pytestmark = pytest.mark.integration
HELD_OUT = 30


@pytest.fixture(scope="module", params=["hf", pytest.param("gguf", marks=pytest.mark.gguf)])
def client(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[openai.OpenAI]:
    log = tmp_path_factory.mktemp("logs") / "server.log"
    http_port = free_port()
    args = ["--backend", request.param, "--http-port", str(http_port), "--log-level", "warning"]
    process = ServerProcess(args, log)
    api = openai.OpenAI(base_url=f"http://127.0.0.1:{http_port}/v1", api_key="none",
                        max_retries=0, timeout=300)  # fmt: skip
    yield api
    api.close()
    process.stop()


def held_out_rows() -> list[dict[str, str]]:
    lines = TASKS["json-extract"].path("test").read_text().splitlines()
    return [json.loads(line) for line in lines[:HELD_OUT]]


def test_every_held_out_record_validates_against_the_adapter_schema(
    client: openai.OpenAI,
) -> None:
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": JSON_EXTRACT_SCHEMA}}

    def extract(row: dict[str, str]) -> tuple[dict[str, str], Any]:
        reply = client.completions.create(
            model="json-extract", prompt=row["prompt"], max_tokens=64, temperature=0,
            extra_body={"response_format": fmt},
        )  # fmt: skip
        return row, reply.choices[0]

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(extract, held_out_rows()))
    exact = 0
    for row, choice in results:
        assert choice.finish_reason == "stop", choice.text
        record = json.loads(choice.text)
        jsonschema.validate(record, JSON_EXTRACT_SCHEMA)
        exact += record == json.loads(row["completion"])
    # the format only shapes the output; the adapter still reads the record (most are exact)
    assert exact >= HELD_OUT // 2, f"{exact}/{HELD_OUT} records extracted exactly"
