"""JSONL training data: read, validate row by row (naming file and line), checksum, split.

SFT rows are `{"prompt", "completion"}` strings, or chat `{"messages": [...]}` whose last
message is the assistant's answer (it becomes the completion, so the loss covers it only).
DPO rows are `{"prompt", "chosen", "rejected"}` strings.
"""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path
from typing import Any, Literal

from loraplex.server.errors import LoraplexError

Method = Literal["sft", "dpo", "reward", "grpo"]
PAIRED = ("dpo", "reward")  # methods whose rows are preference pairs
Row = dict[str, Any]
ROLES = {"system", "user", "assistant"}


class DatasetError(LoraplexError):
    """A data file is missing, empty or holds a row the trainer cannot use."""


def load_rows(path: Path, method: Method) -> list[Row]:
    """Every row of a JSONL file, checked for `method`; the first bad row raises DatasetError."""
    if not path.is_file():
        raise DatasetError(f"{path}: data file does not exist")
    rows: list[Row] = []
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            rows.append(_parse_row(line, method, f"{path}:{number}"))
    if not rows:
        raise DatasetError(f"{path}: no rows")
    return rows


def _parse_row(line: str, method: Method, where: str) -> Row:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as err:
        raise DatasetError(f"{where}: not valid JSON ({err.msg})") from None
    if not isinstance(row, dict):
        raise DatasetError(f"{where}: a row must be a JSON object, got {type(row).__name__}")
    if method in PAIRED:
        return _check_strings(row, ("prompt", "chosen", "rejected"), where)
    if method == "grpo":
        return _prompt_row(row, where)
    if "messages" in row:
        return _messages_to_completion(row["messages"], where)
    return _check_strings(row, ("prompt", "completion"), where)


def _prompt_row(row: Row, where: str) -> Row:
    """A GRPO row: its prompt, the reference answer the exact reward compares with (the row's
    `reference`, else its SFT `completion` or DPO `chosen`) and its JSON `schema`, if any."""
    if "messages" in row:
        row = _messages_to_completion(row["messages"], where)
    _check_strings(row, ("prompt",), where)
    reference = reference_answer(row)
    if not isinstance(reference, str):
        raise DatasetError(f"{where}: the reference answer must be a string")
    schema = row.get("schema", "")
    return {"prompt": row["prompt"], "reference": reference,
            "schema": schema if isinstance(schema, str) else json.dumps(schema)}  # fmt: skip


def reference_answer(row: Row) -> Any:
    """What a row says the right answer is: its `reference`, else its SFT `completion`, else
    its DPO `chosen` answer ("" when it has none)."""
    return next((row[k] for k in ("reference", "completion", "chosen") if k in row), "")


def _check_strings(row: Row, keys: tuple[str, ...], where: str) -> Row:
    for key in keys:
        if key not in row:
            raise DatasetError(f"{where}: missing field {key!r} (expected {', '.join(keys)})")
        if not isinstance(row[key], str):
            raise DatasetError(f"{where}: field {key!r} must be a string")
        if key != "prompt" and not row[key].strip():
            raise DatasetError(f"{where}: field {key!r} is empty")
    return {key: row[key] for key in keys}


def _messages_to_completion(messages: Any, where: str) -> Row:
    if not isinstance(messages, list) or len(messages) < 2:
        raise DatasetError(f"{where}: 'messages' must be a list of at least two messages")
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            raise DatasetError(f"{where}: message {index} needs a role in {sorted(ROLES)}")
        if not isinstance(message.get("content"), str):
            raise DatasetError(f"{where}: message {index} needs a string 'content'")
    if messages[-1]["role"] != "assistant":
        raise DatasetError(f"{where}: the last message must be the assistant's answer")
    clean = [{"role": m["role"], "content": m["content"]} for m in messages]
    return {"prompt": clean[:-1], "completion": clean[-1:]}


def checksum(paths: list[Path]) -> str:
    """sha256 over the files' bytes in order: names the exact data an adapter saw."""
    digest = hashlib.sha256()
    for path in paths:
        digest.update(path.read_bytes())
    return digest.hexdigest()


def split_rows(rows: list[Row], fraction: float, seed: int) -> tuple[list[Row], list[Row]]:
    """Shuffle with `seed` and hold out `fraction` of the rows (at least one when > 0)."""
    if not 0.0 <= fraction < 1.0:
        raise DatasetError(f"eval split must be in [0, 1), got {fraction}")
    if fraction == 0.0:
        return rows, []
    shuffled = rows[:]
    random.Random(seed).shuffle(shuffled)
    held = max(1, round(len(rows) * fraction))
    if held >= len(rows):
        raise DatasetError(f"eval split {fraction} leaves no training rows out of {len(rows)}")
    return shuffled[held:], shuffled[:held]
