"""A fresh `loraplex serve` on the default model: the shipped adapters are ready and each one
answers its own task the way it was trained to, where the base does not."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
from server_process import ServerProcess

from loraplex.adapters.trainer.defaults import default_adapter_ids
from loraplex.adapters.trainer.tasks import TASKS as TASKS_BY_NAME
from loraplex.clients import Client

pytestmark = pytest.mark.integration
ROWS = 3  # held-out rows per task, from the trainer's test split
TASKS = ["date-iso", "json-extract"]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    log = tmp_path_factory.mktemp("defaults-logs") / "server.log"
    proc = ServerProcess(["--log-level", "warning"], log)  # no adapter flags at all
    yield proc
    proc.stop()


def test_at_least_two_shipped_adapters_are_ready(server: ServerProcess) -> None:
    assert len(default_adapter_ids()) >= 2
    with Client(server.target) as client:
        ready = {a.adapter_id for a in client.list_adapters() if a.resident}
    assert set(default_adapter_ids()) <= ready


def test_each_shipped_adapter_answers_its_task(server: ServerProcess) -> None:
    with Client(server.target) as client:
        for task in TASKS:
            rows = [json.loads(line) for line in TASKS_DATA[task].read_text().splitlines()[:ROWS]]
            right = {adapter: 0 for adapter in ("", task)}
            for row, adapter in ((row, adapter) for row in rows for adapter in right):
                answer = client.generate(row["prompt"], adapter=adapter, max_new_tokens=40).text
                right[adapter] += answer.strip().startswith(row["completion"].strip())
            assert right[task] >= ROWS - 1, (task, right)
            assert right[""] < right[task], (task, right)


TASKS_DATA = {task: TASKS_BY_NAME[task].path("test") for task in TASKS}
