"""The adapters that ship with loraplex, trained on the default base by the trainer itself.

`DEFAULTS_DIR` is an adapter root: one PEFT adapter directory per id, each with its
loraplex-adapter.json metadata, its scores (eval.json) and a short card (README.md).
`python -m loraplex.adapters.trainer.defaults RUN_DIR` installs adapters trained by
scripts/train_default_adapters.sh into it and writes their cards.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Any

from loraplex.adapters.trainer.output import METADATA_FILE, WEIGHTS_FILE
from loraplex.adapters.trainer.tasks import TASKS

DEFAULTS_DIR = Path(__file__).parent / "defaults"
SHIPPED_FILES = ("adapter_config.json", WEIGHTS_FILE, METADATA_FILE)


def default_adapter_ids() -> list[str]:
    return sorted(p.name for p in DEFAULTS_DIR.iterdir() if (p / METADATA_FILE).is_file())


def install(run_dir: Path, name: str) -> Path:
    """Copy a trained adapter and its scores from `run_dir` into the defaults, with a card."""
    source, target = run_dir / name, DEFAULTS_DIR / name
    target.mkdir(parents=True, exist_ok=True)
    for file in SHIPPED_FILES:
        shutil.copy2(source / file, target / file)
    scores = json.loads((run_dir / f"{name}.eval.json").read_text())
    scores["adapter"] = name
    (target / "eval.json").write_text(json.dumps(scores, indent=2) + "\n")
    meta = json.loads((target / METADATA_FILE).read_text())
    (target / "README.md").write_text(card(name, meta, scores, _peak_rss_mb(run_dir, name)))
    return target


def _peak_rss_mb(run_dir: Path, name: str) -> float | None:
    """GNU time's 'Maximum resident set size' for the whole training command, if recorded."""
    report = run_dir / f"{name}.time.txt"
    if not report.is_file():
        return None
    for line in report.read_text().splitlines():
        if "Maximum resident set size" in line:
            return int(line.rsplit(":", 1)[1]) / 1024
    return None


def card(name: str, meta: dict[str, Any], scores: dict[str, Any], rss: float | None) -> str:
    task = TASKS[name]
    hyper = meta["hyperparameters"]
    rss_mb = rss if rss is not None else meta["peak_rss_mb"]
    lines = [
        f"# {name}",
        "",
        f"{task.method.upper()} {meta['adapter']['peft_type']} adapter for the default base "
        f"({meta['base']['spec']}, {meta['base']['quantization']}): {task.description}.",
        "",
        f"- Trained with `loraplex train-adapter --task {name}`: {hyper['max_steps']} steps, "
        f"batch {hyper['batch_size']}, learning rate {hyper['learning_rate']}, rank "
        f"{hyper['rank']}, alpha {hyper['alpha']}, all linear layers.",
        f"- Train time {meta['train_seconds']:.0f} s, peak RSS {rss_mb:.0f} MB "
        "(2 shared CPU cores).",
        f"- Held-out scores ({scores['rows']} rows, `loraplex eval-adapter`):",
        "",
        *[f"  - {key}: {_fmt(value)}" for key, value in scores.items() if _is_score(key)],
        "",
        "Prompts are plain text; see `adapters/trainer/data/" + name + "/` for the format.",
        "",
    ]
    return "\n".join(lines)


def _is_score(key: str) -> bool:
    return not key.endswith("_examples") and key not in ("adapter", "method", "rows")


def _fmt(value: Any) -> str:
    return f"{value:.3f}" if isinstance(value, float) else str(value)


if __name__ == "__main__":
    for task_name in sys.argv[2:] or list(TASKS):
        print(install(Path(sys.argv[1]), task_name))
