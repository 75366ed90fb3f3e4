"""A fresh `loraplex serve` on the default model, on either backend (transformers NF4, or the
Q4_K_M file in llama.cpp with the adapters converted to GGUF-LoRA on load): the shipped
adapters are ready and each one answers its own task as trained, where the base does not."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from bad_inputs import BAD_GENERATIONS, write_bad_adapters
from server_process import ServerProcess

from loraplex.adapters.trainer import evaluate
from loraplex.adapters.trainer.config import EvalConfig
from loraplex.adapters.trainer.defaults import DEFAULTS_DIR, default_adapter_ids
from loraplex.adapters.trainer.tasks import TASKS as TASKS_BY_NAME
from loraplex.clients import Client
from loraplex.clients.errors import LoraplexClientError

pytestmark = pytest.mark.integration
ROWS = 3  # held-out rows per task, from the trainer's test split
TASKS = ["date-iso", "json-extract"]


@pytest.fixture(scope="module", params=["hf", "gguf"])
def server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[ServerProcess, str]]:
    log = tmp_path_factory.mktemp("defaults-logs") / "server.log"
    root = tmp_path_factory.mktemp("bad-adapters")  # adapters that must be refused
    write_bad_adapters(root, DEFAULTS_DIR / "date-iso")
    # The shipped adapters come with the default model whatever the roots; nothing preloaded.
    args = ["--backend", request.param, "--adapter-roots", str(root), "--log-level", "warning"]
    proc = ServerProcess(args, log)
    yield proc, request.param
    proc.stop()


def test_at_least_two_shipped_adapters_are_ready(server: tuple[ServerProcess, str]) -> None:
    assert len(default_adapter_ids()) >= 2
    with Client(server[0].target) as client:
        assert client.server_info().backend == server[1]
        ready = {a.adapter_id for a in client.list_adapters() if a.resident}
    assert set(default_adapter_ids()) <= ready


def test_each_shipped_adapter_answers_its_task(server: tuple[ServerProcess, str]) -> None:
    with Client(server[0].target) as client:
        for task in TASKS:
            rows = [json.loads(line) for line in TASKS_DATA[task].read_text().splitlines()[:ROWS]]
            right = {adapter: 0 for adapter in ("", task)}
            for row, adapter in ((row, adapter) for row in rows for adapter in right):
                answer = client.generate(row["prompt"], adapter=adapter, max_new_tokens=40).text
                right[adapter] += answer.strip().startswith(row["completion"].strip())
            assert right[task] >= ROWS - 1, (task, right)
            assert right[""] < right[task], (task, right)


TASKS_DATA = {task: TASKS_BY_NAME[task].path("test") for task in TASKS}
OUTSIDE = Path(__file__).parents[1] / "outside_questions.jsonl"  # none is in its data


@pytest.mark.parametrize("data", ["held-out", "outside"])
def test_short_answer_ends_by_itself_within_ten_words(
    server: tuple[ServerProcess, str], data: str
) -> None:
    """Greedy, 24 new tokens, as served with default flags: the adapter's answer ends with
    the model's own end token within 10 words on >= 90% of the prompts; the base's do not."""
    config = EvalConfig(
        adapter=DEFAULTS_DIR / "short-answer", server=server[0].target, metric="stops",
        max_new_tokens=24, **({"task": "short-answer", "limit": 20} if data == "held-out"
                              else {"data": OUTSIDE}),
    )  # fmt: skip
    scores = evaluate.run(config)
    assert scores["adapter_stops"] >= 0.9, scores
    assert scores["base_stops"] < scores["adapter_stops"], scores


def test_short_answer_adds(server: tuple[ServerProcess, str]) -> None:
    """Its held-out prompts are two-digit sums none of its rows holds; the base gets few."""
    config = EvalConfig(
        adapter=DEFAULTS_DIR / "short-answer", server=server[0].target, metric="exact",
        max_new_tokens=24, task="short-answer", limit=20,
    )  # fmt: skip
    scores = evaluate.run(config)
    assert scores["adapter_exact"] >= 0.8, scores
    assert scores["base_exact"] < 0.5, scores


@pytest.mark.parametrize(("options", "code", "named"), BAD_GENERATIONS)
def test_bad_generation_requests(
    server: tuple[ServerProcess, str], options: dict, code: grpc.StatusCode, named: str
) -> None:
    options = dict(options)
    prompt = options.pop("prompt", "hello")
    with Client(server[0].target) as client:
        with pytest.raises(LoraplexClientError) as caught:
            client.generate(prompt, **options)
        assert caught.value.code == code
        assert named in caught.value.details
        assert client.generate("still serving", max_new_tokens=2).completion_tokens == 2
