"""Typed configs of `train-adapter`, `eval-adapter` and `adapters export-gguf`."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar, Literal

from pydantic import Field, model_validator

from loraplex.server.config import ModelConfig

Quantization = Literal["nf4", "int8", "none"]


class BaseModelConfig(ModelConfig):
    """A base model spec plus how to load it for training or scoring."""

    quantization: Quantization = Field(
        default="nf4",
        description="how the base is loaded: nf4 (4-bit NF4, double quantization), int8 "
        "(LLM.int8) or none (unquantized)",
    )
    device: str = Field(default="auto", description="torch device: auto, cpu, cuda, cuda:1 ...")


class TrainConfig(BaseModelConfig):
    """Everything `loraplex train-adapter` needs: method, adapter shape, data and run control."""

    toml_table: ClassVar[str] = "train-adapter"

    data: Path | None = Field(default=None, description="training JSONL file")
    task: str | None = Field(
        default=None,
        description="a built-in task (json-extract, date-iso, concise, short-answer) instead of "
        "--data",
    )
    output: Path | None = Field(
        default=None, description="adapter directory to write (its name is the adapter id)"
    )
    overwrite: bool = Field(default=False, description="replace an existing output directory")
    push: str | None = Field(
        default=None,
        description="address of a running loraplex server to load the new adapter into "
        "(the output directory must lie in one of its adapter roots)",
    )
    method: Literal["sft", "dpo", "reward", "grpo"] = Field(
        default="sft",
        description="training method: sft, dpo, reward (a reward model: a scalar head "
        "trained on preference pairs; eval-adapter reports its pairwise accuracy), or grpo "
        "(reinforcement learning against --reward-model and/or rule rewards, with a KL "
        "penalty of --beta to the base)",
    )
    adapter_type: Literal["lora", "dora", "vera", "prompt"] = Field(
        default="lora",
        description="lora; dora (LoRA with a learned magnitude per output, hf backend only); "
        "vera; or prompt (a soft prompt: --virtual-tokens learned embeddings put before each "
        "prompt, SFT only, hf backend only)",
    )
    virtual_tokens: int = Field(
        default=20, ge=1, le=1024, description="--adapter-type prompt: the soft prompt's length"
    )
    rank: int = Field(default=8, ge=1, description="adapter rank")
    alpha: float = Field(default=16.0, gt=0, description="LoRA alpha (scale = alpha / rank)")
    rslora: bool = Field(default=False, description="rank-stabilized LoRA: alpha / sqrt(rank)")
    target_modules: list[str] = Field(
        default_factory=list,
        description="module names to adapt; repeat the flag (default: all linear)",
    )
    dropout: float = Field(default=0.0, ge=0, lt=1, description="adapter dropout")
    init_adapter: Path | None = Field(
        default=None,
        description="start from this adapter; for DPO it is also the frozen reference",
    )
    eval_data: Path | None = Field(
        default=None, description="held-out JSONL scored during training"
    )
    eval_split: float = Field(
        default=0.0, ge=0, lt=1, description="fraction of --data held out when no --eval-data"
    )
    max_length: int = Field(default=256, ge=8, description="maximum tokens per example")
    epochs: float = Field(default=1.0, gt=0, description="passes over the data")
    max_steps: int = Field(default=-1, description="optimizer steps; overrides --epochs when > 0")
    learning_rate: float = Field(default=2e-4, gt=0, description="peak learning rate")
    lr_scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = Field(
        default="linear", description="learning-rate schedule"
    )
    warmup_ratio: float = Field(default=0.0, ge=0, lt=1, description="warm-up share of the steps")
    batch_size: int = Field(default=4, ge=1, description="examples per device batch")
    grad_accum: int = Field(default=1, ge=1, description="gradient accumulation steps")
    optimizer: Literal["auto", "adamw_torch", "adamw_8bit", "paged_adamw_8bit"] = Field(
        default="auto",
        description="auto: paged 8-bit AdamW on CUDA, 8-bit AdamW (bitsandbytes) on CPU",
    )
    seed: int = Field(default=0, description="seed for data order, init and dropout")
    beta: float = Field(
        default=0.1, ge=0, description="DPO beta; GRPO: weight of the KL penalty to the base"
    )
    reward_model: Path | None = Field(
        default=None, description="GRPO: a reward model adapter (train-adapter --method reward)"
    )
    reward: list[str] = Field(
        default_factory=list,
        description="GRPO: a reward NAME[=WEIGHT], repeat the flag; names: model (the "
        "--reward-model), exact (first line equals the row's reference), json (first line is "
        "JSON, valid against the row's schema if any), line (stops by itself after one line), "
        "length (at most --max-words words); weights sum the rewards (default: model)",
    )
    num_generations: int = Field(
        default=4, ge=2, description="GRPO: completions per prompt (a group)"
    )
    max_completion_length: int = Field(
        default=32, ge=1, description="GRPO: new tokens per completion"
    )
    temperature: float = Field(default=1.0, gt=0, description="GRPO: sampling temperature")
    max_words: int = Field(default=10, ge=1, description="GRPO: the length reward's word limit")
    rollouts: Literal["engine", "trl"] = Field(
        default="engine",
        description="GRPO: who samples the completions: engine (loraplex's batched engine over "
        "the trainer's own base, the policy adapter swapped in memory each step) or trl "
        "(transformers' generate, as TRL does by default)",
    )
    loss_type: Literal["sigmoid", "ipo", "hinge", "robust"] = Field(
        default="sigmoid", description="DPO loss"
    )
    save_dtype: Literal["float32", "bfloat16", "float16"] = Field(
        default="float32", description="dtype of the saved adapter weights (bf16 halves the file)"
    )
    save_steps: int = Field(default=0, ge=0, description="checkpoint every N steps (0: never)")
    checkpoint_dir: Path | None = Field(
        default=None, description="where checkpoints go (default: <cache>/checkpoints/<id>)"
    )
    resume: bool = Field(default=False, description="resume from the latest checkpoint")
    logging_steps: int = Field(default=10, ge=1, description="log the loss every N steps")
    eval_steps: int = Field(
        default=0, ge=0,
        description="score the eval rows every N steps (0: once, after training)",
    )  # fmt: skip
    report_to: str = Field(
        default="none",
        description="where the training logs also go, comma-separated: none, tensorboard, "
        "wandb, mlflow, ... (transformers' report_to; the integration must be installed)",
    )
    packing: bool = Field(
        default=False,
        description="SFT: pack several examples into each --max-length sequence (fewer, "
        "fuller batches on short rows; the loss still covers completions only)",
    )
    gradient_checkpointing: Literal["auto", "on", "off"] = Field(
        default="auto",
        description="recompute activations in the backward pass to save memory (auto: on "
        "CUDA only; on the CPU memory is seldom short and it costs about a sixth of each step)",
    )

    @model_validator(mode="after")
    def _grpo_has_rewards_and_whole_groups(self) -> TrainConfig:
        if self.method != "grpo":
            return self
        if self.batch_size % self.num_generations:
            raise ValueError(
                f"GRPO: --batch-size ({self.batch_size}) counts completions and must be a "
                f"multiple of --num-generations ({self.num_generations})"
            )
        if not self.reward and self.reward_model is None:
            raise ValueError("GRPO needs a reward: give --reward-model DIR or --reward NAME")
        if self.eval_data is not None or self.eval_split:
            raise ValueError(
                "GRPO adapters are scored after training (eval-adapter), not during it: "
                "drop --eval-data and --eval-split"
            )
        return self

    @model_validator(mode="after")
    def _soft_prompts_are_for_sft(self) -> TrainConfig:
        if self.adapter_type == "prompt" and self.method != "sft":
            raise ValueError(
                "--adapter-type prompt trains with --method sft only (a soft prompt has no "
                "layers for DPO's reference, a reward head or GRPO's engine rollouts to use)"
            )
        return self

    @model_validator(mode="after")
    def _packing_is_for_sft(self) -> TrainConfig:
        if self.packing and self.method != "sft":
            raise ValueError(
                "--packing is for SFT only: DPO and reward models compare whole chosen/rejected "
                "rows"
            )
        return self

    progress: bool = Field(default=True, description="show progress bars")


class EvalConfig(BaseModelConfig):
    """`loraplex eval-adapter`: score an adapter against its base on a held-out split."""

    toml_table: ClassVar[str] = "eval-adapter"

    adapter: Path | None = Field(default=None, description="adapter directory to score")
    task: str | None = Field(default=None, description="built-in task whose test split to use")
    data: Path | None = Field(default=None, description="held-out JSONL (instead of --task)")
    method: Literal["sft", "dpo", "reward", "grpo"] | None = Field(
        default=None,
        description="sft, dpo, reward or grpo scoring (default: from the adapter's card or the "
        "task)",
    )
    reward_model: Path | None = Field(
        default=None,
        description="a reward model adapter: also report the mean reward of the adapter's and "
        "the base's greedy answers (a GRPO adapter: default, its training reward model)",
    )
    server: str | None = Field(
        default=None,
        description="score the adapter as this running loraplex server (HOST:PORT, any "
        "backend) serves it, by its id (the adapter argument's last path part); the token "
        "comes from $LORAPLEX_TOKEN",
    )
    metric: Literal["auto", "exact", "rouge", "json-schema", "reward", "stops"] = Field(
        default="auto",
        description="with --server: exact (first line), rouge (ROUGE-L F1 of the first "
        "line), json-schema (first line is JSON valid against the row's schema), reward "
        "(--reward-model) or stops (ended by itself within --max-words words); auto: reward "
        "with a reward model, else exact for SFT",
    )
    max_words: int = Field(default=10, ge=1, description="the stops metric's word limit")
    limit: int = Field(default=0, ge=0, description="score only the first N rows (0: all)")
    max_new_tokens: int = Field(default=40, ge=1, description="generation length")
    batch_size: int = Field(default=16, ge=1, description="rows per generation batch")
    beta: float = Field(default=0.1, gt=0, description="beta of the implicit DPO reward")
    output_json: Path | None = Field(default=None, description="also write the scores here")


class ExportGgufConfig(ModelConfig):
    """`loraplex adapters export-gguf`: a PEFT LoRA/VeRA adapter as a llama.cpp GGUF-LoRA."""

    toml_table: ClassVar[str] = "export-gguf"

    adapter: Path | None = Field(default=None, description="PEFT adapter directory")
    output: Path | None = Field(
        default=None, description="GGUF file to write (default: <adapter>/adapter.gguf)"
    )
    dtype: Literal["f32", "f16"] = Field(default="f32", description="tensor type in the file")
