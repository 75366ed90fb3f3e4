"""Reward models (`train-adapter --method reward`), scored by eval-adapter and checked against
PEFT's own sequence classifier run one text at a time."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from test_trainer import make_config
from transformers import AutoModelForSequenceClassification

from loraplex.adapters.errors import InvalidAdapter
from loraplex.adapters.trainer import evaluate, train
from loraplex.adapters.trainer.base import load_tokenizer
from loraplex.adapters.trainer.config import EvalConfig
from loraplex.adapters.trainer.output import METADATA_FILE
from loraplex.adapters.trainer.tasks import TASKS
from loraplex.server.engine.config import EngineConfig
from loraplex.server.engine.hf import HFEngine

PAIRS = TASKS["concise"].path("train")


@pytest.fixture(scope="module")
def reward_adapter(
    tiny_checkpoints: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """A reward model trained long enough on the concise pairs (short answers chosen) to tell
    them apart: QLoRA, as users train one."""
    tmp = tmp_path_factory.mktemp("reward")
    config = make_config(
        tiny_checkpoints["gemma3"], tmp / "rm", tmp / "cache", method="reward", data=PAIRS,
        quantization="nf4", max_steps=40, batch_size=8, learning_rate=1e-2, max_length=384,
    )  # fmt: skip
    return train.run(config).adapter_dir


def test_reward_adapter_is_a_lora_with_a_scalar_head_and_a_card(reward_adapter: Path) -> None:
    config = json.loads((reward_adapter / "adapter_config.json").read_text())
    assert config["task_type"] == "SEQ_CLS" and config["peft_type"] == "LORA"
    weights = load_file(str(reward_adapter / "adapter_model.safetensors"))
    head = [k for k in weights if ".score." in k]
    assert head and all(weights[k].shape[0] == 1 for k in head), head
    assert any("lora_A" in k for k in weights)
    card = json.loads((reward_adapter / METADATA_FILE).read_text())
    assert card["method"] == "reward"


def test_pairwise_accuracy_matches_peft_one_text_at_a_time(
    tiny_checkpoints: dict[str, Path], reward_adapter: Path, tmp_path: Path
) -> None:
    checkpoint = tiny_checkpoints["gemma3"]
    config = EvalConfig(model=str(checkpoint), quantization="none", adapter=reward_adapter,
                        data=PAIRS, limit=12, batch_size=5, cache_dir=tmp_path)  # fmt: skip
    scores = evaluate.run(config)
    assert scores["method"] == "reward" and scores["rows"] == 12
    tokenizer = load_tokenizer(checkpoint)
    base = AutoModelForSequenceClassification.from_pretrained(
        checkpoint, num_labels=1, pad_token_id=tokenizer.pad_token_id
    )
    model = PeftModel.from_pretrained(base, reward_adapter).eval()

    def reward(prompt: str, completion: str) -> float:
        ids = tokenizer(prompt + completion + tokenizer.eos_token, return_tensors="pt")
        with torch.no_grad():
            return float(model(**ids).logits[0, 0])

    rows = [json.loads(line) for line in PAIRS.open()][:12]
    margins = [reward(r["prompt"], r["chosen"]) - reward(r["prompt"], r["rejected"]) for r in rows]
    assert scores["pairwise_accuracy"] == sum(m > 0 for m in margins) / len(margins)
    assert scores["mean_reward_margin"] == pytest.approx(sum(margins) / len(margins), abs=1e-4)
    # the pairs differ in length, which even a tiny random model learns in 40 steps
    assert scores["pairwise_accuracy"] >= 0.75, scores


def test_the_engine_refuses_a_reward_adapter_by_name(
    tiny_checkpoints: dict[str, Path], reward_adapter: Path
) -> None:
    engine = HFEngine.from_config(
        EngineConfig(
            checkpoint=tiny_checkpoints["gemma3"], quantization="fp32",
            adapter_roots=[reward_adapter.parent],
        )
    )  # fmt: skip
    with pytest.raises(InvalidAdapter, match="reward model"):
        engine.store.acquire(reward_adapter.name)
