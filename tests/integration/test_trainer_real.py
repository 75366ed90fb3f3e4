"""The trainer on the real default base (Gemma 3 270M, NF4): the shipped default adapters
meet their targets on held-out data, and a fresh training run reproduces one of them.

Targets: each SFT adapter beats the base by >= 50 points of exact match (`short-answer`'s
held-out prompts are two-digit sums; test_default_adapters_served.py holds it to them and to
ending its answers by itself, as served); the DPO adapter's implicit-reward preference
accuracy is >= 0.8 and its answers are more concise.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from loraplex.adapters.trainer import evaluate, train
from loraplex.adapters.trainer.config import EvalConfig, TrainConfig
from loraplex.adapters.trainer.defaults import DEFAULTS_DIR, default_adapter_ids
from loraplex.adapters.trainer.tasks import TASKS
from loraplex.server.models import ModelSource

pytestmark = pytest.mark.integration
ROWS = 20  # a held-out sample keeps each scoring run to minutes on two CPU cores


def score(adapter: Path, task: str) -> dict[str, float]:
    max_new_tokens = {"json-extract": 40, "date-iso": 16, "concise": 24, "short-answer": 24}[task]
    config = EvalConfig(adapter=adapter, task=task, limit=ROWS, max_new_tokens=max_new_tokens)
    return evaluate.run(config)


def check_targets(task: str, scores: dict[str, float]) -> None:
    if TASKS[task].method == "sft":
        assert scores["exact_match_gain_points"] >= 50, scores
    else:
        assert scores["preference_accuracy"] >= 0.8, scores
        assert scores["adapter_mean_words"] < scores["base_mean_words"], scores
        assert scores["concise_win_rate"] > 0.5, scores


def test_every_task_ships_a_default_adapter() -> None:
    assert set(default_adapter_ids()) == set(TASKS)


@pytest.mark.parametrize("task", sorted(TASKS))
def test_default_adapter_meets_its_target(real_checkpoint: Path, task: str) -> None:
    check_targets(task, score(DEFAULTS_DIR / task, task))


def test_training_date_iso_reaches_the_target(
    real_model: ModelSource, real_checkpoint: Path, tmp_path: Path
) -> None:
    """The same settings as scripts/train_default_adapters.sh (tens of minutes on 2 cores)."""
    config = TrainConfig(
        task="date-iso",
        output=tmp_path / "date-iso",
        rank=8,
        alpha=16,
        max_length=128,
        max_steps=16,
        batch_size=8,
        learning_rate=2e-3,
        checkpoint_dir=tmp_path / "ckpt",
    )
    result = train.run(config)
    check_targets("date-iso", score(result.adapter_dir, "date-iso"))
