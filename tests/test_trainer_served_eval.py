"""eval-adapter --server: an adapter scored through a real `loraplex serve` process, against
the same scores computed from transformers' own greedy answers on this side."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from rouge_score import rouge_scorer
from server_process import ServerProcess
from test_trainer import make_config

from loraplex.adapters.trainer import evaluate, train
from loraplex.adapters.trainer.base import load_base, load_tokenizer
from loraplex.adapters.trainer.config import EvalConfig
from loraplex.adapters.trainer.evaluate import Scorer, first_line, generate
from loraplex.adapters.trainer.tasks import TASKS

ROWS = 6
TOKENS = 6


@pytest.fixture(scope="module")
def served(
    tiny_checkpoints: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Path, Path, ServerProcess]]:
    """A tiny SFT adapter in an adapter root, and a server (hf backend, fp32) over that root.
    The tiny Llama, whose greedy answers hold letters and digits (ROUGE's words)."""
    tmp = tmp_path_factory.mktemp("served")
    checkpoint = tiny_checkpoints["llama"]
    adapter = train.run(make_config(checkpoint, tmp / "root" / "sft", tmp / "cache")).adapter_dir
    args = ["--model", str(checkpoint), "--adapter-roots", str(adapter.parent),
            "--quantization", "fp32", "--cache-dir", str(tmp / "cache")]  # fmt: skip
    server = ServerProcess(args, tmp / "server.log")
    yield checkpoint, adapter, server
    server.stop()


@pytest.fixture(scope="module")
def answers(served: tuple[Path, Path, ServerProcess]) -> dict[bool, list[str]]:
    """transformers' own greedy first lines, with the adapter on and off."""
    checkpoint, adapter, _ = served
    return {on: local_answers(checkpoint, adapter, on) for on in (True, False)}


@pytest.fixture(scope="module")
def data(answers: dict[bool, list[str]], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Rows whose reference is the base's own answer on even rows, and unrelated words on odd
    ones: a served base answer scores exact only where it equals transformers' answer."""
    path = tmp_path_factory.mktemp("rows") / "rows.jsonl"
    lines = []
    for i, prompt in enumerate(prompts()):
        reference = answers[False][i] if i % 2 == 0 else "quite unrelated words"
        lines.append(json.dumps({"prompt": prompt, "completion": reference}))
    path.write_text("\n".join(lines) + "\n")
    return path


def config(served: tuple[Path, Path, ServerProcess], data: Path, **extra: object) -> EvalConfig:
    checkpoint, adapter, server = served
    return EvalConfig(model=str(checkpoint), quantization="none", adapter=adapter, data=data,
                      max_new_tokens=TOKENS, server=server.target, cache_dir=adapter.parent,
                      **extra)  # fmt: skip


def local_answers(checkpoint: Path, adapter: Path, adapter_on: bool) -> list[str]:
    import torch
    from peft import PeftModel

    model = PeftModel.from_pretrained(load_base(checkpoint, "none", torch.device("cpu")), adapter)
    scorer = Scorer(model.eval(), load_tokenizer(checkpoint), max_new_tokens=TOKENS,
                    progress=False, stop_at_newline=True)  # fmt: skip
    return [first_line(a) for a in generate(scorer, prompts(), adapter_on)]


def prompts() -> list[str]:
    lines = TASKS["json-extract"].path("test").open().readlines()[:ROWS]
    return [json.loads(line)["prompt"] for line in lines]


def references(data: Path) -> list[str]:
    return [json.loads(line)["completion"] for line in data.open()]


def test_served_answers_score_as_transformers_answers_do(
    served: tuple[Path, Path, ServerProcess], answers: dict[bool, list[str]], data: Path
) -> None:
    exact = evaluate.run(config(served, data))  # auto: exact for SFT
    assert exact["metric"] == "exact" and exact["rows"] == ROWS
    assert exact["base_exact"] == 0.5  # the even rows, where the reference is its own answer
    wanted = references(data)
    hits = sum(a == w for a, w in zip(answers[True], wanted, strict=True))
    assert exact["adapter_exact"] == hits / ROWS
    rouge = evaluate.run(config(served, data, metric="rouge"))
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    for label, on in (("adapter", True), ("base", False)):
        pairs = zip(answers[on], wanted, strict=True)
        expected = [scorer.score(w, a)["rougeL"].fmeasure for a, w in pairs]
        assert rouge[f"{label}_rouge"] == pytest.approx(sum(expected) / ROWS, abs=1e-6)
    assert rouge["base_rouge"] > 0


def test_served_json_metric(
    served: tuple[Path, Path, ServerProcess], answers: dict[bool, list[str]], data: Path
) -> None:
    parsed = evaluate.run(config(served, data, metric="json-schema"))
    valid = 0
    for answer in answers[True]:
        try:
            json.loads(answer)
            valid += 1
        except ValueError:
            pass
    assert parsed["adapter_json-schema"] == valid / ROWS


def test_an_unknown_adapter_id_fails_clearly(
    served: tuple[Path, Path, ServerProcess], data: Path
) -> None:
    from loraplex.clients.errors import LoraplexClientError

    checkpoint, adapter, server = served
    unknown = (checkpoint, adapter.parent / "missing", server)
    with pytest.raises(LoraplexClientError, match="missing"):
        evaluate.run(config(unknown, data, method="sft"))


def test_served_stops_metric_counts_answers_ended_by_the_model(
    served: tuple[Path, Path, ServerProcess], data: Path
) -> None:
    import torch

    checkpoint, _, _ = served
    result = evaluate.run(config(served, data, metric="stops", max_words=50))
    tok = load_tokenizer(checkpoint)
    base = load_base(checkpoint, "none", torch.device("cpu")).eval()
    ended = 0
    for prompt in prompts():
        ids = tok(prompt, return_tensors="pt")
        with torch.no_grad():
            out = base.generate(**ids, max_new_tokens=TOKENS, do_sample=False)
        ended += tok.eos_token_id in out[0, ids.input_ids.shape[1] :].tolist()
    assert result["base_stops"] == ended / ROWS
