"""GRPO (`train-adapter --method grpo`) on the tiny model, its rule rewards, and eval-adapter's
reward scoring checked against a direct computation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from test_trainer import make_config
from transformers import AutoModelForSequenceClassification

from loraplex.adapters.trainer import evaluate, grpo, rule_rewards, train
from loraplex.adapters.trainer.base import load_base, load_tokenizer
from loraplex.adapters.trainer.config import EvalConfig, TrainConfig
from loraplex.adapters.trainer.data import DatasetError
from loraplex.adapters.trainer.output import METADATA_FILE
from loraplex.adapters.trainer.tasks import TASKS

PROMPTS = TASKS["concise"].path("train")


@pytest.fixture(scope="module")
def runs(tiny_checkpoints: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A small reward model, then two GRPO steps against it plus a weighted rule reward."""
    tmp = tmp_path_factory.mktemp("grpo")
    checkpoint = tiny_checkpoints["gemma3"]
    rm = train.run(make_config(checkpoint, tmp / "rm", tmp / "cache", method="reward",
                               max_length=384, max_steps=2))  # fmt: skip
    policy = train.run(
        make_config(
            checkpoint, tmp / "policy", tmp / "cache", method="grpo", data=PROMPTS,
            reward_model=rm.adapter_dir, reward=["model", "line=0.5"], max_steps=2,
            batch_size=4, num_generations=4, max_completion_length=6, logging_steps=1,
            beta=0.04,
        )
    )  # fmt: skip
    return {"checkpoint": checkpoint, "rm": rm.adapter_dir, "policy": policy}


def test_grpo_writes_a_causal_lm_adapter_with_its_reward_and_kl_curve(runs: dict) -> None:
    adapter = runs["policy"].adapter_dir
    assert json.loads((adapter / "adapter_config.json").read_text())["task_type"] == "CAUSAL_LM"
    card = json.loads((adapter / METADATA_FILE).read_text())
    assert card["method"] == "grpo"
    assert [point["step"] for point in card["curve"]] == [1, 2]
    assert all({"reward", "kl"} <= point.keys() for point in card["curve"])
    # the weights reach TRL: each logged reward is the weighted sum of the functions' means
    for entry in (e for e in runs["policy"].history if "reward" in e):
        weighted = entry["rewards/reward_model/mean"] + 0.5 * entry["rewards/line/mean"]
        assert entry["reward"] == pytest.approx(weighted, abs=1e-4)


def test_eval_reports_the_reward_models_mean_reward_of_greedy_answers(
    runs: dict, tmp_path: Path
) -> None:
    checkpoint, rm_dir = runs["checkpoint"], runs["rm"]
    config = EvalConfig(model=str(checkpoint), quantization="none", cache_dir=tmp_path,
                        adapter=runs["policy"].adapter_dir, task="concise", limit=3,
                        max_new_tokens=5)  # fmt: skip
    scores = evaluate.run(config)  # the card names the reward model
    assert scores["method"] == "grpo" and "adapter_concise_rate" in scores
    tok = load_tokenizer(checkpoint)
    base = load_base(checkpoint, "none", torch.device("cpu")).eval()
    judge = PeftModel.from_pretrained(
        AutoModelForSequenceClassification.from_pretrained(
            checkpoint, num_labels=1, pad_token_id=tok.pad_token_id
        ),
        rm_dir,
    ).eval()
    rewards = []
    for line in TASKS["concise"].path("test").open().readlines()[:3]:
        prompt = json.loads(line)["prompt"]
        ids = tok(prompt, return_tensors="pt")
        with torch.no_grad():
            out = base.generate(**ids, max_new_tokens=5, do_sample=False)
        answer = tok.decode(out[0, ids.input_ids.shape[1] :], skip_special_tokens=True)
        text = tok(prompt + answer + tok.eos_token, return_tensors="pt")
        with torch.no_grad():
            rewards.append(float(judge(**text).logits[0, 0]))
    assert scores["base_mean_reward"] == pytest.approx(sum(rewards) / 3, abs=1e-3)


def test_rule_rewards() -> None:
    assert rule_rewards.exact([" 53.\nmore", "54"], ["53.", "53."]) == [1.0, 0.0]
    schema = json.dumps({"type": "object", "required": ["age"]})
    got = rule_rewards.json_valid(['{"age": 3}', '{"name": 1}', "no"], [schema, schema, ""])
    assert got == [1.0, 0.0, 0.0]
    assert rule_rewards.json_valid(["[1, 2]\nx"]) == [1.0]
    line = rule_rewards.line_end({1, 106})
    assert line(["Lima.", "Lima.\nWhat", "Lima is", ""], [[5, 1], [5, 9, 7], [5, 9], [106]]) == [
        1.0, 1.0, 0.0, 0.0,
    ]  # fmt: skip
    length = rule_rewards.length(4)
    assert length(["a b c d", "a b c d e f", "a b c d e f g h i j"]) == [1.0, 0.5, 0.0]


def test_bad_reward_settings_say_what_to_do(
    tiny_checkpoints: dict[str, Path], tmp_path: Path
) -> None:
    def config(**overrides: object) -> TrainConfig:
        settings = {"batch_size": 4, **overrides}
        return make_config(tiny_checkpoints["gemma3"], tmp_path / "x", tmp_path, method="grpo",
                           data=PROMPTS, **settings)  # fmt: skip

    with pytest.raises(ValueError, match="needs a reward"):
        config()
    with pytest.raises(ValueError, match="multiple of --num-generations"):
        config(reward=["line"], batch_size=6, num_generations=4)
    with pytest.raises(ValueError, match="scored after training"):
        config(reward=["line"], eval_split=0.1)
    for spec, message in (("speed", "unknown reward"), ("model", "--reward-model"),
                          ("line=x", "must be a number")):  # fmt: skip
        with pytest.raises(DatasetError, match=message):
            grpo.parse_rewards(config(reward=[spec]))
