"""Adapter configs (LoRA, DoRA, VeRA, soft prompts) from the train config, and loading an
adapter to start from."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from peft import LoraConfig, PeftConfig, PeftModel, PromptTuningConfig, VeraConfig

from loraplex.adapters.trainer.config import TrainConfig

ALL_LINEAR = "all-linear"


def adapter_config(config: TrainConfig) -> PeftConfig:
    """A fresh adapter config; LoRA, DoRA and VeRA adapt every linear layer except the output
    head by default. A reward model's task type (SEQ_CLS) makes PEFT train and save its scalar
    head in full."""
    targets: Any = config.target_modules or ALL_LINEAR
    task_type = "SEQ_CLS" if config.method == "reward" else "CAUSAL_LM"
    if config.adapter_type == "prompt":
        return PromptTuningConfig(task_type=task_type, num_virtual_tokens=config.virtual_tokens)
    if config.adapter_type == "vera":
        # VeRA has no alpha; its shared projections are saved with the adapter so that the
        # result does not depend on this machine's random number generator.
        return VeraConfig(
            r=config.rank,
            target_modules=targets,
            vera_dropout=config.dropout,
            projection_prng_key=config.seed,
            save_projection=True,
            task_type=task_type,
        )
    return LoraConfig(
        r=config.rank,
        lora_alpha=config.alpha,  # type: ignore[arg-type]  # PEFT accepts fractional alpha
        use_rslora=config.rslora,
        target_modules=targets,
        lora_dropout=config.dropout,
        bias="none",
        use_dora=config.adapter_type == "dora",
        task_type=task_type,
    )


def load_trainable(base: Any, adapter_dir: Path) -> PeftModel:
    """Wrap `base` with an existing adapter whose weights keep training (for --init-adapter)."""
    if not (adapter_dir / "adapter_config.json").is_file():
        raise FileNotFoundError(f"{adapter_dir} is not a PEFT adapter (no adapter_config.json)")
    return PeftModel.from_pretrained(base, adapter_dir, is_trainable=True)


def describe(peft_config: PeftConfig) -> dict[str, Any]:
    """The adapter hyperparameters worth recording, as plain JSON values."""
    keys = [
        "peft_type",
        "r",
        "lora_alpha",
        "use_rslora",
        "use_dora",
        "lora_dropout",
        "vera_dropout",
        "num_virtual_tokens",
    ]
    info = {key: getattr(peft_config, key) for key in keys if hasattr(peft_config, key)}
    info["peft_type"] = str(info.get("peft_type", "")).split(".")[-1]
    targets = getattr(peft_config, "target_modules", None)
    info["target_modules"] = sorted(targets) if isinstance(targets, set | list) else targets
    return info
