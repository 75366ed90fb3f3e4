"""`train-adapter`: QLoRA SFT, DPO, a reward model or GRPO through TRL's trainers, written as
one PEFT adapter.

TRL does the work: SFTTrainer with prompt/completion rows trains on the completion only,
DPOTrainer with a `peft_config` uses the base with the adapter disabled as its reference,
and with an already-trained PeftModel (`--init-adapter`) it copies that adapter into a
frozen `ref` adapter, RewardTrainer trains a scalar head beside the adapter (reward.py), and
GRPOTrainer samples, scores and updates against loraplex's rewards (grpo.py). Nothing here is
a hand-written training loop.
"""

from __future__ import annotations

import functools
import json
import resource
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset

from loraplex.adapters.trainer import data as data_mod
from loraplex.adapters.trainer import grpo, output, peft_setup
from loraplex.adapters.trainer.base import (
    BaseInfo,
    compute_dtype,
    load_base,
    load_tokenizer,
    pick_device,
    resolve_base,
)
from loraplex.adapters.trainer.config import TrainConfig
from loraplex.adapters.trainer.reward import head_in_compute_dtype, load_reward_base
from loraplex.adapters.trainer.tasks import TASKS


@dataclass(frozen=True)
class TrainData:
    train: list[data_mod.Row]
    eval: list[data_mod.Row]
    files: list[Path]


@dataclass(frozen=True)
class TrainResult:
    adapter_dir: Path
    metrics: dict[str, float]
    train_seconds: float
    peak_rss_mb: float
    model: Any  # the trained PeftModel, still in memory
    history: list[dict[str, float]]  # the trainer's log: losses, eval losses, by step


def run(config: TrainConfig) -> TrainResult:
    """Train, then write the adapter and its metadata atomically to `config.output`."""
    target = _output_dir(config)
    output.check_output(target, config.overwrite)
    dataset = load_data(config)
    base = resolve_base(config)
    device = pick_device(config.device)
    started = time.perf_counter()
    trainer = build_trainer(config, dataset, base, device)
    resume_from = _resume_point(config, Path(trainer.args.output_dir))
    metrics = dict(trainer.train(resume_from_checkpoint=resume_from).metrics)
    if dataset.eval:
        metrics.update(trainer.evaluate())
    seconds = time.perf_counter() - started
    peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    meta = _metadata(config, base, dataset, trainer, metrics, seconds, peak_rss_mb)
    save = functools.partial(_save, trainer.model, dtype=config.save_dtype)
    output.write_adapter(target, save, meta, config.overwrite)
    history = list(trainer.state.log_history)
    return TrainResult(target, metrics, seconds, peak_rss_mb, trainer.model, history)


def _resume_point(config: TrainConfig, checkpoint_dir: Path) -> str | None:
    if not config.resume:
        return None
    latest = latest_complete_checkpoint(checkpoint_dir)
    where = f"resuming from {latest}" if latest else f"no complete checkpoint in {checkpoint_dir}"
    print(f"loraplex: {where}", file=sys.stderr, flush=True)
    return str(latest) if latest else None


def latest_complete_checkpoint(checkpoint_dir: Path) -> Path | None:
    """The newest checkpoint saved whole. The Trainer writes trainer_state.json last, so a
    checkpoint cut short (kill -9, full disk) lacks a readable one and is passed over."""
    complete = []
    for path in checkpoint_dir.glob("checkpoint-*"):
        step = path.name.removeprefix("checkpoint-")
        try:
            json.loads((path / "trainer_state.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if step.isdigit():
            complete.append((int(step), path))
    return max(complete)[1] if complete else None


def _output_dir(config: TrainConfig) -> Path:
    if config.output is None:
        raise data_mod.DatasetError("--output is required: the adapter directory to write")
    return config.output


def load_data(config: TrainConfig) -> TrainData:
    """The training rows (from --data or --task) and the eval rows (file or split)."""
    train_file, eval_file = _data_files(config)
    rows = data_mod.load_rows(train_file, config.method)
    files = [train_file]
    if eval_file is not None:
        files.append(eval_file)
        return TrainData(rows, data_mod.load_rows(eval_file, config.method), files)
    train, held = data_mod.split_rows(rows, config.eval_split, config.seed)
    return TrainData(train, held, files)


def _data_files(config: TrainConfig) -> tuple[Path, Path | None]:
    if config.data is not None:
        return config.data, config.eval_data
    if config.task is None:
        raise data_mod.DatasetError("give --data FILE.jsonl or --task NAME")
    task = TASKS.get(config.task)
    if task is None:
        raise data_mod.DatasetError(f"unknown task {config.task!r}; known: {', '.join(TASKS)}")
    pairs_for_reward = config.method == "reward" and task.method == "dpo"
    prompts_for_grpo = config.method == "grpo"  # any task's prompts, its answers as references
    if task.method != config.method and not (pairs_for_reward or prompts_for_grpo):
        raise data_mod.DatasetError(f"task {task.name} is a {task.method} task; use --method")
    return task.path("train"), config.eval_data


def build_trainer(config: TrainConfig, dataset: TrainData, base: BaseInfo, device: Any) -> Any:
    torch.manual_seed(config.seed)
    score_labelled_positions_only()
    tokenizer = load_tokenizer(base.checkpoint)
    model: Any = (
        load_reward_base(base.checkpoint, config.quantization, device, tokenizer.pad_token_id)
        if config.method == "reward"
        else load_base(base.checkpoint, config.quantization, device)
    )
    peft_config = None
    if config.init_adapter is not None:
        model = peft_setup.load_trainable(model, config.init_adapter)
    else:
        peft_config = peft_setup.adapter_config(config)
    train_ds = Dataset.from_list(dataset.train)
    eval_ds = Dataset.from_list(dataset.eval) if dataset.eval else None
    if config.method == "grpo":
        return _grpo_trainer(config, base, device, tokenizer, model, peft_config, train_ds)
    args = _trl_args(config, device, bool(dataset.eval))
    if config.method == "dpo":
        from trl import DPOTrainer

        trainer_cls: Any = DPOTrainer
    elif config.method == "reward":
        from trl import RewardTrainer

        trainer_cls = RewardTrainer
    else:
        from trl import SFTTrainer

        trainer_cls = SFTTrainer
    trainer = trainer_cls(
        model=model,
        args=args,
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        processing_class=tokenizer,
        peft_config=peft_config,
    )
    if config.method == "reward":
        head_in_compute_dtype(trainer.model, compute_dtype(device))
    return trainer


def score_labelled_positions_only() -> None:
    """TRL's fused LM head scores only the positions that have a label on Triton devices, and
    every position elsewhere (fixed tile shapes for compilers such as Neuron's). On the CPU,
    where nothing compiles, that scored each prompt token against the 262k vocabulary too:
    78% of an SFT step on short rows (docs/measurements.md). The loss and metrics are the
    same either way: unlabelled positions count as zero."""
    import trl.trainer.utils as trl_utils

    use_triton = getattr(trl_utils, "_use_triton", None)  # private: absent in another TRL
    if use_triton is None or getattr(use_triton, "loraplex_compact", False):
        return

    def compact_on_cpu(device: torch.device) -> bool:
        return device.type == "cpu" or bool(use_triton(device))

    compact_on_cpu.loraplex_compact = True  # type: ignore[attr-defined]
    trl_utils._use_triton = compact_on_cpu


def _grpo_trainer(
    config: TrainConfig, base: BaseInfo, device: torch.device, tokenizer: Any, model: Any,
    peft_config: Any, train_ds: Dataset,
) -> Any:  # fmt: skip
    from trl import GRPOTrainer

    functions, weights = grpo.reward_functions(config, base, device, tokenizer)
    common = _common_args(config, device, has_eval=False)
    args = grpo.grpo_args(config, common, weights)
    return GRPOTrainer(
        model=model,
        reward_funcs=functions,
        args=args,
        train_dataset=train_ds,
        processing_class=tokenizer,
        peft_config=peft_config,
        rollout_func=grpo.rollout_func(config, base, args.generation_batch_size),
    )


def _trl_args(config: TrainConfig, device: torch.device, has_eval: bool) -> Any:
    common = _common_args(config, device, has_eval)
    if config.method == "dpo":
        from trl import DPOConfig

        return DPOConfig(**common, beta=config.beta, loss_type=[config.loss_type])
    if config.method == "reward":
        from trl import RewardConfig

        return RewardConfig(**common)
    from trl import SFTConfig

    return SFTConfig(**common, completion_only_loss=True, packing=config.packing)


def _common_args(config: TrainConfig, device: torch.device, has_eval: bool) -> dict[str, Any]:
    common: dict[str, Any] = {
        "output_dir": str(checkpoint_dir(config)),
        "num_train_epochs": config.epochs,
        "max_steps": config.max_steps,
        "learning_rate": config.learning_rate,
        "lr_scheduler_type": config.lr_scheduler,
        "warmup_steps": config.warmup_ratio,  # a float below 1 is a share of the steps
        "per_device_train_batch_size": config.batch_size,
        "per_device_eval_batch_size": config.batch_size,
        "gradient_accumulation_steps": config.grad_accum,
        "seed": config.seed,
        "data_seed": config.seed,
        "optim": choose_optimizer(config.optimizer, device),
        "logging_steps": config.logging_steps,
        "save_strategy": "steps" if config.save_steps else "no",
        "save_steps": config.save_steps or 500,
        "eval_strategy": "steps" if has_eval and config.eval_steps else "no",
        "eval_steps": config.eval_steps or None,
        "report_to": [name.strip() for name in config.report_to.split(",") if name.strip()],
        "disable_tqdm": not config.progress,
        "bf16": compute_dtype(device) == torch.bfloat16,
        "gradient_checkpointing": _gradient_checkpointing(config.gradient_checkpointing, device),
        "use_cpu": device.type == "cpu",
        "max_length": config.max_length,
        "dataset_num_proc": None,
    }
    return common


def _gradient_checkpointing(choice: str, device: torch.device) -> bool:
    return choice == "on" or (choice == "auto" and device.type == "cuda")


def checkpoint_dir(config: TrainConfig) -> Path:
    if config.checkpoint_dir is not None:
        return config.checkpoint_dir
    name = config.output.name if config.output is not None else "adapter"
    return config.cache_dir / "checkpoints" / name


def choose_optimizer(requested: str, device: torch.device) -> str:
    """Paged 8-bit AdamW on CUDA; on the CPU paging does not exist, so plain 8-bit AdamW."""
    if requested != "auto":
        return requested
    return "paged_adamw_8bit" if device.type == "cuda" else "adamw_8bit"


def _save(model: Any, directory: Path, *, dtype: str) -> None:
    # Only the trained adapter: DPO from --init-adapter also holds the frozen `ref` copy.
    model.save_pretrained(directory, selected_adapters=["default"])
    if dtype != "float32":
        output.cast_weights(directory, dtype)


def _metadata(
    config: TrainConfig,
    base: BaseInfo,
    dataset: TrainData,
    trainer: Any,
    metrics: dict[str, float],
    seconds: float,
    peak_rss_mb: float,
) -> dict[str, Any]:
    import peft
    import transformers
    import trl

    peft_config = trainer.model.peft_config["default"]
    hyper = config.model_dump(
        exclude={"config", "cache_dir", "output", "overwrite", "push", "progress", "resume"}
    )
    card = {
        "format": 1,
        "id": _output_dir(config).name,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "base": {"spec": base.spec, "sha256": base.sha256, "quantization": config.quantization},
        "method": config.method,
        "adapter": peft_setup.describe(peft_config),
        "data": {
            "files": [str(f) for f in dataset.files],
            "sha256": data_mod.checksum(dataset.files),
            "train_rows": len(dataset.train),
            "eval_rows": len(dataset.eval),
        },
        "hyperparameters": {**hyper, "optimizer": trainer.args.optim},
        "metrics": {k: float(v) for k, v in metrics.items() if isinstance(v, int | float)},
        "train_seconds": round(seconds, 1),
        "peak_rss_mb": round(peak_rss_mb, 1),
        "versions": {
            "python": sys.version.split()[0],
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "peft": peft.__version__,
            "trl": trl.__version__,
        },
    }
    if config.method == "grpo":  # the reward/KL curve of the run
        card["curve"] = grpo.curve(trainer.state.log_history)
    return card
