"""JSONL loading and validation: every bad row is named by file and line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from loraplex.adapters.trainer.data import DatasetError, checksum, load_rows, split_rows
from loraplex.adapters.trainer.tasks import TASKS, generate


def write(tmp_path: Path, lines: list[str]) -> Path:
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


GOOD_SFT = json.dumps({"prompt": "a", "completion": "b"})
GOOD_DPO = json.dumps({"prompt": "q", "chosen": "yes", "rejected": "no"})


@pytest.mark.parametrize(
    ("method", "bad_row", "problem"),
    [
        ("sft", "{not json", "not valid JSON"),
        ("sft", "[1, 2]", "must be a JSON object"),
        ("sft", json.dumps({"prompt": "a"}), "missing field 'completion'"),
        ("sft", json.dumps({"prompt": "a", "completion": 3}), "must be a string"),
        ("sft", json.dumps({"prompt": "a", "completion": "  "}), "is empty"),
        ("sft", json.dumps({"messages": [{"role": "user", "content": "hi"}]}), "at least two"),
        ("sft", json.dumps({"messages": [{"role": "bot", "content": "x"}] * 2}), "needs a role"),
        (
            "sft",
            json.dumps(
                {
                    "messages": [
                        {"role": "assistant", "content": "x"},
                        {"role": "user", "content": "y"},
                    ]
                }
            ),
            "last message must be the assistant",
        ),
        ("dpo", json.dumps({"prompt": "q", "chosen": "yes"}), "missing field 'rejected'"),
    ],
)
def test_bad_row_names_file_and_line(
    tmp_path: Path, method: str, bad_row: str, problem: str
) -> None:
    good = GOOD_SFT if method == "sft" else GOOD_DPO
    path = write(tmp_path, [good, "", good, bad_row, good])
    with pytest.raises(DatasetError) as err:
        load_rows(path, method)  # type: ignore[arg-type]
    assert f"{path}:4:" in str(err.value)
    assert problem in str(err.value)


def test_chat_messages_become_prompt_and_completion(tmp_path: Path) -> None:
    messages = [
        {"role": "user", "content": "Say hi"},
        {"role": "assistant", "content": "hi"},
    ]
    rows = load_rows(write(tmp_path, [json.dumps({"messages": messages})]), "sft")
    assert rows == [{"prompt": messages[:1], "completion": messages[1:]}]


def test_missing_and_empty_files(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="does not exist"):
        load_rows(tmp_path / "nope.jsonl", "sft")
    with pytest.raises(DatasetError, match="no rows"):
        load_rows(write(tmp_path, [""]), "sft")


def test_split_is_seeded_and_disjoint() -> None:
    rows = [{"prompt": str(i), "completion": "x"} for i in range(20)]
    train, held = split_rows(rows, 0.25, seed=3)
    assert len(held) == 5 and len(train) == 15
    assert {r["prompt"] for r in train}.isdisjoint(r["prompt"] for r in held)
    assert split_rows(rows, 0.25, seed=3) == (train, held)
    with pytest.raises(DatasetError):
        split_rows(rows[:1], 0.5, seed=0)


def test_checksum_changes_with_content(tmp_path: Path) -> None:
    path = write(tmp_path, [GOOD_SFT])
    before = checksum([path])
    path.write_text(GOOD_SFT + "\n" + GOOD_SFT + "\n")
    assert checksum([path]) != before


@pytest.mark.parametrize("name", sorted(TASKS))
def test_shipped_task_data_is_valid_and_regenerates(name: str) -> None:
    task = TASKS[name]
    train = load_rows(task.path("train"), task.method)
    test = load_rows(task.path("test"), task.method)
    assert (train, test) == generate(task)
    assert {r["prompt"] for r in train}.isdisjoint(r["prompt"] for r in test)
