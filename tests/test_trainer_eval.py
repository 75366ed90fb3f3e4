"""eval-adapter's scoring, checked against direct computations with the same PEFT model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_trainer import make_config

from loraplex.adapters.trainer import evaluate, train
from loraplex.adapters.trainer.config import EvalConfig
from loraplex.adapters.trainer.evaluate import Scorer, completion_logps, first_line, trait_scores
from loraplex.adapters.trainer.tasks import TASKS


@pytest.fixture(scope="module")
def sft_adapter(
    tiny_checkpoints: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Path:
    tmp = tmp_path_factory.mktemp("eval")
    config = make_config(tiny_checkpoints["gemma3"], tmp / "sft", tmp / "cache")
    return train.run(config).adapter_dir


def test_trait_scores_counts_wins_and_ties() -> None:
    scores = trait_scores([2, 10, 5], [9, 10, 3])
    assert scores["concise_win_rate"] == pytest.approx((1 + 0.5 + 0) / 3)
    assert scores["adapter_concise_rate"] == pytest.approx(2 / 3)
    assert scores["base_mean_words"] == pytest.approx(22 / 3)


def test_first_line() -> None:
    assert first_line(' {"a": 1}\nmore') == '{"a": 1}'


def test_sft_scores_match_a_direct_generation(
    tiny_checkpoints: dict[str, Path], sft_adapter: Path, tmp_path: Path
) -> None:
    config = EvalConfig(
        model=str(tiny_checkpoints["gemma3"]),
        quantization="none",
        adapter=sft_adapter,
        task="json-extract",
        limit=4,
        max_new_tokens=6,
        cache_dir=tmp_path,
    )
    scores = evaluate.run(config)
    assert scores["method"] == "sft" and scores["rows"] == 4
    assert 0.0 <= scores["adapter_exact_match"] <= 1.0
    rows = [json.loads(line) for line in TASKS["json-extract"].path("test").open()][:4]
    from peft import PeftModel

    from loraplex.adapters.trainer.base import load_base, load_tokenizer

    tok = load_tokenizer(tiny_checkpoints["gemma3"])
    model = PeftModel.from_pretrained(
        load_base(tiny_checkpoints["gemma3"], "none", torch.device("cpu")), sft_adapter
    ).eval()
    ids = tok(rows[0]["prompt"], return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=6, do_sample=False)
    direct = tok.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
    assert first_line(scores["adapter_examples"][0]) == first_line(direct)


def test_completion_logps_equal_a_manual_sum(
    tiny_checkpoints: dict[str, Path], sft_adapter: Path
) -> None:
    from peft import PeftModel

    from loraplex.adapters.trainer.base import load_base, load_tokenizer

    tok = load_tokenizer(tiny_checkpoints["gemma3"])
    model = PeftModel.from_pretrained(
        load_base(tiny_checkpoints["gemma3"], "none", torch.device("cpu")), sft_adapter
    ).eval()
    scorer = Scorer(model, tok, progress=False)
    result = completion_logps(scorer, "Question: hi\nAnswer:", [" four.", " a much longer one"])
    prompt = tok("Question: hi\nAnswer:").input_ids
    completion = [*tok(" four.", add_special_tokens=False).input_ids, tok.eos_token_id]
    ids = torch.tensor([prompt + completion])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1], -1)
    manual = sum(float(logp[len(prompt) - 1 + i, t]) for i, t in enumerate(completion))
    assert result[0][True] == pytest.approx(manual, abs=1e-4)
    assert result[0][True] != pytest.approx(result[0][False])
